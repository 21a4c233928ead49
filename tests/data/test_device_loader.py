"""The device-resident loader on CPU tensors against the CPU path: augmentation (exact per image, and its
statistics), sampler indices and class frequencies, epoch lengths, batch structure, Lightning's epochs,
DDP sharding with two gloo processes, and the data.loader switch."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats
from tests.conftest import free_port, gather_on_rank0
from torch import nn
from torch.utils.data import Sampler

from ltlib.data import ArrayPool, LongTailDataModule, create_sampler, image_folder_pools, list_samplers
from ltlib.data.device_loader import (
    DeviceAugmentation,
    DeviceImages,
    DeviceLoader,
    use_device_loader,
)
from ltlib.data.samplers import IndexSampler, epoch_indices, mix_seed, seeded_generator
from ltlib.errors import LtlibError

REPO = Path(__file__).resolve().parents[2]
SAMPLERS = (*list_samplers(), "uniform>reversed@2")  # every registered sampler and a deferred spec


def coded_image(size: int, channels: int) -> np.ndarray:
    """Channel 0 codes the row (16 r + 8), channel 1 the column, channel 2 is 200: every pixel of a crop
    says where it came from, and zero padding (0 everywhere) is recognisable."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    image = np.stack([rows * 8 + 4, cols * 8 + 4, np.full_like(rows, 200)], axis=-1).astype(np.uint8)
    return image if channels == 3 else image[..., 0]


def repeated_source(image: np.ndarray, copies: int) -> Callable[[], tuple[ArrayPool, ArrayPool]]:
    def source() -> tuple[ArrayPool, ArrayPool]:
        targets = np.arange(copies) % 2
        train = ArrayPool(np.repeat(image[None], copies, axis=0), targets, ["a", "b"])
        return train, ArrayPool(np.repeat(image[None], 4, axis=0), np.arange(4) % 2, ["a", "b"])

    return source


def make_dm(source: Callable, loader: str, augmentation: str = "cifar", channels: int = 3, **kwargs) -> LongTailDataModule:
    stats_ = {"mean": (0.4, 0.5, 0.6)[:channels], "std": (0.2, 0.25, 0.3)[:channels]}
    options = {"imbalance_ratio": None, "val_per_class": 0, "batch_size": 64, "augmentation": augmentation,
               "loader": loader, "seed": 3} | stats_ | kwargs
    dm = LongTailDataModule(source, **options)
    dm.setup("fit")
    return dm


def decode_views(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, padding: int) -> np.ndarray:
    """(top, left, flip) of every augmented coded image ``[B, C, S, S]``, read back from its pixels."""
    pixels = torch.round((images * std + mean) * 255).to(torch.int64)
    views = []
    for img in pixels:
        valid = img[0] > 0
        r, c = [int(v) for v in torch.nonzero(valid)[0]]
        src_row = (int(img[0, r, c]) - 4) // 8
        c_values = img[1, r][valid[r]]
        flip = len(c_values) > 1 and int(c_values[1]) < int(c_values[0])
        src_col = (int(img[1, r, c]) - 4) // 8
        size = img.shape[-1]
        left = padding + src_col - (size - 1 - c if flip else c)
        views.append((padding + src_row - r, left, int(flip)))
    return np.array(views)


