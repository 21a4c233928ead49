"""Check a dataset before a long run (``python -m ltlib.check``, :mod:`ltlib.check`).

:func:`check_data` composes the same Hydra config as ``python -m ltlib.run`` (the same overrides work),
builds the data module's splits, which parses the split lists or annotation files and checks the
subsampling settings, then opens every image the run would use (training, validation and test) with the
decoder training uses, in parallel threads. :class:`CheckReport` holds what it found and prints one
line per split and the first problems, then a summary. ``quick`` only checks that each file exists and
starts like an image (no full decode, much faster; misses truncated files).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ltlib.config import compose
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


def check_data(overrides: Sequence[str], *, quick: bool = False, workers: int | None = None,
               progress: Callable[[str], None] | None = None) -> CheckReport:
    """Check every image a run with ``overrides`` would read; raises :class:`LtlibError` for a bad config."""
    from hydra.utils import instantiate
    from omegaconf.errors import MissingMandatoryValue

    from ltlib.data.pools import FilePool

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = compose(overrides, hydra_node=True)
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
