"""Per-class loss weights and the epoch they switch on: one value object for every method that re-weights.

Re-weighting (BBN section 3's RW: ``1 / N_c``), Cui et al.'s class-balanced weights and Cao et al.'s
deferred re-weighting (DRW: unweighted first, weighted from a later epoch) are all a
:class:`ClassReweighting`: the weighting, its ``beta`` and ``from_epoch``. ``LongTailMethod`` holds one
(:meth:`~ltlib.methods.base.LongTailMethod.set_class_reweighting`) and answers which weights are in force.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ltlib.errors import LtlibError, check_choice, check_in_range, check_int
from ltlib.losses import class_balanced_weights, inverse_frequency_weights

if TYPE_CHECKING:
    from ltlib.methods.base import OptimConfig

CLASS_WEIGHTINGS = ("none", "inverse_frequency", "class_balanced")


def make_class_weights(weighting: str, class_counts: Sequence[int], beta: float = 0.9999) -> Tensor | None:
    """Per-class loss weights by name: ``none``, ``inverse_frequency`` (1/N_c) or ``class_balanced``
    (Cui et al.'s effective number with ``beta``, their eq. 8)."""
    check_choice("class_weighting", weighting, CLASS_WEIGHTINGS)
    if weighting == "none":
        return None
    if weighting == "inverse_frequency":
        return inverse_frequency_weights(class_counts)
    return class_balanced_weights(class_counts, beta)


@dataclass(frozen=True)
class ClassReweighting:
    """Which per-class weights a loss uses, and from which epoch.

    Args:
        weighting: ``none``, ``inverse_frequency`` or ``class_balanced`` (:func:`make_class_weights`).
        beta: Cui et al.'s effective-number beta in [0, 1) (``class_balanced`` only).
        from_epoch: the first epoch (0-based) whose loss is weighted: 0 weights from the start, 160 is
            LDAM-DRW's DRW on 200 epochs (its code switches at ``epoch // 160 == 1``); ``None`` defers them by
            Cao et al.'s rule, from the first learning-rate decay: the first multistep milestone inside the
            run (120 of the CIFAR recipe's 120 / 160), else (a cosine schedule) ``floor(0.8 * max_epochs)``.
    """

    weighting: str = "none"
    beta: float = 0.9999
    from_epoch: int | None = 0

    def __post_init__(self) -> None:
        check_choice("class_weighting", self.weighting, CLASS_WEIGHTINGS)
        check_in_range("beta", float(self.beta), 0.0, 1.0, high_inclusive=False)
        object.__setattr__(self, "from_epoch", check_int("reweight_from_epoch", self.from_epoch, 0, optional=True,
                                                        meaning="an epoch, counted from 0; null defers it"))

    @property
    def enabled(self) -> bool:
        return self.weighting != "none"

    def weights(self, class_counts: Sequence[int]) -> Tensor | None:
        """The per-class weights ``[C]`` once switched on (None for ``none``)."""
        return make_class_weights(self.weighting, class_counts, float(self.beta))

    def start_epoch(self, optim: OptimConfig, max_epochs: int) -> int:
        """The first weighted epoch of a run with ``optim``'s schedule over ``max_epochs`` epochs."""
        if self.from_epoch is not None:
            return self.from_epoch
        if optim.schedule == "multistep":
            inside = [m for m in optim.milestones if 0 < m < max_epochs]
            if inside:
                return min(inside)
        return max_epochs * 4 // 5

    def deferred(self, optim: OptimConfig, max_epochs: int) -> bool:
        """Whether the weights switch on after the first epoch (DRW) rather than from the start."""
        return self.enabled and self.start_epoch(optim, max_epochs) > 0

    def summary(self, optim: OptimConfig, max_epochs: int) -> dict[str, Any] | None:
        """What ``results.json`` records (None without weights)."""
        if not self.enabled:
            return None
        return {"class_weighting": self.weighting,
                "beta": self.beta if self.weighting == "class_balanced" else None,
                "schedule": "deferred" if self.from_epoch is None else "fixed",
                "from_epoch": self.start_epoch(optim, max_epochs)}


def resolve_reweight_alias(kwargs: dict[str, Any], from_epoch: int | None) -> int | None:
    """Accept the old key ``reweight_start_epoch`` (the two-head model's former name) for ``reweight_from_epoch``;
    removes it from ``kwargs``. Giving both with different values is an error."""
    if "reweight_start_epoch" not in kwargs:
        return from_epoch
    old = kwargs.pop("reweight_start_epoch")
    if from_epoch is not None and old is not None and old != from_epoch:
        raise LtlibError(f"reweight_start_epoch={old!r} and reweight_from_epoch={from_epoch!r} disagree; "
                         "reweight_start_epoch is the old name of reweight_from_epoch: give only reweight_from_epoch")
    return old if old is not None else from_epoch


__all__ = ["CLASS_WEIGHTINGS", "ClassReweighting", "make_class_weights", "resolve_reweight_alias"]
