"""Comparison report of a sweep: ``python -m ltlib.report SWEEP_DIR [SWEEP_DIR ...]``.

Reads every run under the given directories (a Hydra multirun directory, ``outputs/``, a study
directory: any tree of ``python -m ltlib.run`` run directories) and writes ``report.md``, ``report.csv``,
``report.png`` and ``report_missing.csv`` into ``--output-dir`` (default ``SWEEP_DIR/report``): one row per
cell (method x dataset x imbalance ratio x backbone x any other setting that differs), mean ± std over
seeds, next to the numbers the papers report for the same cell; missing and failed runs listed. The
report itself is :mod:`ltlib.analysis.report` (docs/study.md); this module is the command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ltlib.analysis.report import SPLITS, write_report
from ltlib.errors import LtlibError


def _parse_aliases(items: Sequence[str]) -> dict[str, str]:
    aliases = {}
    for item in items:
        name, sep, alias = item.partition("=")
        if not sep or not name or not alias:
            raise LtlibError(f"--alias {item!r} is not NAME=DATASET (e.g. folder=cifar10_lt)")
        aliases[name] = alias
    return aliases


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ltlib.report",
        description="Table of every run under a sweep directory: method x dataset x imbalance ratio, mean ± std "
                    "over seeds, next to the papers' published numbers; missing and failed runs listed.")
    parser.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR")
    parser.add_argument("-o", "--output-dir", default=None, help="where to write (default: SWEEP_DIR/report)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="split of the numbers (default: test)")
    parser.add_argument("--alias", action="append", default=[], metavar="NAME=DATASET",
                        help="report data.name NAME as DATASET (e.g. folder=cifar10_lt, filelist=imagenet_lt; "
                             "repeatable)")
    parser.add_argument("--any-backbone", action="store_true",
                        help="match published numbers whatever their backbone (default: the same backbone)")
    args = parser.parse_args(argv)
    try:
        cells, records, files = write_report(args.sweep_dirs, args.output_dir, split=args.split,
                                             aliases=_parse_aliases(args.alias), any_backbone=args.any_backbone)
    except LtlibError as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        print(f"ltlib: error: {message}", file=sys.stderr)
        return 2
    print(files[0].read_text())
    for path in files:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
