"""Training throughput: ltlib's Lightning path against a minimal hand-written PyTorch loop.

For each method (ce, bbn, fbl, two_head) the same model (ResNet-32 from ltlib's configs, built exactly
as ``python -m ltlib.run`` builds it), loss, optimiser (SGD, momentum 0.9, weight decay 2e-4, per-step
LR schedule), batch size and data loader are trained

* by ltlib: ``lightning.Trainer`` from ltlib's trainer config (``cpu``, ``gpu`` or ``gpu_fast``), the
  method's ``training_step`` with its logging and metric updates, the CSV logger;
* by a plain loop: ``for batch in loader: loss = ...; zero_grad; backward; step; sched.step()``, the
  loss written out by hand from the method's modules (BBN's two branches, FBL's feature-balanced
  logits, the two-head soft-label and feature-balancing losses),

alternating in one process (ltlib first in even rounds, the plain loop first in odd ones), each
segment timed over ``--steps`` steps after ``--warmup`` steps, the device synchronised at both ends.
Both paths read the same kind of loader (ltlib's device loader, or the CPU DataLoader), so the ratio
measures the training loop's overhead; the loaders themselves are compared in a separate table.
BBN is also run with both sub-batches through the shared trunk in one concatenated pass (plain loop,
``bbn_concat``), to measure that option.

    python benchmarks/throughput.py                    # all four methods on the GPU if any, else CPU
    python benchmarks/throughput.py --methods ce bbn --steps 50 --rounds 5
    python benchmarks/throughput.py --smoke            # seconds; what the test suite runs
    python benchmarks/throughput.py --profile          # + per-step op/kernel counts and top ops

Images per second count every sub-batch (BBN trains on 2 x batch images per step). Ratios are given by
wall time and, for a machine shared with other jobs, by this process's CPU time per image (other
processes inflate wall time, not CPU time; on a GPU the wall-time ratio is the one that counts). Peak
memory is the CUDA allocator's peak per segment (not measured on the CPU).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    add_src_to_path,
    build_method,
    compose,
    environment,
    markdown_table,
    resolve_device,
    synchronize,
    synthetic_source,
    write_report,
)

add_src_to_path()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from torch import Tensor  # noqa: E402

METHODS = ("ce", "bbn", "fbl", "two_head")


# ----------------------------------------------------------------------------------------------------
# Plain losses, written out from the method's modules


def plain_ce(m: Any, batch: Any) -> Tensor:
    images, targets = batch[0], batch[1]
    return F.cross_entropy(m.classifier(m.backbone(images)), targets)


def _bbn_logits(m: Any, f_c: Tensor, f_r: Tensor, alpha: float) -> Tensor:
    if m.classifier.combiner == "paper":
        return m.classifier.conventional(alpha * f_c) + m.classifier.rebalancing((1 - alpha) * f_r)
    return m.classifier.fc(torch.cat((2 * alpha * f_c, 2 * (1 - alpha) * f_r), dim=1))


def plain_bbn(m: Any, batch: Any, concat: bool = False) -> Tensor:
    (x_c, y_c), (x_r, y_r) = batch["conventional"][:2], batch["rebalancing"][:2]
    bb, alpha = m.backbone, 1.0 - 0.0 ** 2  # parabolic decay at epoch 0 (eq. 5)
    if concat:  # one trunk pass over both sub-batches (batch-norm statistics over both)
        shared_c, shared_r = bb.trunk(torch.cat((x_c, x_r))).split([x_c.shape[0], x_r.shape[0]])
    else:
        shared_c, shared_r = bb.trunk(x_c), bb.trunk(x_r)
    logits = _bbn_logits(m, bb.pool(bb.last_block(shared_c)), bb.pool(m.rebalancing_block(shared_r)), alpha)
    return alpha * F.cross_entropy(logits, y_c) + (1 - alpha) * F.cross_entropy(logits, y_r)


def plain_fbl(m: Any, batch: Any) -> Tensor:
    images, targets = batch[0], batch[1]
    features = m.backbone(images)
    crit = m.criterion
    alpha = crit.alpha  # the curriculum's value at epoch 0
    norms = features.norm(dim=1, keepdim=True).clamp(min=crit.eps)
    logits = m.classifier(features) - alpha * crit.lambda_ * crit.class_stimulus / norms
    return F.cross_entropy(logits, targets)


def plain_two_head(m: Any, batch: Any, soft_targets: Tensor) -> Tensor:
    images, targets, indices = batch[0], batch[1], batch[2]
    fmap = m.backbone.forward_features(images)
    cdh = m.classifier(m.backbone.pool(fmap))
    loss = -(soft_targets[indices] * F.log_softmax(cdh.float(), dim=1)).sum(dim=1).mean()
    if m.fbh is not None:
        loss = loss + m.lambda_fbh * F.cross_entropy(m.fbh(fmap), targets)
    return loss


# ----------------------------------------------------------------------------------------------------
# Loaders


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return [to_device(v, device) for v in batch]
    return batch


class PlainLoaders:
    """The plain loop's loaders, built by hand from the data module's dataset and ltlib's samplers:
    a torch DataLoader (CPU path) or a DeviceLoader over images uploaded once."""

    def __init__(self, dm: Any, device: torch.device, channels_last: bool) -> None:
        self.dm, self.device, self.channels_last = dm, device, channels_last
        self._images: Any = None

    def uses_device(self) -> bool:
        from ltlib.data.device_loader import use_device_loader

        return use_device_loader(self.dm.loader, self.dm.train_dataset, self.device)

    def __call__(self, streams: Mapping[str, str], with_index: bool) -> Any:
        from torch.utils.data import DataLoader

        from ltlib.data import MultiStreamDataset, StreamSampler, create_sampler
        from ltlib.data.device_loader import DeviceAugmentation, DeviceImages, DeviceLoader, pool_pixels

        dm = self.dm
        dataset = dm.train_dataset
        dataset.return_index = with_index
        samplers = {name: create_sampler(kind, dataset.targets, dm.seed) for name, kind in streams.items()}
        if self.uses_device():
            if self._images is None:
                pixels = torch.from_numpy(pool_pixels(dataset.pool, dataset.indices)).to(self.device)
                self._images = DeviceImages(pixels, torch.as_tensor(dataset.targets).to(self.device),
                                            DeviceAugmentation.from_transform(dataset.transform))
            return DeviceLoader(self._images, samplers, dm.batch_size, seed=dm.seed, return_index=with_index,
                                channels_last=self.channels_last)
        options = dict(batch_size=dm.batch_size, num_workers=dm.num_workers, pin_memory=self.device.type == "cuda",
                       persistent_workers=dm.num_workers > 0)
        if len(samplers) == 1:
            return DataLoader(dataset, sampler=next(iter(samplers.values())), **options)
        return DataLoader(MultiStreamDataset(dataset, list(samplers)), sampler=StreamSampler(samplers), **options)


# ----------------------------------------------------------------------------------------------------
# Timed segments


@dataclass
class Segment:
    method: str
    path: str
    round: int
    steps: int
    images: int
    seconds: float
    cpu_seconds: float
    peak_mem_mib: float | None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def images_in(batch: Any) -> int:
    if isinstance(batch, Mapping):
        return sum(int(part[1].shape[0]) for part in batch.values())
    return int(batch[1].shape[0])


class _Window:
    """Start/stop a timed window with device synchronisation and the CUDA peak-memory counter."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.t0 = self.t1 = self.c0 = self.c1 = 0.0
        self.images = 0
        self.peak: float | None = None

    def start(self) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        synchronize(self.device)
        self.t1, self.c1 = time.perf_counter(), time.process_time()
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20


