"""Helpers shared by the benchmark scripts: device choice, ltlib configs, synthetic CIFAR-shaped data,
environment description and Markdown tables."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA GPU is available here")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def compose(*overrides: str) -> Any:
    """ltlib's Hydra config with ``overrides`` (the same files ``python -m ltlib.run`` reads)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ltlib.config import config_dir

    with initialize_config_dir(config_dir(), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def synthetic_source(num_classes: int = 10, max_count: int = 5000, size: int = 32, test_per_class: int = 10,
                     seed: int = 0) -> Callable[[], tuple[Any, Any]]:
    """A source of random uint8 CIFAR-shaped images: ``max_count`` training images per class (the data
    module then subsamples them to the long tail) and ``test_per_class`` test images per class."""
    from ltlib.data import ArrayPool

    def source() -> tuple[ArrayPool, ArrayPool]:
        rng = np.random.default_rng(seed)
        names = [f"c{c}" for c in range(num_classes)]
        train_targets = np.repeat(np.arange(num_classes), max_count)
        test_targets = np.repeat(np.arange(num_classes), test_per_class)
        train = ArrayPool(rng.integers(0, 256, (train_targets.size, size, size, 3), dtype=np.uint8), train_targets,
                          names, name="synthetic CIFAR-shaped training images")
        test = ArrayPool(rng.integers(0, 256, (test_targets.size, size, size, 3), dtype=np.uint8), test_targets,
                         names, name="synthetic CIFAR-shaped test images")
        return train, test

    return source


def build_method(cfg: Any, datamodule: Any) -> Any:
    """The LightningModule exactly as ``ltlib.run`` builds it from ``cfg`` (:func:`ltlib.runs.build_method`)."""
    from ltlib.runs import build_method as build

    return build(cfg.method, cfg.optim, datamodule, cfg.backbone, many_threshold=cfg.many_threshold,
                 few_threshold=cfg.few_threshold)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write a benchmark's report as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def add_src_to_path() -> None:
    """Let the scripts run from a checkout without installing ltlib."""
    src = str(REPO / "src")
    if src not in sys.path and not _ltlib_importable():
        sys.path.insert(0, src)


def _ltlib_importable() -> bool:
    try:
        import ltlib  # noqa: F401
    except ImportError:
        return False
    return True
