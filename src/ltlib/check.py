"""Check a dataset before a long run: ``python -m ltlib.check data=imagenet_lt data.root=/data/imagenet``.

Composes the same Hydra config as ``python -m ltlib.run`` (the same overrides work), builds the data
module's splits, which parses the split lists or annotation files and checks the subsampling settings,
then opens every image the run would use (training, validation and test) with the decoder training
uses, in parallel threads (:func:`ltlib.data.check.check_data`). Prints one line per split and
the first problems, then a summary.

Exit status: 0 when every image can be read, 1 when some are missing or unreadable, 2 for a
configuration error (an unreadable list, a malformed line, a missing ``data.root``: one line each).

Options: ``--quick`` only checks that each file exists and starts like an image (no full decode, much
faster; misses truncated files), ``--workers N`` threads (default: up to 16), ``--show N`` problems
listed (default 20; all are counted).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ltlib.data.check import check_data
from ltlib.errors import LtlibError, find_user_error


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