class WindowTimer(Callback):
    """Times Lightning training steps ``warmup .. warmup + steps - 1`` (and steps a profiler)."""

    def __init__(self, warmup: int, steps: int, device: torch.device, profiler: Any = None) -> None:
        self.warmup, self.steps = warmup, steps
        self.window = _Window(device)
        self.profiler = profiler

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.warmup <= batch_idx < self.warmup + self.steps:
            self.window.images += images_in(batch)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.profiler is not None:
            self.profiler.step()
        if batch_idx == self.warmup - 1:
            self.window.start()
        elif batch_idx == self.warmup + self.steps - 1:
            self.window.stop()


def run_callbacks(cfg: Any) -> list[Callback]:
    """The callbacks ``ltlib.run`` adds to every run that act during training steps (checkpointing is
    off in these segments: it acts at epoch ends only)."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    callbacks: list[Callback] = [LearningRateMonitor("epoch")]
    try:
        from ltlib.training.callbacks import EpochSeeding, NonFiniteLossGuard
    except ImportError:  # an ltlib without the fault-tolerance callbacks
        return callbacks
    return [*callbacks, EpochSeeding(cfg.seed), NonFiniteLossGuard(int(cfg.trainer.get("log_every_n_steps") or 50))]


def run_ltlib(method: Any, dm: Any, cfg: Any, args: argparse.Namespace, device: torch.device, root: Path,
              profiler: Any = None) -> _Window:
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger
    from omegaconf import OmegaConf

    timer = WindowTimer(args.warmup, args.steps, device, profiler)
    callbacks = [*run_callbacks(cfg), timer]
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.update(max_epochs=1, max_steps=args.warmup + args.steps, limit_val_batches=0,
                       num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False)
    if args.precision:
        trainer_cfg["precision"] = args.precision
    trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=CSVLogger(str(root), name="logs"),
                          default_root_dir=str(root))
    trainer.fit(method, datamodule=dm)
    return timer.window


def run_plain(model: Any, loss_fn: Callable[[Any, Any], Tensor], loader: Any, args: argparse.Namespace,
              device: torch.device, steps_per_epoch: int, profiler: Any = None,
              precision: str | None = None) -> _Window:
    """The hand-written loop: SGD with linear warm-up per step, bf16 autocast with a ``bf16*``
    ``precision`` (the trainer's, so that both paths compute alike)."""
    optim = model.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                                nesterov=optim.nesterov)
    warmup_steps = max(optim.warmup_epochs * steps_per_epoch, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup_steps, 1.0))
    precision = str(precision or args.precision or "32-true")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision.startswith("bf16")
                else torch.autocast(device.type, enabled=False))
    model.train()
    window = _Window(device)
    batches = iter(loader)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            window.start()
        batch = to_device(next(batches), device)
        if step >= args.warmup:
            window.images += images_in(batch)
        with autocast:
            loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if profiler is not None:
            profiler.step()
    window.stop()
    return window


