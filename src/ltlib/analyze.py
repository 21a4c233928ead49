"""Diagnostics of finished runs: ``python -m ltlib.analyze RUN_DIR [RUN_DIR ...]``.

For each run directory (written by ``python -m ltlib.run``), the model is rebuilt from the resolved
config saved in ``results.json``, its checkpoint is loaded (the one the run evaluated, or
``--checkpoint best|last|PATH``), and the model is run once over the run's own ``--split`` (test by
default) to compute, per class: accuracy, intra-class compactness of the l2-normalised features (BBN
supplementary B), mean feature norm (FBL figure 2) and classifier weight norms (BBN figure 4, two-head
figure 3). Written into ``--output-dir``:

* ``diagnostics.csv``: one row per run and class (training count, shot group and the values above);
* ``summary.csv``: one row per run (top-1, mean class, many / medium / few accuracy, mean compactness,
  mean feature norm, weight-norm spread);
* ``compactness.png``, ``feature_norms.png``, ``weight_norms.png``, ``accuracy_vs_count.png`` and
  ``shot_accuracy.png``: all runs side by side (runs must share the training data).

Example (BBN figure 6 for the decoupled study's three representations)::

    python -m ltlib.analyze outputs/study/decoupled/<time>/stage1/{ce,rw,rs} -o analysis/compactness

The diagnostics themselves are :mod:`ltlib.analysis.analyze` (``load_run``, ``analyze_run``,
``analyze_runs``); this module is the command line.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
from collections.abc import Sequence

from ltlib.analysis.analyze import SPLITS, analyze_runs
from ltlib.errors import LtlibError, find_user_error


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ltlib.analyze",
        description="Per-class diagnostics of finished ltlib runs (accuracy vs training count, many/medium/few, "
                    "intra-class compactness, feature norms, classifier weight norms): CSV tables and figures.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding results.json")
    parser.add_argument("-o", "--output-dir", default=None,
                        help="where to write (default: RUN_DIR/analysis for one run, analysis/<time> for several)")
    parser.add_argument("--labels", default=None, help="comma-separated labels, one per run (default: the method)")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="split to analyse (default: test; train = training images without augmentation)")
    parser.add_argument("--checkpoint", default="selected",
                        help="selected (the one the run evaluated, default), best, last, or a checkpoint file")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (default: the run's)")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or (os.path.join(args.run_dirs[0], "analysis") if len(args.run_dirs) == 1 else
                                     os.path.join("analysis", datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")))
    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise LtlibError(f"--batch-size={args.batch_size} is out of range; allowed: an integer >= 1")
        labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
        runs, files = analyze_runs(args.run_dirs, output_dir, labels=labels, split=args.split,
                                   checkpoint=args.checkpoint, device=args.device, batch_size=args.batch_size)
    except Exception as exc:  # noqa: BLE001 - user errors (also wrapped by Hydra's instantiate) as one line
        user_error = find_user_error(exc)
        if user_error is None:
            raise
        message = str(user_error).strip().splitlines()[-1] if str(user_error).strip() else "bad input"
        print(f"ltlib: error: {message}", file=sys.stderr)
        return 2
    for label, run in runs.items():
        shots = run.shot_accuracies()
        print(f"{label}: top-1 {100 * run.info['top1']:.2f}%, mean class {100 * run.summary()['mean_class_acc']:.2f}%, "
              + ", ".join(f"{k} {'–' if math.isnan(v) else f'{100 * v:.1f}%'}" for k, v in shots.items())
              + f", mean compactness {run.summary()['mean_compactness']:.4f}")
    for path in files:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
