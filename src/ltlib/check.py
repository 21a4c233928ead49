"""Check a dataset before a long run: ``python -m ltlib.check data=imagenet_lt data.root=/data/imagenet``.

Composes the same Hydra config as ``python -m ltlib.run`` (the same overrides work), builds the data
module's splits, which parses the split lists or annotation files and checks the subsampling settings,
then opens every image the run would use (training, validation and test) with the decoder training
uses, in parallel threads. Prints one line per split and the first problems, then a summary.

Exit status: 0 when every image can be read, 1 when some are missing or unreadable, 2 for a
configuration error (an unreadable list, a malformed line, a missing ``data.root``: one line each).

Options: ``--quick`` only checks that each file exists and starts like an image (no full decode, much
faster; misses truncated files), ``--workers N`` threads (default: up to 16), ``--show N`` problems
listed (default 20; all are counted).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ltlib.errors import LtlibError

SPLITS = ("train", "val", "test")


@dataclass
class Problem:
    """One image that cannot be used."""

    split: str
    path: str
    kind: str  # "missing" | "unreadable"
    reason: str


@dataclass
class CheckReport:
    """What :func:`check_data` found."""

    data: str
    root: str | None
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    in_memory: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def lines(self, show: int = 20) -> list[str]:
        """The report as printed: a header, one line per split, the first ``show`` problems, a summary."""
        out = [f"ltlib.check: data {self.data}" + (f", root {self.root}" if self.root else "")]
        for split in SPLITS:
            found = [p for p in self.problems if p.split == split]
            missing = sum(p.kind == "missing" for p in found)
            state = "ok" if not found else f"{missing} missing, {len(found) - missing} unreadable"
            out.append(f"  {split:<5} {self.counts.get(split, 0):>8} images  {state}")
        if self.in_memory:
            out.append("ltlib.check: the images are held in memory (no image files to check)")
            return out
        for problem in self.problems[:show]:
            out.append(f"  {problem.kind:<10}  {problem.path} ({problem.split}): {problem.reason}")
        if len(self.problems) > show:
            out.append(f"  ... and {len(self.problems) - show} more")
        if self.ok:
            out.append(f"ltlib.check: all {self.total} image files can be read ({self.seconds:.0f} s)")
        else:
            missing = sum(p.kind == "missing" for p in self.problems)
            out.append(f"ltlib.check: {len(self.problems)} of {self.total} image files cannot be used ({missing} "
                       f"missing, {len(self.problems) - missing} unreadable); fix them before training")
        return out


def _check_file(pool: Any, index: int, quick: bool) -> tuple[str, str] | None:
    """``(kind, reason)`` if image ``index`` of a file pool cannot be used, else None."""
    from PIL import Image

    path = pool.paths[index]
    if not os.path.isfile(path):
        return "missing", "no such file"
    try:
        if quick:
            with Image.open(path):
                pass
        else:
            pool.load(index)
    except LtlibError as exc:
        return "unreadable", str(exc).rsplit(": ", 1)[-1]
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return "unreadable", (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return None


def compose_config(overrides: Sequence[str]) -> Any:
    """The ``ltlib.run`` config with ``overrides`` (and its Hydra node, for the group choices)."""
    from hydra import compose, initialize_config_dir

    from ltlib.run import config_dir

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("config", overrides=list(overrides), return_hydra_config=True)


def check_data(overrides: Sequence[str], *, quick: bool = False, workers: int | None = None,
               progress: Callable[[str], None] | None = None) -> CheckReport:
    """Check every image a run with ``overrides`` would read; raises :class:`LtlibError` for a bad config."""
    from hydra.utils import instantiate
    from omegaconf.errors import MissingMandatoryValue

    from ltlib.data.pools import FilePool

    cfg = compose_config(overrides)
    try:
        datamodule = instantiate(cfg.data)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or "a value"
        raise LtlibError(f"{key} is missing (???); give it on the command line, e.g. {key}=<value>") from exc
    datamodule.setup("fit")
    report = CheckReport(data=str(cfg.hydra.runtime.choices.get("data", datamodule.name)),
                         root=getattr(datamodule, "root", None))
    train, test = datamodule.train_dataset, datamodule.test_dataset
    # validation images come from the dataset's own validation list where it has one, else the training pool
    jobs = {"train": (train.pool, datamodule.train_indices), "val": (datamodule.val_pool, datamodule.val_indices),
            "test": (test.pool, test.indices)}
    report.counts = {split: len(indices) for split, (_, indices) in jobs.items()}
    if not all(isinstance(pool, FilePool) for pool, _ in jobs.values()):
        report.in_memory = True
        return report
    items = [(split, pool, int(i)) for split, (pool, indices) in jobs.items() for i in indices]
    start = time.monotonic()
    step = max(len(items) // 10, 1)
    with ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1)) as executor:
        results = executor.map(lambda item: _check_file(item[1], item[2], quick), items)
        for done, ((split, pool, i), result) in enumerate(zip(items, results, strict=True), start=1):
            if result is not None:
                report.problems.append(Problem(split, pool.paths[i], *result))
            if progress is not None and (done % step == 0 or done == len(items)):
                progress(f"ltlib.check: {done}/{len(items)} files checked, {len(report.problems)} problems")
    report.seconds = time.monotonic() - start
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ltlib.check",
        description="Report missing or unreadable image files of a data config before a long run.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m ltlib.run "
                        "(data=imagenet_lt data.root=/data/imagenet ...)")
    parser.add_argument("--quick", action="store_true",
                        help="only check that each file exists and starts like an image (misses truncated files)")
    parser.add_argument("--workers", type=int, default=None, help="threads (default: up to 16)")
    parser.add_argument("--show", type=int, default=20, help="problems listed (all are counted; default 20)")
    args = parser.parse_args(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ltlib.run import find_user_error

    try:
        report = check_data(args.overrides, quick=args.quick, workers=args.workers,
                            progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (LtlibError, HydraException, OmegaConfBaseException) as exc:
        error = find_user_error(exc) or exc
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"ltlib.check: error: {message}", file=sys.stderr)
        return 2
    print("\n".join(report.lines(args.show)))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