# ----------------------------------------------------------------------------------------------------
# Driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--trainer", default=None,
                   help="ltlib trainer config (default: gpu_fast on a GPU with --fast, gpu without, cpu on the CPU)")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="gpu_fast settings on both paths (bf16, channels_last, compile); default: on for GPUs")
    p.add_argument("--precision", default=None, help="override the trainer's precision (e.g. 32-true, bf16-mixed)")
    p.add_argument("--loader", default=None, choices=("cpu", "device", "auto"),
                   help="data.loader for both paths (default: the data config's, auto)")
    p.add_argument("--backbone", default="resnet32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=None, help="CPU loader workers (default: the data config's)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per segment (default: 2 CPU, 15 GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per segment (default: 6 CPU, 60 GPU)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per method")
    p.add_argument("--imbalance-ratio", type=float, default=100.0)
    p.add_argument("--max-count", type=int, default=5000, help="largest class (CIFAR-10-LT: 5000)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--no-concat", action="store_true", help="skip BBN's one-trunk-pass variant")
    p.add_argument("--profile", action="store_true", help="also profile a few steps of each path")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is far steadier on a machine shared with other jobs)")
    p.add_argument("--smoke", action="store_true", help="tiny settings that run in seconds (tests)")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    gpu = args.device.type == "cuda"
    if args.fast is None:
        args.fast = gpu
    if args.trainer is None:
        args.trainer = ("gpu_fast" if args.fast else "gpu") if gpu else "cpu"
    if args.smoke:
        args.backbone, args.batch_size, args.max_count, args.imbalance_ratio = "resnet20", 8, 30, 10.0
        args.warmup, args.steps, args.rounds, args.profile_steps = 1, 2, 1, 1
        args.num_workers = 0
        args.threads = args.threads or 1
    args.warmup = args.warmup if args.warmup is not None else (15 if gpu else 2)
    args.steps = args.steps if args.steps is not None else (60 if gpu else 6)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")
    return args


def trainer_overrides(args: argparse.Namespace) -> list[str]:
    overrides = [f"trainer={args.trainer}", f"backbone={args.backbone}", "data=cifar10_lt"]
    if args.device.type == "cpu" and args.trainer != "cpu":
        overrides += ["trainer.accelerator=cpu"]
    if args.device.type == "cuda" and args.device.index is not None:
        overrides += [f"trainer.devices=[{args.device.index}]"]
    if not args.fast and args.trainer == "gpu_fast":
        overrides += ["trainer.speed.compile=false", "trainer.speed.channels_last=false"]
    return overrides


def make_datamodule(cfg: Any, args: argparse.Namespace) -> Any:
    from omegaconf import OmegaConf

    from ltlib.data import LongTailDataModule

    params = OmegaConf.to_container(cfg.data, resolve=True)
    for key in ("_target_", "source", "root", "name"):
        params.pop(key, None)
    params.update(imbalance_ratio=args.imbalance_ratio, max_count=None, val_per_class=0,
                  batch_size=args.batch_size)
    if args.num_workers is not None:
        params["num_workers"] = args.num_workers
    if args.loader is not None:
        params["loader"] = args.loader
    dm = LongTailDataModule(synthetic_source(args.num_classes, args.max_count), name="synthetic", **params)
    dm.setup("fit")
    return dm


def speed_settings(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    from ltlib.training.speed import SpeedSettings

    return SpeedSettings.from_mapping(OmegaConf.to_container(cfg.trainer.get("speed") or {}, resolve=True))


def measure_method(name: str, args: argparse.Namespace, root: Path) -> tuple[list[Segment], dict[str, Any]]:
    from ltlib.methods.class_division import soft_cluster_targets
    from ltlib.training.speed import apply_speed_settings

    device = args.device
    cfg = compose(f"method={name}", *trainer_overrides(args))
    dm = make_datamodule(cfg, args)
    method = build_method(cfg, dm)
    plain = copy.deepcopy(method).to(device)  # same initial weights, before any compilation
    settings = speed_settings(cfg) if args.fast else None
    precision = args.precision or cfg.trainer.get("precision")  # the ltlib path's, for the plain loop too
    if settings is not None:
        apply_speed_settings(plain, settings)
    loaders = PlainLoaders(dm, device, channels_last=bool(settings and settings.channels_last))
    streams = dict(method.train_streams)
    with_index = bool(getattr(method, "train_with_index", False))
    steps_per_epoch = math.ceil(len(dm.train_indices) / args.batch_size)
    if args.warmup + args.steps > steps_per_epoch:
        raise SystemExit(f"--warmup + --steps = {args.warmup + args.steps} exceeds the {steps_per_epoch} steps of an "
                         "epoch; lower them or raise --max-count")

    paths: dict[str, Callable[[], _Window]] = {"ltlib": lambda: run_ltlib(method, dm, cfg, args, device, root)}
    if name == "ce":
        losses = {"plain": plain_ce}
    elif name == "bbn":
        losses = {"plain": plain_bbn}
        if not args.no_concat:
            losses["plain_concat"] = lambda m, b: plain_bbn(m, b, concat=True)
    elif name == "fbl":
        losses = {"plain": plain_fbl}
    else:
        plain.fit_clusters(dm.train_targets)
        # soft cluster labels (eq. 4) of every training image, looked up by dataset position
        table = soft_cluster_targets(plain.cluster_assignment, plain.cluster_to_class, plain.clusters_per_class,
                                     plain.alpha)
        losses = {"plain": lambda m, b: plain_two_head(m, b, table)}
    for key, loss_fn in losses.items():
        paths[key] = (lambda fn=loss_fn: run_plain(plain, fn, loaders(streams, with_index), args, device,
                                                   steps_per_epoch, precision=precision))

    segments: list[Segment] = []
    for r in range(args.rounds):
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        for path in order:
            window = paths[path]()
            segments.append(Segment(name, path, r, args.steps, window.images, window.t1 - window.t0,
                                    window.c1 - window.c0, window.peak))
            print(f"  {name:9s} round {r} {path:13s} {segments[-1].images_per_s:10.1f} img/s "
                  f"(CPU time {segments[-1].cpu_seconds:.2f} s)", flush=True)
    extra: dict[str, Any] = {"loader": "device" if loaders.uses_device() else "cpu",
                             "streams": streams, "train_images": len(dm.train_indices)}
    if args.profile:
        extra["profile"] = profile_paths(name, method, plain, losses, loaders, streams, with_index, dm, cfg, args,
                                         root, steps_per_epoch)
    return segments, extra


def profile_paths(name: str, method: Any, plain: Any, losses: dict[str, Callable], loaders: PlainLoaders,
                  streams: dict[str, str], with_index: bool, dm: Any, cfg: Any, args: argparse.Namespace,
                  root: Path, steps_per_epoch: int) -> dict[str, Any]:
    """Per-step op (CPU) or kernel (GPU) counts and the top self-time ops of each path."""
    from torch.profiler import ProfilerActivity, profile, schedule

    device = args.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    report: dict[str, Any] = {}
    n = args.profile_steps
    for path in ("ltlib", "plain"):
        sched = schedule(wait=args.warmup, warmup=0, active=n, repeat=1)
        with profile(activities=activities, schedule=sched) as prof:
            if path == "ltlib":
                run_ltlib(method, dm, cfg, args, device, root, profiler=prof)
            else:
                run_plain(plain, losses["plain"], loaders(streams, with_index), args, device, steps_per_epoch,
                          profiler=prof, precision=args.precision or cfg.trainer.get("precision"))
        averages = prof.key_averages()
        if device.type == "cuda":
            kernels = sum(e.count for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
        else:
            kernels = None
        aten = sum(e.count for e in averages if e.key.startswith("aten::"))
        self_cpu = sum(e.self_cpu_time_total for e in averages) / 1e3
        top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
        report[path] = {
            "cuda_kernels_per_step": None if kernels is None else kernels / n,
            "aten_calls_per_step": aten / n,
            "self_cpu_ms_per_step": self_cpu / n,
            "top_self_cpu": [(e.key, round(e.self_cpu_time_total / 1e3 / n, 3)) for e in top],
        }
    return report


def loader_table(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """Images per second of the loaders alone (BBN's two streams: both sub-batches counted)."""
    cfg = compose("method=bbn", *trainer_overrides(args))
    rows = []
    for kind in ("cpu", "device"):
        a = copy.copy(args)
        a.loader = kind
        dm = make_datamodule(cfg, a)
        loaders = PlainLoaders(dm, args.device, channels_last=False)
        for streams in ({"main": "uniform"}, {"conventional": "uniform", "rebalancing": "reversed"}):
            loader = loaders(streams, False)
            batches = iter(loader)
            next(batches)
            count = min(len(loader) - 1, max(args.steps, 2))
            synchronize(args.device)
            t0 = time.perf_counter()
            images = sum(images_in(to_device(next(batches), args.device)) for _ in range(count))
            synchronize(args.device)
            rows.append({"loader": kind, "streams": len(streams), "images_per_s": images / (time.perf_counter() - t0)})
    return rows


def summarise(segments: list[Segment]) -> list[dict[str, Any]]:
    rows = []
    for method in dict.fromkeys(s.method for s in segments):
        mine = [s for s in segments if s.method == method]
        by_round: dict[int, dict[str, Segment]] = {}
        for s in mine:
            by_round.setdefault(s.round, {})[s.path] = s
        for path in dict.fromkeys(s.path for s in mine):
            rates = [s.images_per_s for s in mine if s.path == path]
            pairs = [(r["ltlib"], r[path]) for r in by_round.values() if path != "ltlib" and "ltlib" in r and path in r]
            ratios = [a.images_per_s / b.images_per_s for a, b in pairs]
            # Per image, CPU time of this process: insensitive to other jobs on a shared machine.
            cpu_ratios = [(b.cpu_seconds / b.images) / (a.cpu_seconds / a.images) for a, b in pairs]
            peaks = [s.peak_mem_mib for s in mine if s.path == path and s.peak_mem_mib is not None]
            steps_per_s = [s.steps / s.seconds for s in mine if s.path == path]
            rows.append({
                "method": method, "path": path,
                "images_per_s": statistics.median(rates), "steps_per_s": statistics.median(steps_per_s),
                "ltlib_over_path_median": statistics.median(ratios) if ratios else None,
                "ltlib_over_path_min": min(ratios) if ratios else None,
                "ltlib_over_path_max": max(ratios) if ratios else None,
                "ltlib_over_path_cpu_time_median": statistics.median(cpu_ratios) if cpu_ratios else None,
                "ltlib_over_path_cpu_time_min": min(cpu_ratios) if cpu_ratios else None,
                "ltlib_over_path_cpu_time_max": max(cpu_ratios) if cpu_ratios else None,
                # Best (least disturbed) segment of each path: other jobs only ever add time.
                "ltlib_over_path_cpu_time_best": (min(b.cpu_seconds / b.images for _, b in pairs)
                                                  / min(a.cpu_seconds / a.images for a, _ in pairs)) if pairs else None,
                "peak_mem_mib": max(peaks) if peaks else None,
            })
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = environment(args.device)
    print(f"throughput on {env['device']}: trainer={args.trainer} fast={args.fast} batch={args.batch_size} "
          f"warmup={args.warmup} steps={args.steps} rounds={args.rounds}", flush=True)
    segments: list[Segment] = []
    extras: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            found, extras[name] = measure_method(name, args, Path(tmp))
            segments += found
        loaders = loader_table(args, Path(tmp))
    env["load_average_end"] = environment(args.device).get("load_average")
    rows = summarise(segments)
    report = {
        "environment": env,
        "settings": {k: (str(v) if isinstance(v, Path | torch.device) else v) for k, v in vars(args).items()},
        "summary": rows, "loaders": loaders, "per_method": extras,
        "segments": [asdict(s) | {"images_per_s": s.images_per_s} for s in segments],
    }
    print()
    print(markdown_table(["method", "path", "images/s", "steps/s", "ltlib / path: wall (median)", "min", "max",
                          "CPU time (median)", "min", "max", "CPU time (best segments)", "peak MiB"],
                         [[r["method"], r["path"], r["images_per_s"], r["steps_per_s"], r["ltlib_over_path_median"],
                           r["ltlib_over_path_min"], r["ltlib_over_path_max"], r["ltlib_over_path_cpu_time_median"],
                           r["ltlib_over_path_cpu_time_min"], r["ltlib_over_path_cpu_time_max"],
                           r["ltlib_over_path_cpu_time_best"], r["peak_mem_mib"]] for r in rows]))
    print()
    print(markdown_table(["loader", "streams", "images/s"],
                         [[r["loader"], r["streams"], r["images_per_s"]] for r in loaders]))
    if args.profile:
        for name, extra in extras.items():
            for path, prof in extra.get("profile", {}).items():
                print(f"\n{name} {path}: {prof['aten_calls_per_step']:.0f} aten calls/step, "
                      f"{prof['self_cpu_ms_per_step']:.1f} ms self CPU/step, CUDA kernels/step "
                      f"{prof['cuda_kernels_per_step']}; top: {prof['top_self_cpu'][:5]}")
    if args.out is not None:
        write_report(args.out, report)
        print(f"\nreport written to {args.out}")
    return report


if __name__ == "__main__":
    main()
