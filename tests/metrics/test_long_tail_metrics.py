"""LongTailMetrics against an independent numpy computation, and its DDP reduction with 2 processes."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ltlib.errors import LtlibError
from ltlib.metrics import LongTailMetrics, shot_groups, shot_name

NUM_CLASSES = 6
# many: 500, 101; medium: 100, 20; few: 19, 3
CLASS_COUNTS = [500, 101, 100, 20, 19, 3]
ABSENT_CLASS = 4


def _reference(preds: np.ndarray, targets: np.ndarray, counts: list[int]) -> dict[str, object]:
    """Long-tail metrics computed directly from predictions, independently of the confusion matrix."""
    per_class = np.full(NUM_CLASSES, np.nan)
    for c in range(NUM_CLASSES):
        in_class = targets == c
        if in_class.any():
            per_class[c] = (preds[in_class] == c).mean()
    counts_arr = np.asarray(counts)
    groups = {"many": counts_arr > 100, "few": counts_arr < 20}
    groups["medium"] = ~(groups["many"] | groups["few"])
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(confusion, (targets, preds), 1)
    ref: dict[str, object] = {
        "top1": (preds == targets).mean(),
        "per_class_acc": per_class,
        "mean_class_acc": np.nanmean(per_class),
        "confusion": confusion,
        "num_samples": len(targets),
    }
    for name, mask in groups.items():
        values = per_class[mask][~np.isnan(per_class[mask])]
        ref[f"{name}_acc"] = values.mean() if len(values) else np.nan
    return ref


def _eval_set(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and targets; class ABSENT_CLASS never appears among the targets."""
    gen = torch.Generator().manual_seed(seed)
    present = torch.tensor([c for c in range(NUM_CLASSES) if c != ABSENT_CLASS])
    targets = present[torch.randint(len(present), (n,), generator=gen)]
    logits = torch.randn(n, NUM_CLASSES, generator=gen)
    logits[torch.arange(n), targets] += 1.0  # better than chance, so accuracies differ per class
    return logits, targets


def _assert_matches(result: dict[str, torch.Tensor], ref: dict[str, object]) -> None:
    for key, expected in ref.items():
        actual = result[key].cpu().numpy()
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=0, equal_nan=True, err_msg=key)


def test_matches_numpy_over_several_batches() -> None:
    logits, targets = _eval_set(301)
    metric = LongTailMetrics(NUM_CLASSES, CLASS_COUNTS)
    for lo in range(0, len(targets), 64):
        metric.update(logits[lo:lo + 64], targets[lo:lo + 64])
    result = metric.compute()
    ref = _reference(logits.argmax(1).numpy(), targets.numpy(), CLASS_COUNTS)
    _assert_matches(result, ref)
    assert torch.isnan(result["per_class_acc"][ABSENT_CLASS])
    # the absent class is excluded from the means, not counted as 0
    present = [c for c in range(NUM_CLASSES) if c != ABSENT_CLASS]
    assert result["mean_class_acc"].item() == pytest.approx(result["per_class_acc"][present].mean().item())
    assert result["few_acc"].item() == pytest.approx(result["per_class_acc"][5].item())
    assert result["confusion"].dtype == torch.int64
    assert result["confusion"][ABSENT_CLASS].sum() == 0


def test_logits_and_class_indices_agree() -> None:
    logits, targets = _eval_set(97, seed=1)
    from_logits = LongTailMetrics(NUM_CLASSES, CLASS_COUNTS)
    from_indices = LongTailMetrics(NUM_CLASSES, CLASS_COUNTS)
    from_logits.update(logits, targets)
    from_indices.update(logits.argmax(1), targets)
    a, b = from_logits.compute(), from_indices.compute()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], equal_nan=True, rtol=0, atol=0)


def test_reset_clears_state() -> None:
    logits, targets = _eval_set(50, seed=2)
    metric = LongTailMetrics(NUM_CLASSES, CLASS_COUNTS)
    metric.update(logits, targets)
    metric.reset()
    assert metric.confusion.sum() == 0
    metric.update(logits[:10], targets[:10])
    ref = _reference(logits[:10].argmax(1).numpy(), targets[:10].numpy(), CLASS_COUNTS)
    _assert_matches(metric.compute(), ref)


def test_group_keys_only_with_class_counts_and_empty_group_is_nan() -> None:
    logits, targets = _eval_set(40, seed=3)
    plain = LongTailMetrics(NUM_CLASSES)
    plain.update(logits, targets)
    assert not {"many_acc", "medium_acc", "few_acc"} & plain.compute().keys()
    # CIFAR-10-LT with ratio 10 (5000 ... 500) has no few-shot class
    no_few = LongTailMetrics(NUM_CLASSES, [5000, 3000, 1500, 1000, 700, 500])
    no_few.update(logits, targets)
    result = no_few.compute()
    assert torch.isnan(result["few_acc"]) and torch.isnan(result["medium_acc"])
    assert result["many_acc"].item() == pytest.approx(result["mean_class_acc"].item())


def test_shot_groups_boundaries() -> None:
    groups = shot_groups([101, 100, 20, 19, 0, 1000])
    assert groups["many"].tolist() == [True, False, False, False, False, True]
    assert groups["medium"].tolist() == [False, True, True, False, False, False]
    assert groups["few"].tolist() == [False, False, False, True, True, False]
    assert all(m.dtype == torch.bool for m in groups.values())
    assert [shot_name(c) for c in (101, 100, 20, 19)] == ["many", "medium", "medium", "few"]
    custom = shot_groups([10, 5, 4], many_threshold=5, few_threshold=5)
    assert custom["many"].tolist() == [True, False, False]
    assert custom["medium"].tolist() == [False, True, False]
    assert custom["few"].tolist() == [False, False, True]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 3, "class_counts": [10, 20]}, "class_counts has 2 entries"),
        ({"num_classes": 2, "class_counts": [10, 20], "many_threshold": 10, "few_threshold": 50}, "few_threshold"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(LtlibError, match=match):
        LongTailMetrics(**kwargs)


def test_update_rejects_wrong_shapes() -> None:
    metric = LongTailMetrics(3)
    with pytest.raises(LtlibError, match="logits have 4 classes"):
        metric.update(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(LtlibError, match="expected logits"):
        metric.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        logits, targets = _eval_set(301)
        shard_logits, shard_targets = logits[rank::world_size], targets[rank::world_size]
        metric = LongTailMetrics(NUM_CLASSES, CLASS_COUNTS)
        for lo in range(0, len(shard_targets), 32):
            metric.update(shard_logits[lo:lo + 32], shard_targets[lo:lo + 32])
        torch.save(metric.compute(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_uneven_shards_equal_single_process(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    logits, targets = _eval_set(301)
    single = LongTailMetrics(NUM_CLASSES, CLASS_COUNTS)
    single.update(logits, targets)
    expected = single.compute()
    assert expected["num_samples"].item() == 301
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(result[key], expected[key], equal_nan=True, rtol=0, atol=0)
