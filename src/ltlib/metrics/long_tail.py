"""Long-tail evaluation: top-1, per-class and many/medium/few-shot accuracy from one confusion matrix.

The shot groups follow the convention of Liu et al. (OLTR, CVPR 2019), also used by BBN and FBL:
a class is *many*-shot with more than 100 training images, *few*-shot with fewer than 20, and
*medium*-shot otherwise (20 to 100 inclusive). Group accuracy is the mean of the per-class
accuracies of the group's classes, not the accuracy over the group's pooled images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from ltlib.errors import LtlibError

SHOT_NAMES: tuple[str, ...] = ("many", "medium", "few")


def _check_thresholds(many_threshold: int, few_threshold: int) -> None:
    if few_threshold > many_threshold:
        raise LtlibError(
            f"few_threshold={few_threshold!r} exceeds many_threshold={many_threshold!r}; "
            "expected few_threshold <= many_threshold"
        )


def shot_name(count: int, many_threshold: int = 100, few_threshold: int = 20) -> str:
    """Shot group of a class with ``count`` training images: ``"many"``, ``"medium"`` or ``"few"``."""
    _check_thresholds(many_threshold, few_threshold)
    if count > many_threshold:
        return "many"
    if count < few_threshold:
        return "few"
    return "medium"


def shot_groups(
    class_counts: Sequence[int] | torch.Tensor | np.ndarray,
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> dict[str, torch.Tensor]:
    """Boolean masks ``[C]`` over classes for the ``many``, ``medium`` and ``few`` shot groups.

    many: count > many_threshold; few: count < few_threshold; medium: the rest. The three masks
    partition the classes.
    """
    _check_thresholds(many_threshold, few_threshold)
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.int64).flatten()
    if (counts < 0).any():
        raise LtlibError(f"class_counts must be non-negative; got {counts.min().item()}")
    many = counts > many_threshold
    few = counts < few_threshold
    return {"many": many, "medium": ~(many | few), "few": few}


def _float_dtype(device: torch.device) -> torch.dtype:
    """float64 for exact-looking ratios (7/10 -> 0.7), except on MPS, which lacks it."""
    return torch.float32 if device.type == "mps" else torch.float64


class LongTailMetrics(Metric):
    """Confusion-matrix based long-tail classification metrics.

    ``update`` only adds to a ``[C, C]`` int64 confusion matrix on the metric's device (no host
    sync); under DDP torchmetrics sums the matrices of all ranks at ``compute()``, so sharding the
    evaluation set unevenly between ranks gives the single-process result exactly.

    ``compute()`` returns a dict of tensors:

    - ``top1``: correct / total.
    - ``per_class_acc`` ``[C]``: diagonal / row sum; NaN for classes without samples in this split.
    - ``mean_class_acc``: mean of ``per_class_acc`` over the classes with samples.
    - ``many_acc``, ``medium_acc``, ``few_acc`` (only when ``class_counts`` is given): mean per-class
      accuracy over the group's classes with samples; NaN when there are none (CIFAR-10-LT with
      imbalance ratio 10 has no few-shot class).
    - ``confusion`` ``[C, C]``: rows are true classes, columns predicted classes.
    - ``num_samples``: number of evaluated samples.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confusion: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        class_counts: Sequence[int] | None = None,
        many_threshold: int = 100,
        few_threshold: int = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise LtlibError(f"num_classes={num_classes!r} is invalid; expected an integer >= 1")
        _check_thresholds(many_threshold, few_threshold)
        self.num_classes = num_classes
        self.many_threshold = many_threshold
        self.few_threshold = few_threshold
        self.has_groups = class_counts is not None
        if class_counts is not None:
            if len(class_counts) != num_classes:
                raise LtlibError(
                    f"class_counts has {len(class_counts)} entries but num_classes={num_classes}; "
                    "expected one training count per class"
                )
            for name, mask in shot_groups(class_counts, many_threshold, few_threshold).items():
                self.register_buffer(f"_{name}_mask", mask, persistent=False)
        self.add_state(
            "confusion",
            default=torch.zeros(num_classes, num_classes, dtype=torch.int64),
            dist_reduce_fx="sum",
        )

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: ``preds`` are logits ``[B, C]`` (argmax is taken) or class indices ``[B]``."""
        if preds.ndim == 2:
            if preds.shape[1] != self.num_classes:
                raise LtlibError(
                    f"logits have {preds.shape[1]} classes but num_classes={self.num_classes}"
                )
            preds = preds.argmax(dim=1)
        if preds.ndim != 1 or targets.ndim != 1 or preds.shape[0] != targets.shape[0]:
            raise LtlibError(
                f"expected logits [B, C] or predictions [B] with targets [B]; got preds "
                f"{tuple(preds.shape)} and targets {tuple(targets.shape)}"
            )
        # index_put_ with accumulate is deterministic and, unlike bincount on CUDA, needs no host sync.
        ones = torch.ones_like(targets, dtype=torch.int64)
        self.confusion.index_put_((targets.long(), preds.long()), ones, accumulate=True)

    def compute(self) -> dict[str, torch.Tensor]:
        """Metrics from the accumulated (and, under DDP, summed) confusion matrix."""
        confusion = self.confusion
        dtype = _float_dtype(confusion.device)
        correct = confusion.diagonal().to(dtype)
        per_class_total = confusion.sum(dim=1).to(dtype)
        total = confusion.sum()
        per_class_acc = correct / per_class_total  # 0 / 0 -> NaN for absent classes
        result = {
            "top1": correct.sum() / total.to(dtype),
            "per_class_acc": per_class_acc,
            "mean_class_acc": per_class_acc.nanmean(),
        }
        if self.has_groups:
            for name in SHOT_NAMES:
                mask = getattr(self, f"_{name}_mask")
                result[f"{name}_acc"] = per_class_acc[mask].nanmean()
        result["confusion"] = confusion.clone()
        result["num_samples"] = total
        return result
