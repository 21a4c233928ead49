"""ltlib's Hydra configs: where they live and composing them in a process (``python -m ltlib.check``, the
study's in-process jobs, the report's method defaults, tests) exactly as ``python -m ltlib.run`` does."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ltlib.errors import LtlibError

if TYPE_CHECKING:
    from omegaconf import DictConfig

# conf/hydra/launcher/submitit_slurm.yaml extends the plugin's config of the same name, which Hydra 1.3
# still merges (and checks) against the plugin's schema, with a deprecation note at every start.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")


def config_dir() -> str:
    """The Hydra config directory: shipped inside the package, else the checkout's ``conf/``."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if checkout.is_dir():
        return str(checkout)
    raise LtlibError(f"ltlib's configs were not found in {packaged} nor {checkout}; reinstall ltlib")


@contextlib.contextmanager
def restored_hydra_state() -> Iterator[None]:
    """Restore Hydra's global state (an initialised config search path, the job's HydraConfig) on exit,
    so that composing a config (or running a job in process) leaves the caller's Hydra as it was."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    global_hydra = GlobalHydra.instance()
    saved_hydra = global_hydra.hydra if global_hydra.is_initialized() else None
    saved_config = HydraConfig.instance().cfg
    global_hydra.clear()
    try:
        yield
    finally:
        global_hydra.clear()
        if saved_hydra is not None:
            global_hydra.initialize(saved_hydra)
        HydraConfig.instance().cfg = saved_config


def compose(overrides: Sequence[str] = (), *, hydra_node: bool = False, run_dir: str | os.PathLike[str] | None = None,
            job_name: str = "run") -> DictConfig:
    """The root config with ``overrides``, as ``python -m ltlib.run OVERRIDES`` composes it.

    ``hydra_node`` keeps the ``hydra`` node (group choices, run directory); ``run_dir`` (with
    ``hydra_node``) sets its ``runtime.output_dir`` and ``run.dir`` as ``hydra.run.dir=RUN_DIR`` would
    (unset otherwise: there is no job). Hydra's composition errors (an unknown group option, a bad
    override) propagate.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    with restored_hydra_state(), initialize_config_dir(config_dir=config_dir(), version_base="1.3",
                                                       job_name=job_name):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=hydra_node)
    if hydra_node and run_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = cfg.hydra.run.dir = str(Path(run_dir).resolve())
    return cfg
