"""Studies made of several ``ltlib.run`` jobs: ``python -m ltlib.study decoupled [options] [overrides]``.

``decoupled``: BBN's decoupled experiment (section 3, figure 2), the representation x classifier grid of
learning manners; see :mod:`ltlib.analysis.study` (the study itself, usable from Python) and docs/study.md.
This module is the command line: argument parsing, the call, one-line errors (exit status 2).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shlex
import sys
from collections.abc import Sequence

from ltlib.analysis.study import (
    CLASSIFIER_MANNERS,
    DEFAULT_MANNERS,
    GRID_METRICS,
    RUNNERS,
    SPLITS,
    decoupled_study,
    grid_markdown,
)
from ltlib.errors import LtlibError


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


STUDIES = ("decoupled",)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m ltlib.study decoupled`` (options and overrides may be intermixed)."""
    dec = argparse.ArgumentParser(
        prog="python -m ltlib.study decoupled",
        description="BBN section 3 / figure 2. Stage 1 trains a representation per learning manner, stage 2 "
                    "re-trains a classifier from scratch on each frozen representation per manner; writes the "
                    "error grid (CSV, markdown, PNG) into the output directory.")
    dec.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="Hydra overrides for every job (data=..., backbone=..., trainer.max_epochs=...)")
    dec.add_argument("--stage1", action="append", default=[], metavar="KEY=VALUE",
                     help="an override for the stage-1 jobs only (repeatable)")
    dec.add_argument("--stage2", action="append", default=[], metavar="KEY=VALUE",
                     help="an override for the stage-2 jobs only (repeatable), e.g. trainer.max_epochs=30")
    dec.add_argument("--transfer", action="append", default=[], metavar="'KEY=VALUE ...'",
                     help="a transfer target: stage-2 overrides (space separated, e.g. 'data=cifar10_lt') "
                          "giving another grid on other data (repeatable; BBN figure 2 right)")
    dec.add_argument("--no-source", action="store_true",
                     help="skip the grid on the stage-1 data (only the --transfer grids)")
    dec.add_argument("--representations", default=",".join(DEFAULT_MANNERS), metavar="M1,M2,...",
                     help="stage-1 method configs (default: ce,rw,rs)")
    dec.add_argument("--classifiers", default=",".join(DEFAULT_MANNERS), metavar="M1,M2,...",
                     help=f"stage-2 manners among {', '.join(CLASSIFIER_MANNERS)} (default: ce,rw,rs)")
    dec.add_argument("--output-dir", default=None,
                     help="study directory (default: outputs/study/decoupled/<time>); rerunning into it "
                          "reuses finished jobs")
    dec.add_argument("--runner", choices=RUNNERS, default="subprocess",
                     help="subprocess: each job in a child process (default); inprocess: in this process")
    dec.add_argument("--split", choices=SPLITS, default="test", help="split of the error rates (default: test)")
    dec.add_argument("--metric", choices=GRID_METRICS, default="top1",
                     help="error = 1 - this metric (default: top1)")
    return dec


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STUDIES:
        usage = f"usage: python -m ltlib.study {{{','.join(STUDIES)}}} [options] [KEY=VALUE ...]"
        if argv and argv[0] in ("-h", "--help"):
            print(usage + "\n\n  decoupled   BBN section 3 / figure 2: representation x classifier learning manners")
            return 0
        print(usage, file=sys.stderr)
        given = repr(argv[0]) if argv else "nothing"
        print(f"ltlib: error: unknown study {given}; available: {', '.join(STUDIES)}", file=sys.stderr)
        return 2
    args = build_parser().parse_intermixed_args(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        output_dir = args.output_dir or os.path.join(
            "outputs", "study", "decoupled", datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
        study = decoupled_study(
            args.overrides, output_dir=output_dir, representations=_split_list(args.representations),
            classifiers=_split_list(args.classifiers), stage1=args.stage1, stage2=args.stage2,
            transfers=[shlex.split(t) for t in args.transfer], include_source=not args.no_source,
            runner=args.runner, split=args.split, metric=args.metric,
            progress=lambda message: print(message, flush=True),
            command=" ".join(shlex.quote(a) for a in ["python", "-m", "ltlib.study", *argv]))
    except LtlibError as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        print(f"ltlib: error: {message}", file=sys.stderr)
        return 2
    print(grid_markdown(study.cells))
    for path in study.files:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
