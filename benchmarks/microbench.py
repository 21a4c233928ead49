"""What the device can sustain for ResNet-32's shapes, and the floors of a 200-epoch BBN run.

Measures, on the GPU if there is one (else the CPU):

* every distinct 3x3 convolution of ResNet-32 at the training batch (forward + input and weight
  gradients), in float32 (TF32 where the matmul precision allows) and bfloat16, channels_last:
  achieved TFLOP/s per shape and for a whole step's mix of them;
* a whole eager ResNet-32 training step (CE, SGD), its images/s and TFLOP/s (0.41 GFLOP per image);
* the number of kernels (GPU) or ATen calls (CPU) one eager CE step and one BBN step issue;
* kernel-launch latency (a 1-element add, 10,000 times, host-bound), and per kernel inside a CUDA
  graph replay; device memory bandwidth (a large copy).

From these it prints the floors of a 200-epoch BBN run on CIFAR-10-LT (12,406 images, 2 streams):
compute (total FLOP / sustained rate), launch latency (kernels per step x steps x latency, what CUDA
graphs remove) and an activation-traffic estimate against the bandwidth.

    python benchmarks/microbench.py             # on the GPU if any
    python benchmarks/microbench.py --smoke     # seconds (tests)
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    add_src_to_path,
    environment,
    markdown_table,
    resolve_device,
    synchronize,
    write_report,
)

add_src_to_path()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

#: CIFAR-10-LT (ratio 100) training images, BBN's streams, epochs: the run the floors are computed for.
CIFAR10_LT_TRAIN, CIFAR10_TEST, BBN_STREAMS, EPOCHS = 12406, 10000, 2, 200
TRAIN_GFLOP_PER_IMAGE = 0.41


@dataclass(frozen=True)
class ConvShape:
    """A 3x3 convolution of ResNet-32: channels in/out, input size, stride, and how often it occurs."""

    c_in: int
    c_out: int
    size: int
    stride: int
    count: int

    @property
    def out_size(self) -> int:
        return self.size // self.stride

    def train_flop(self, batch: int) -> float:
        """Forward + input gradient + weight gradient: 3 x 2 x MACs."""
        macs = batch * self.c_out * self.out_size ** 2 * self.c_in * 9
        return 3 * 2 * macs

    def activation_elements(self, batch: int) -> int:
        return batch * (self.c_in * self.size ** 2 + self.c_out * self.out_size ** 2)


#: ResNet-32 (n = 5 blocks per stage): the stem, then per stage 2n convolutions.
RESNET32_CONVS = (
    ConvShape(3, 16, 32, 1, 1),
    ConvShape(16, 16, 32, 1, 10),
    ConvShape(16, 32, 32, 2, 1),
    ConvShape(32, 32, 16, 1, 9),
    ConvShape(32, 64, 16, 2, 1),
    ConvShape(64, 64, 8, 1, 9),
)


def timed(fn: Any, device: torch.device, iters: int, warmup: int = 3) -> float:
    """Seconds per call of ``fn`` (median of 3 repeats of ``iters`` calls, device synchronised)."""
    for _ in range(warmup):
        fn()
    results = []
    for _ in range(3):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        synchronize(device)
        results.append((time.perf_counter() - t0) / iters)
    return sorted(results)[1]


def conv_table(device: torch.device, batch: int, dtypes: list[torch.dtype], iters: int) -> list[dict[str, Any]]:
    rows = []
    for dtype in dtypes:
        for shape in RESNET32_CONVS:
            x = torch.randn(batch, shape.c_in, shape.size, shape.size, device=device, dtype=dtype,
                            requires_grad=True).contiguous(memory_format=torch.channels_last)
            conv = nn.Conv2d(shape.c_in, shape.c_out, 3, shape.stride, 1, bias=False).to(
                device=device, dtype=dtype, memory_format=torch.channels_last)
            grad = torch.randn(batch, shape.c_out, shape.out_size, shape.out_size, device=device,
                               dtype=dtype).contiguous(memory_format=torch.channels_last)

            def step(conv: nn.Module = conv, x: torch.Tensor = x, grad: torch.Tensor = grad) -> None:
                conv(x).backward(grad)

            seconds = timed(step, device, iters)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "shape": f"{shape.c_in}->{shape.c_out} @"
                         f"{shape.size}x{shape.size} s{shape.stride}", "count": shape.count,
                         "ms": seconds * 1e3, "tflops": shape.train_flop(batch) / seconds / 1e12,
                         "step_ms": seconds * 1e3 * shape.count})
    return rows


def model_step(device: torch.device, batch: int, dtype: torch.dtype | None, iters: int,
               compile_model: bool = False) -> dict[str, Any]:
    """A whole eager (or compiled) ResNet-32 CE training step, channels_last, autocast to ``dtype``."""
    from ltlib.backbones import create_backbone

    torch.manual_seed(0)
    backbone = create_backbone("resnet32").to(device, memory_format=torch.channels_last)
    head = nn.Linear(backbone.out_dim, 10).to(device)
    if compile_model:
        backbone.compile()
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=2e-4)
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(head(backbone(x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = timed(step, device, iters, warmup=5 if compile_model else 3)
    return {"dtype": "fp32" if dtype is None else str(dtype).removeprefix("torch."), "compiled": compile_model,
            "ms": seconds * 1e3, "images_per_s": batch / seconds,
            "tflops": batch * TRAIN_GFLOP_PER_IMAGE * 1e9 / seconds / 1e12}


def kernels_per_step(device: torch.device, batch: int) -> dict[str, float]:
    """Kernels (GPU) or ATen calls (CPU) of one eager CE step and one BBN step (two trunk passes)."""
    from torch.profiler import ProfilerActivity, profile

    from ltlib.backbones import create_backbone

    backbone = create_backbone("resnet32").to(device)
    block = backbone.copy_last_block().to(device)
    head = nn.Linear(2 * backbone.out_dim, 10).to(device)
    optimizer = torch.optim.SGD([*backbone.parameters(), *block.parameters(), *head.parameters()], lr=0.01,
                                momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def ce() -> None:
        f = backbone(x)
        loss = F.cross_entropy(head(torch.cat((f, f), 1)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def bbn() -> None:
        f_c = backbone.pool(backbone.last_block(backbone.trunk(x)))
        f_r = backbone.pool(block(backbone.trunk(x)))
        logits = head(torch.cat((f_c, f_r), 1))
        loss = 0.5 * F.cross_entropy(logits, y) + 0.5 * F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    out = {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, fn in (("ce", ce), ("bbn", bbn)):
        fn()
        synchronize(device)
        with profile(activities=activities) as prof:
            fn()
            synchronize(device)
        averages = prof.key_averages()
        if device.type == "cuda":
            out[name] = float(sum(e.count for e in averages if e.device_type == torch.autograd.DeviceType.CUDA))
        else:
            out[name] = float(sum(e.count for e in averages if e.key.startswith("aten::")))
    return out


def launch_latency(device: torch.device, launches: int) -> dict[str, float | None]:
    """Microseconds per launch of a 1-element add (host-bound), and per kernel replayed in a CUDA graph."""
    x = torch.zeros(1, device=device)
    seconds = timed(lambda: [x.add_(1.0) for _ in range(launches)], device, 1, warmup=1)
    out: dict[str, float | None] = {"eager_us": seconds / launches * 1e6, "graph_us": None}
    if device.type == "cuda":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                x.add_(1.0)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        per_graph = 100
        with torch.cuda.graph(graph):
            for _ in range(per_graph):
                x.add_(1.0)
        replays = max(launches // per_graph, 1)
        seconds = timed(lambda: [graph.replay() for _ in range(replays)], device, 1, warmup=1)
        out["graph_us"] = seconds / (replays * per_graph) * 1e6
    return out


def bandwidth(device: torch.device, mib: int) -> float:
    """GB/s of a device-to-device copy (read + write counted)."""
    a = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    seconds = timed(lambda: b.copy_(a), device, 5)
    return 2 * a.numel() / seconds / 1e9


def floors(sustained_tflops: float, kernels_bbn: float, latency_us: float, bandwidth_gbs: float,
           batch: int, act_bytes_per_image: float) -> dict[str, float]:
    """Lower bounds on a 200-epoch BBN run (CIFAR-10-LT, batch ``batch`` per stream, test every epoch)."""
    train_images = EPOCHS * CIFAR10_LT_TRAIN * BBN_STREAMS
    # BBN inference: trunk once, both last blocks (~ a forward pass and a bit): 1/3 of training FLOP.
    flop = train_images * TRAIN_GFLOP_PER_IMAGE * 1e9 + EPOCHS * CIFAR10_TEST * TRAIN_GFLOP_PER_IMAGE / 3 * 1e9
    steps = EPOCHS * -(-CIFAR10_LT_TRAIN // batch)
    return {
        "total_pflop": flop / 1e15,
        "steps": steps,
        "compute_floor_s": flop / (sustained_tflops * 1e12),
        "launch_floor_s": steps * kernels_bbn * latency_us * 1e-6,
        "bandwidth_floor_s": (train_images + EPOCHS * CIFAR10_TEST / 3) * act_bytes_per_image / (bandwidth_gbs * 1e9),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--iters", type=int, default=None, help="calls per timing (default: 20 GPU, 2 CPU)")
    p.add_argument("--launches", type=int, default=10000)
    p.add_argument("--bandwidth-mib", type=int, default=None, help="copy size (default: 1024 GPU, 64 CPU)")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd model step")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--smoke", action="store_true", help="seconds; for the tests")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    gpu = args.device.type == "cuda"
    if args.smoke:
        args.batch_size, args.iters, args.launches, args.bandwidth_mib = 4, 1, 200, 4
        args.threads = args.threads or 1
    args.iters = args.iters or (20 if gpu else 2)
    args.bandwidth_mib = args.bandwidth_mib or (1024 if gpu else 64)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    env = environment(device)
    print(f"microbench on {env['device']}, batch {args.batch_size}", flush=True)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    convs = conv_table(device, args.batch_size, dtypes, args.iters)
    steps = [model_step(device, args.batch_size, None, args.iters)]
    if device.type == "cuda":
        steps.append(model_step(device, args.batch_size, torch.bfloat16, args.iters))
        if args.compile:
            steps.append(model_step(device, args.batch_size, torch.bfloat16, args.iters, compile_model=True))
    kernels = kernels_per_step(device, args.batch_size)
    latency = launch_latency(device, args.launches)
    gbs = bandwidth(device, args.bandwidth_mib)
    best_dtype = "bfloat16" if device.type == "cuda" else "float32"
    mix = [r for r in convs if r["dtype"] == best_dtype]
    mix_flop = sum(s.train_flop(args.batch_size) * s.count for s in RESNET32_CONVS)
    sustained = mix_flop / (sum(r["step_ms"] for r in mix) / 1e3) / 1e12
    # Activation traffic per image and step: every conv/BN/ReLU/residual pass reads and writes each
    # activation about 10 times over forward and backward (bf16: 2 bytes) -- an estimate, not a measurement.
    act_bytes = 10 * 2 * sum(s.activation_elements(1) * s.count for s in RESNET32_CONVS)
    floor = floors(sustained, kernels["bbn"], latency["eager_us"], gbs, args.batch_size, act_bytes)
    report = {"environment": env, "batch_size": args.batch_size, "convolutions": convs, "model_steps": steps,
              "kernels_per_step": kernels, "launch_latency_us": latency, "bandwidth_gbs": gbs,
              "conv_mix_tflops": sustained, "floors_200_epoch_bbn": floor}
    print(markdown_table(["dtype", "conv (fwd+bwd)", "count", "ms", "TFLOP/s"],
                         [[r["dtype"], r["shape"], r["count"], r["ms"], r["tflops"]] for r in convs]))
    print(f"\nResNet-32 conv mix ({best_dtype}): {sustained:.3g} TFLOP/s sustained")
    print(markdown_table(["step", "compiled", "ms", "images/s", "TFLOP/s"],
                         [[s["dtype"], s["compiled"], s["ms"], s["images_per_s"], s["tflops"]] for s in steps]))
    unit = "CUDA kernels" if device.type == "cuda" else "ATen calls"
    print(f"\n{unit} per step: CE {kernels['ce']:.0f}, BBN {kernels['bbn']:.0f}; launch latency "
          f"{latency['eager_us']:.2f} us eager, {latency['graph_us']} us in a CUDA graph; bandwidth {gbs:.1f} GB/s")
    print(f"200-epoch BBN (CIFAR-10-LT): {floor['total_pflop']:.2f} PFLOP, {floor['steps']} steps; floors: compute "
          f"{floor['compute_floor_s']:.1f} s, launch {floor['launch_floor_s']:.1f} s, bandwidth (est.) "
          f"{floor['bandwidth_floor_s']:.1f} s")
    if args.out is not None:
        write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
