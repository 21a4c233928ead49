"""Time to accuracy: wall time of complete ltlib runs with their final test accuracy.

Each run is ``python -m ltlib.run`` in a fresh process (CE and BBN on ResNet-32, CIFAR-10-LT with
imbalance ratio 100 from the real CIFAR-10 images of ``../shared/data/cifar10``, 200 epochs, the test
set evaluated after every epoch as the official BBN code does), with the ``timing`` callback
(:class:`ltlib.training.speed.PhaseTimer`) breaking the time down into data, training (forward/backward and
optimiser), evaluation and compile warm-up.

    python benchmarks/time_to_accuracy.py                      # GPU: trainer=gpu_fast, data on the GPU
    python benchmarks/time_to_accuracy.py --loaders device cpu # + the CPU-loader path, for accuracy parity
    python benchmarks/time_to_accuracy.py --smoke              # seconds: 1 epoch of the digits (tests)

The CIFAR-10 images: ``--data-root`` in image-folder layout (``train/<class>/*.jpg``, ``test/...``);
by default ``/tmp/cifar10``, extracted from ``../shared/data/cifar10/cifar10-jpeg.tar.gz`` when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, environment, markdown_table, resolve_device, write_report  # noqa: E402

ARCHIVE_CANDIDATES = (REPO.parent / "shared" / "data" / "cifar10" / "cifar10-jpeg.tar.gz",
                      REPO / "shared" / "data" / "cifar10" / "cifar10-jpeg.tar.gz")
#: ResNet-32 training FLOP per image (forward + backward), the issue's figure.
TRAIN_GFLOP_PER_IMAGE = 0.41


def ensure_cifar10(root: Path) -> Path:
    """``root`` with CIFAR-10 in folder layout, extracted from the shared archive if needed."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    archive = next((a for a in ARCHIVE_CANDIDATES if a.is_file()), None)
    if archive is None:
        raise SystemExit(f"no CIFAR-10 under {root} and no archive at {[str(a) for a in ARCHIVE_CANDIDATES]}")
    print(f"extracting {archive} to {root} ...", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["ce", "bbn"])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--trainer", default=None, help="ltlib trainer config (default: gpu_fast on a GPU, cpu otherwise)")
    p.add_argument("--loaders", nargs="+", default=["auto"], choices=("auto", "device", "cpu"),
                   help="data.loader values to run (each method once per value)")
    p.add_argument("--data-root", type=Path, default=Path("/tmp/cifar10"))
    p.add_argument("--backbone", default="resnet32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-test-every-epoch", dest="test_every_epoch", action="store_false")
    p.add_argument("--sync-steps", action="store_true", help="synchronise around every step for an exact data time")
    p.add_argument("--override", nargs="*", default=[], help="extra ltlib.run overrides for every run")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks/time_to_accuracy"))
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of the runs (default: unset; 1 is far steadier on a shared machine)")
    p.add_argument("--smoke", action="store_true", help="1 epoch of the embedded digits data on the CPU (tests)")
    args = p.parse_args(argv)
    args.device = resolve_device("cpu" if args.smoke else args.device)
    if args.trainer is None:
        args.trainer = "gpu_fast" if args.device.type == "cuda" else "cpu"
    if args.smoke:
        args.epochs, args.backbone = 1, "resnet20"
        args.threads = args.threads or 1
    return args


def run_overrides(args: argparse.Namespace, method: str, loader: str, run_dir: Path) -> list[str]:
    overrides = [f"method={method}", f"backbone={args.backbone}", f"trainer={args.trainer}",
                 f"trainer.max_epochs={args.epochs}", f"data.loader={loader}", f"seed={args.seed}",
                 "callbacks=timing", f"callbacks.timing.test_every_epoch={str(args.test_every_epoch).lower()}",
                 f"callbacks.timing.sync_steps={str(args.sync_steps).lower()}",
                 f"hydra.run.dir={run_dir}"]
    if args.smoke:
        overrides += ["optim.warmup_epochs=0"]
    else:
        overrides += ["data=folder", f"data.root={args.data_root}", "data.imbalance_ratio=100"]
    if args.device.type == "cuda" and args.device.index is not None:
        overrides += [f"trainer.devices=[{args.device.index}]"]
    return overrides + list(args.override)


def run_one(args: argparse.Namespace, method: str, loader: str) -> dict[str, Any]:
    run_dir = (args.out / f"{method}_{loader}").resolve()
    cmd = [sys.executable, "-m", "ltlib.run", *run_overrides(args, method, loader, run_dir)]
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    t = results["timings"]
    streams = 2 if method == "bbn" else 1  # images per training sample (BBN: a uniform and a reversed one)
    train_images = results["splits"]["train"]["size"] * streams * t["epochs"]
    warmup = (t["train_warmup_s"] or 0.0) + (t["eval_warmup_s"] or 0.0)
    return {
        "method": method, "loader": loader, "device": results["device"], "epochs": t["epochs"],
        "process_wall_s": wall, "fit_s": t["fit_s"], "fit_after_warmup_s": t["fit_s"] - warmup,
        "warmup_s": warmup, "train_s": t["train_s"], "data_s": t["data_s"],
        "data_alone_s_per_epoch": t["data_alone_s_per_epoch"],
        "forward_backward_s": t.get("forward_backward_s_estimate"), "eval_s": t["eval_s"],
        "final_eval_s": t["final_eval_s"],
        "test_top1_selected": results["metrics"]["test"]["top1"],
        "test_top1_last_epoch": t.get("test_top1_last_epoch"),
        "train_tflops": (train_images * TRAIN_GFLOP_PER_IMAGE / 1e3 / t["train_s"]) if t["train_s"] else None,
        "run_dir": str(run_dir),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if not args.smoke:
        args.data_root = ensure_cifar10(args.data_root)
    env = environment(args.device)
    print(f"time to accuracy on {env['device']}: methods {args.methods}, {args.epochs} epochs, trainer={args.trainer}, "
          f"loaders {args.loaders}", flush=True)
    rows = [run_one(args, method, loader) for method in args.methods for loader in args.loaders]
    table = markdown_table(
        ["method", "loader", "epochs", "process s", "fit s", "fit s after warm-up", "warm-up s", "train s",
         "data s (in loop)", "data s/epoch (alone)", "eval s", "test top-1 (last epoch)", "test top-1 (best val)",
         "train TFLOP/s"],
        [[r["method"], r["loader"], r["epochs"], r["process_wall_s"], r["fit_s"], r["fit_after_warmup_s"],
          r["warmup_s"], r["train_s"], r["data_s"], r["data_alone_s_per_epoch"], r["eval_s"],
          r["test_top1_last_epoch"], r["test_top1_selected"], r["train_tflops"]] for r in rows])
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": env, "settings": {k: str(v) for k, v in vars(args).items()}, "runs": rows,
              "markdown": table}
    write_report(args.out / "report.json", report)
    print(f"\nreport written to {args.out / 'report.json'}")
    return rows


if __name__ == "__main__":
    main()