def expected_view(image: np.ndarray, top: int, left: int, flip: int, padding: int, size: int,
                  mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """torchvision's crop/flip of the PIL image with the given parameters, then ToTensor + Normalize."""
    pil = Image.fromarray(image)
    pil = TF.crop(TF.pad(pil, padding, fill=0), top, left, size, size)
    if flip:
        pil = TF.hflip(pil)
    return (TF.to_tensor(pil) - mean) / std


def cpu_and_device_views(augmentation: str, size: int, channels: int, copies: int = 3000):
    image = coded_image(size, channels)
    out = {}
    for loader in ("cpu", "device"):
        dm = make_dm(repeated_source(image, copies), loader, augmentation, channels, batch_size=500)
        out[loader] = torch.cat([batch[0] for batch in dm.train_dataloader()])
    return image, out, dm


@pytest.mark.parametrize(("augmentation", "size", "channels", "padding"), [("cifar", 32, 3, 4), ("digits", 8, 1, 1)])
def test_augmentation_statistics_match_the_cpu_path(augmentation, size, channels, padding):
    image, views, dm = cpu_and_device_views(augmentation, size, channels)
    cpu, dev = views["cpu"], views["device"]
    assert dev.shape == cpu.shape and dev.dtype == cpu.dtype
    # per-pixel means over 3,000 draws agree within sampling error
    se = torch.sqrt((cpu.var(0) + dev.var(0)) / len(cpu)).clamp(min=1e-6)
    z = ((cpu.mean(0) - dev.mean(0)) / se).abs()
    assert z.max() < 5.5, float(z.max())
    if channels == 1:
        return
    mean, std = torch.tensor(dm.mean).view(-1, 1, 1), torch.tensor(dm.std).view(-1, 1, 1)
    params = {k: decode_views(v, mean, std, padding) for k, v in views.items()}
    # every device view is exactly torchvision's crop (+ flip) of the image with its parameters
    for (top, left, flip), got in zip(params["device"][:200], dev[:200], strict=True):
        assert torch.equal(got, expected_view(image, top, left, flip, padding, size, mean, std))
    # crop offsets uniform over 0..2p on both paths, and the same distribution; flips at rate 0.5
    for column, name in ((0, "top"), (1, "left")):
        counts = [np.bincount(params[k][:, column], minlength=2 * padding + 1) for k in ("cpu", "device")]
        assert all(len(c) == 2 * padding + 1 for c in counts), name
        assert stats.chisquare(counts[1]).pvalue > 1e-3, (name, counts[1])
        assert stats.chi2_contingency(np.array(counts)).pvalue > 1e-3, (name, counts)
    flips = [int(params[k][:, 2].sum()) for k in ("cpu", "device")]
    assert all(stats.binomtest(f, len(dev), 0.5).pvalue > 1e-3 for f in flips), flips


def test_digits_views_are_exact_crops_without_flips():
    image, views, dm = cpu_and_device_views("digits", 8, 1, copies=400)
    mean, std = torch.tensor(dm.mean), torch.tensor(dm.std)
    pixels = torch.round((views["device"][:, 0] * std + mean) * 255).to(torch.int64)
    padded = np.pad(image, 1)
    seen = set()
    for view in pixels.numpy():
        matches = [(t, left) for t in range(3) for left in range(3)
                   if np.array_equal(padded[t:t + 8, left:left + 8], view)]
        assert matches, "a device view is not a crop of the padded image"
        seen.update(matches)
    assert len(seen) == 9  # every offset in 0..2 x 0..2 occurs


@pytest.mark.parametrize("channels", [3, 1])
def test_evaluation_batches_are_bit_identical(array_pools, channels):
    def source():
        return array_pools([30, 12, 5], test_per_class=7, size=12, channels=channels)

    batches = {}
    for loader in ("cpu", "device"):
        dm = make_dm(source, loader, "cifar", channels, val_per_class=2, imbalance_ratio=6.0, eval_batch_size=8)
        batches[loader] = [list(dm.test_dataloader()), list(dm.val_dataloader())]
    for cpu_split, dev_split in zip(*batches.values(), strict=True):
        assert len(cpu_split) == len(dev_split)
        for (x_c, y_c), (x_d, y_d) in zip(cpu_split, dev_split, strict=True):
            assert torch.equal(x_c, x_d) and torch.equal(y_c, y_d)


# ---------------------------------------------------------------------------------------------------
# Samplers


def lt_targets() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.permutation(np.repeat(np.arange(6), [200, 90, 40, 18, 8, 4]))


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("world_size", [1, 2])
def test_indices_are_those_of_the_cpu_sampler(name, world_size):
    targets = lt_targets()
    for rank in range(world_size):
        sampler = create_sampler(name, targets, seed=7, rank=rank, world_size=world_size)
        for epoch in range(4):
            sampler.set_epoch(epoch)
            expected = list(sampler)
            assert sampler.indices(epoch, "cpu").tolist() == expected, (name, rank, epoch)
            assert sampler.indices(epoch, "cpu").dtype == torch.int64


@pytest.mark.parametrize("name", ["class_balanced", "reversed", "square_root"])
def test_class_frequencies_follow_the_sampler(name):
    targets = lt_targets()
    sampler = create_sampler(name, targets, seed=0)
    drawn = torch.cat([sampler.indices(e, "cpu") for e in range(20)])
    observed = np.bincount(targets[drawn.numpy()], minlength=6)
    counts = np.bincount(targets).astype(float)
    weights = {"class_balanced": np.ones(6), "reversed": counts.max() / counts, "square_root": np.sqrt(counts)}[name]
    expected = weights / weights.sum() * observed.sum()
    assert stats.chisquare(observed, expected).pvalue > 1e-3, (observed, expected.round())


def test_a_sampler_of_another_kind_is_drawn_on_the_host():
    class EveryThird(Sampler[int]):
        def __init__(self) -> None:
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __len__(self) -> int:
            return 5

        def __iter__(self):
            return iter(range(self.epoch, self.epoch + 15, 3))

    assert epoch_indices(EveryThird(), 2, "cpu").tolist() == [2, 5, 8, 11, 14]


class Strided(IndexSampler):
    """A sampler written after the device loader: a random offset per epoch, then every 3rd image."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples, self.seed = num_samples, seed

    def __len__(self) -> int:
        return self.num_samples // 3

    def indices(self, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        start = torch.randint(0, 3, (), generator=seeded_generator(device, mix_seed(self.seed, epoch)), device=device)
        return start + 3 * torch.arange(len(self), device=device)


def test_a_new_index_sampler_runs_on_both_paths_unchanged():
    sampler = Strided(30, seed=4)
    loader = DeviceLoader(DeviceImages(torch.zeros(30, 2, 2, 3, dtype=torch.uint8), torch.zeros(30, dtype=torch.long),
                                       DeviceAugmentation((0.0,) * 3, (1.0,) * 3)),
                          {"main": sampler}, 4, return_index=True)
    orders = set()
    for epoch in range(4):
        loader.set_epoch(epoch)
        positions = torch.cat([index for _, _, index in loader]).tolist()
        assert positions == list(sampler) == list(loader.sampler), epoch  # set_epoch reached the sampler too
        orders.add(tuple(positions))
    assert len(orders) > 1


# ---------------------------------------------------------------------------------------------------
# Epochs, structure, determinism


def attach(dm: LongTailDataModule, streams: dict[str, str], with_index: bool = False, rank: int = 0,
           world_size: int = 1) -> None:
    """What a Trainer gives the data module: the module's streams, train_with_index, rank and device."""
    module = type("Module", (), {"train_streams": streams, "train_with_index": with_index})()
    strategy = type("Strategy", (), {"root_device": torch.device("cpu")})()
    dm.trainer = type("Trainer", (), {"lightning_module": module, "global_rank": rank, "world_size": world_size,
                                      "strategy": strategy})()


@pytest.mark.parametrize("name", [*list_samplers(), "square_root>class_balanced@1"])  # the spec switches
def test_device_loader_positions_equal_the_dataloaders_per_rank_and_epoch(array_source, name):
    """The whole pipeline: the DataLoader's batches and the device loader's (device "cpu") carry the same
    dataset positions, epoch by epoch, on both ranks of a world of 2 (streams "main" and "x")."""
    streams = {"main": name, "x": "uniform"}
    for rank in (0, 1):
        positions = {}
        for loader_kind in ("cpu", "device"):
            dm = make_dm(array_source([41, 20, 9, 5], size=8), loader_kind, batch_size=8, image_size=8)
            attach(dm, streams, with_index=True, rank=rank, world_size=2)
            loader = dm.train_dataloader()
            assert type(loader).__name__ == ("DataLoader" if loader_kind == "cpu" else "DeviceLoader")
            per_epoch = []
            for epoch in (0, 1):
                loader.sampler.set_epoch(epoch)
                per_epoch.append({s: torch.cat([b[s][2] for b in loader]).tolist() for s in streams})
            positions[loader_kind] = per_epoch
        assert positions["device"] == positions["cpu"], (name, rank)
        assert len(positions["cpu"][0]["main"]) == math.ceil(75 / 2)
        assert positions["cpu"][0] != positions["cpu"][1]


@pytest.mark.parametrize("streams", [{"main": "uniform"}, {"a": "uniform", "b": "reversed"},
                                     {"main": "uniform>class_balanced@1"}])
@pytest.mark.parametrize(("batch_size", "drop_last"), [(16, False), (16, True), (7, False)])
@pytest.mark.parametrize("with_index", [False, True])
def test_epochs_and_batches_have_the_cpu_structure(array_source, streams, batch_size, drop_last, with_index):
    loaders = {}
    for loader in ("cpu", "device"):
        dm = make_dm(array_source([40, 21, 9, 5], size=8), loader, batch_size=batch_size, drop_last=drop_last,
                     image_size=8)
        attach(dm, streams, with_index)
        loaders[loader] = dm.train_dataloader()
    cpu, dev = loaders["cpu"], loaders["device"]
    assert len(dev) == len(cpu)
    for epoch in (0, 1):
        cpu.sampler.set_epoch(epoch)
        dev.sampler.set_epoch(epoch)
        cpu_batches, dev_batches = list(cpu), list(dev)
        assert len(dev_batches) == len(cpu_batches) == len(cpu)
        for c, d in zip(cpu_batches, dev_batches, strict=True):
            assert type(c) is type(d)
            if isinstance(c, dict):
                assert list(c) == list(d) == list(streams)
            for cp, dp in zip(c.values(), d.values(), strict=True) if isinstance(c, dict) else [(c, d)]:
                assert isinstance(dp, list) and len(dp) == len(cp) == 2 + with_index
                assert dp[0].shape == cp[0].shape and dp[0].dtype == cp[0].dtype
                for cpu_t, dev_t in zip(cp[1:], dp[1:], strict=True):  # same indices -> same labels, positions
                    assert torch.equal(dev_t, cpu_t) and dev_t.dtype == cpu_t.dtype


def test_train_with_index_appends_dataset_positions(array_source):
    dm = make_dm(array_source([30, 10, 4], size=8), "device", batch_size=8, image_size=8)
    attach(dm, {"main": "class_balanced"}, with_index=True)
    for images, targets, index in dm.train_dataloader():
        assert torch.equal(torch.as_tensor(dm.train_targets)[index], targets)
        assert index.dtype == torch.int64 and images.shape[0] == index.shape[0]


def test_epochs_are_deterministic_and_differ():
    image = coded_image(16, 3)
    dm = make_dm(repeated_source(image, 64), "device", batch_size=16, image_size=16)
    loader = dm.train_dataloader()
    first = [b[0] for b in loader]
    again = [b[0] for b in loader]
    loader.sampler.set_epoch(1)
    other = [b[0] for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    state = torch.random.get_rng_state()
    list(loader)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched


def test_channels_last_model_gets_channels_last_images(array_source):
    dm = make_dm(array_source([20, 6], size=8), "device", batch_size=8, image_size=8)
    plain = dm.train_dataloader()
    images = DeviceImages(plain.images.pixels[:, 4:-4, 4:-4], plain.images.targets, plain.images.augmentation)
    sampler = create_sampler("uniform", dm.train_targets, 0)
    a = next(iter(DeviceLoader(images, {"m": sampler}, 8, seed=1)))[0]
    b = next(iter(DeviceLoader(images, {"m": sampler}, 8, seed=1, channels_last=True)))[0]
    assert a.is_contiguous() and b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous()
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# Lightning and DDP


class Recorder(L.LightningModule):
    """Records the dataset positions of every training batch, per epoch."""

    train_with_index = True
    train_streams = {"u": "uniform", "r": "reversed"}

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        for part in batch.values():
            self.seen.setdefault(self.current_epoch, []).extend(part[2].tolist())
        return self.layer(batch["u"][0].mean(dim=(2, 3))).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_sets_the_epoch_of_the_device_loader(array_source):
    dm = make_dm(array_source([30, 12, 5], size=8), "device", batch_size=8, image_size=8)
    module = Recorder()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert type(trainer.train_dataloader).__name__ == "DeviceLoader"
    targets = torch.as_tensor(dm.train_targets)
    for epoch in range(3):
        expected = [create_sampler(kind, dm.train_targets, dm.seed, stream=name)  # each stream its own seed
                    for name, kind in Recorder.train_streams.items()]
        for s in expected:
            s.set_epoch(epoch)
        u, r = (s.indices(epoch, targets.device).tolist() for s in expected)
        interleaved = [i for b in range(0, len(u), 8) for i in (*u[b:b + 8], *r[b:b + 8])]
        assert module.seen[epoch] == interleaved, epoch


WORLD = 2


def ddp_source() -> tuple[ArrayPool, ArrayPool]:
    """61 training images in 4 classes (odd: the uniform shards pad), 9 test images."""
    rng = np.random.default_rng(0)
    targets = rng.permutation(np.repeat(np.arange(4), [30, 17, 9, 5]))
    return (ArrayPool(rng.integers(0, 256, (61, 6, 6, 3), dtype=np.uint8), targets, list("abcd")),
            ArrayPool(rng.integers(0, 256, (9, 6, 6, 3), dtype=np.uint8), np.arange(9) % 4, list("abcd")))


def ddp_dm() -> LongTailDataModule:
    return make_dm(ddp_source, "device", batch_size=4, seed=5, image_size=6)


def ddp_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        dm = ddp_dm()
        dm.train_streams = {"u": "uniform", "r": "reversed"}
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        batches = list(loader)
        result = {"type": type(loader).__name__, "batches": len(batches), "len": len(loader),
                  "pairs": list(loader.sampler), "labels": torch.cat([b["u"][1] for b in batches]).tolist(),
                  "test": torch.cat([y for _, y in dm.test_dataloader()]).tolist()}
        gather_on_rank0(result, out)
    finally:
        dist.destroy_process_group()


def test_ddp_sharding_with_two_gloo_processes(tmp_path):
    out = tmp_path / "ranks.pkl"
    mp.spawn(ddp_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    ranks = pickle.loads(out.read_bytes())
    assert all(r["type"] == "DeviceLoader" for r in ranks)
    shard = math.ceil(61 / WORLD)
    assert ranks[0]["batches"] == ranks[1]["batches"] == ranks[0]["len"] == math.ceil(shard / 4)
    uniform = [[p[0] for p in r["pairs"]] for r in ranks]
    assert len(uniform[0]) == len(uniform[1]) == shard
    assert set(uniform[0]) | set(uniform[1]) == set(range(61))
    assert len(set(uniform[0]) & set(uniform[1])) == WORLD * shard - 61  # only the wrap-around padding
    targets = ddp_dm().train_targets
    for rank, result in enumerate(ranks):  # exactly what the CPU samplers of that rank draw
        for column, (name, kind) in enumerate((("u", "uniform"), ("r", "reversed"))):
            sampler = create_sampler(kind, targets, 5, rank, WORLD, stream=name)
            sampler.set_epoch(1)
            assert [p[column] for p in result["pairs"]] == list(sampler), (rank, kind)
        assert result["labels"] == targets[uniform[rank]].tolist()
    assert [p[1] for p in ranks[0]["pairs"]] != [p[1] for p in ranks[1]["pairs"]]
    assert sorted(ranks[0]["test"] + ranks[1]["test"]) == sorted((np.arange(9) % 4).tolist())


# ---------------------------------------------------------------------------------------------------
# The data.loader switch


def test_auto_stays_on_the_cpu_path_without_a_gpu(array_source):
    dm = make_dm(array_source([20, 6], size=8), "auto", image_size=8)
    assert type(dm.train_dataloader()).__name__ == "DataLoader"
    assert type(dm.test_dataloader()).__name__ == "DataLoader"
    assert not use_device_loader("auto", dm.train_dataset, torch.device("cpu"))


def test_pipelines_the_device_cannot_run(array_source):
    dm = make_dm(array_source([20, 6], size=8), "cpu", augmentation="imagenet", image_size=8)
    assert DeviceAugmentation.from_transform(dm.train_transform) is None
    assert not use_device_loader("auto", dm.train_dataset, torch.device("cuda"))
    with pytest.raises(LtlibError, match="data.loader=device supports"):
        use_device_loader("device", dm.train_dataset, torch.device("cpu"))
    with pytest.raises(LtlibError, match="unknown data loader 'gpu'; available: auto, cpu, device"):
        LongTailDataModule(array_source([4, 2]), loader="gpu")


def test_image_files_are_decoded_once_and_match(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for cls in ("x", "y"):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{k}.png")

    def source():
        return image_folder_pools(str(tmp_path))

    out = {loader: [b for b in make_dm(source, loader, image_size=10).test_dataloader()] for loader in ("cpu", "device")}
    assert torch.equal(out["cpu"][0][0], out["device"][0][0])
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(tmp_path / "test" / "y" / "9.png")
    with pytest.raises(LtlibError, match=r"needs images of one size; .*9\.png is \(12, 10, 3\)"):
        make_dm(source, "device", image_size=10).test_dataloader()


def test_cli_rejects_an_unknown_loader(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ltlib.run", "data.loader=gpu", f"hydra.run.dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "ltlib: error: unknown data loader 'gpu'; available: auto, cpu, device"
