"""The base class of every loss in :mod:`ltlib.losses`, its input checks and its reductions.

:meth:`LongTailLoss.forward` checks the inputs once, moves the per-class ``weight`` to the logits'
device and compute dtype, asks the subclass for per-sample losses
(:meth:`LongTailLoss.per_sample_loss`) and reduces them with the one vocabulary of :data:`REDUCTIONS`.
Every check here looks only at shapes and dtypes, so none of them forces a device-to-host sync.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltlib.errors import LtlibError, unknown_name

#: ``mean``: ``sum_i w_{y_i} l_i / sum_i w_{y_i}`` (the plain mean without weights), as
#: ``F.cross_entropy(weight=...)``; ``batch_mean``: ``sum_i w_{y_i} l_i / B``, as LDAM-DRW's focal loss
#: and Cui et al.'s sigmoid losses; ``sum``: ``sum_i w_{y_i} l_i``; ``none``: ``w_{y_i} l_i``, shape [B].
REDUCTIONS = ("mean", "batch_mean", "sum", "none")


def check_reduction(reduction: str) -> str:
    """Return ``reduction`` if it is one of :data:`REDUCTIONS`, else raise."""
    if reduction not in REDUCTIONS:
        raise unknown_name("reduction", reduction, REDUCTIONS)
    return reduction


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype a loss is computed in: at least float32 (half-precision logits are upcast)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def shape_str(t: Tensor) -> str:
    """``[d0, d1, ...]``, for error messages."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_logits(logits: Tensor, num_classes: int | None, owner: str) -> None:
    """``logits`` must be a floating ``[B, C]`` tensor; ``C`` must equal ``num_classes`` when given."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"shape {shape_str(logits)} {logits.dtype}" if isinstance(logits, Tensor) else type(logits).__name__
        raise LtlibError(f"{owner}: logits must be a floating tensor of shape [batch, classes]; got {got}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise LtlibError(
            f"{owner}: logits have {logits.shape[1]} classes (shape {shape_str(logits)}) but class_counts has "
            f"{num_classes} entries; they must match"
        )


def check_class_indices(targets: Tensor, logits: Tensor, owner: str) -> Tensor:
    """``targets`` must be integer class indices of shape ``[B]``; return them as int64."""
    if not isinstance(targets, Tensor):
        raise LtlibError(f"{owner}: targets must be a tensor of class indices; got {type(targets).__name__}")
    if targets.dim() != 1 or targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise LtlibError(
            f"{owner}: targets must be integer class indices of shape [batch]; got shape {shape_str(targets)} "
            f"{targets.dtype} (for soft targets use SoftTargetCrossEntropy)"
        )
    if targets.shape[0] != logits.shape[0]:
        raise LtlibError(
            f"{owner}: targets hold {targets.shape[0]} labels but logits hold {logits.shape[0]} samples"
        )
    return targets.long()


def prepare_weight(weight: Tensor | Sequence[float] | None, num_classes: int | None, owner: str) -> Tensor | None:
    """Validate per-class weights once, at construction: 1-D, finite, non-negative, one per class."""
    if weight is None:
        return None
    w = torch.as_tensor(weight, dtype=torch.float32).detach().clone()
    if w.dim() != 1 or w.numel() == 0:
        raise LtlibError(f"{owner}: weight must be a 1-D tensor with one weight per class; got shape {shape_str(w)}")
    if num_classes is not None and w.numel() != num_classes:
        raise LtlibError(f"{owner}: weight has {w.numel()} entries but there are {num_classes} classes")
    if not torch.isfinite(w).all() or (w < 0).any():
        bad = [v for v in w.tolist() if not 0 <= v < float("inf")]
        raise LtlibError(f"{owner}: weight must be finite and non-negative; got {bad[:5]} among them")
    return w


def weight_for(weight: Tensor | None, logits: Tensor, dtype: torch.dtype, owner: str) -> Tensor | None:
    """Per-class weights moved to the logits' device and ``dtype``; checks the length (no sync)."""
    if weight is None:
        return None
    if weight.dim() != 1 or weight.shape[0] != logits.shape[1]:
        raise LtlibError(
            f"{owner}: weight has shape {shape_str(weight)} but logits have {logits.shape[1]} classes; "
            f"expected shape [{logits.shape[1]}]"
        )
    return weight.to(device=logits.device, dtype=dtype)


def apply_class_weight(losses: Tensor, targets: Tensor, weight: Tensor | None) -> Tensor:
    """``w_{y_i} l_i`` (``losses`` unchanged when ``weight`` is None)."""
    return losses if weight is None else weight[targets] * losses


def reduce_losses(losses: Tensor, targets: Tensor, weight: Tensor | None, reduction: str) -> Tensor:
    """Reduce already-weighted per-sample losses ``w_{y_i} l_i`` as :data:`REDUCTIONS` describes."""
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "batch_mean" or weight is None:
        return losses.mean()
    return losses.sum() / weight[targets].sum()


class LongTailLoss(nn.Module, ABC):
    """A loss called as ``loss(logits, targets, *extra_inputs)`` with per-class weights and one reduction
    vocabulary.

    :meth:`forward` checks ``logits`` (floating ``[B, C]``; ``C == num_classes`` when the loss has a
    class count), ``targets`` (:meth:`check_targets`: int class indices ``[B]`` by default) and the
    subclass's :attr:`extra_inputs` (:meth:`check_extra_inputs`), moves :attr:`weight` to the logits'
    device and compute dtype (at least float32), calls :meth:`per_sample_loss` and reduces with
    ``reduction`` (:data:`REDUCTIONS`).

    ``weight`` (``[C]`` or None) is a non-persistent buffer: it follows ``.to(device)``, stays out of
    ``state_dict`` and may be replaced at any time (``loss.weight = w``, e.g. once per epoch for
    deferred re-weighting); its length is checked at the next call.

    Subclasses call ``super().__init__(num_classes=..., weight=..., reduction=...)`` once their own
    arguments are checked and implement :meth:`per_sample_loss`; they do not override :meth:`forward`.
    Cross-entropy on adjusted logits derives from :class:`AdjustedCrossEntropyLoss` instead.
    """

    #: names of the inputs ``forward`` takes after ``(logits, targets)``, e.g. ``("features",)``
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    #: whether the loss has per-class weights ``w_y`` (False: ``weight`` must stay None)
    takes_weight: ClassVar[bool] = True

    weight: Tensor | None

    def __init__(self, *, num_classes: int | None = None, weight: Tensor | Sequence[float] | None = None,
                 reduction: str = "mean") -> None:
        super().__init__()
        if weight is not None and not self.takes_weight:
            raise LtlibError(f"{self.owner} takes no class weights; got a weight")
        self.num_classes = num_classes
        self.reduction = check_reduction(reduction)
        self.register_buffer("weight", prepare_weight(weight, num_classes, self.owner), persistent=False)

    @property
    def owner(self) -> str:
        """The name error messages start with (the class name)."""
        return type(self).__name__

    # ---- hooks ------------------------------------------------------------------------------------
    def check_targets(self, targets: Tensor, logits: Tensor) -> Tensor:
        """Check ``targets`` and return them as :meth:`per_sample_loss` takes them (int64 ``[B]``)."""
        return check_class_indices(targets, logits, self.owner)

    def check_extra_inputs(self, logits: Tensor, *inputs: Tensor) -> None:
        """Check the :attr:`extra_inputs`; the default has none to check."""

    @abstractmethod
    def per_sample_loss(self, logits: Tensor, targets: Tensor, weight: Tensor | None, *inputs: Tensor) -> Tensor:
        """Per-sample losses ``[B]``, multiplied by ``w_{y_i}`` where the loss applies weights.

        ``logits`` are already in the compute dtype, ``targets`` checked, ``weight`` (``[C]`` or None)
        on the logits' device and dtype.
        """

    # ---- call -------------------------------------------------------------------------------------
    def forward(self, logits: Tensor, targets: Tensor, *inputs: Tensor) -> Tensor:
        """The loss of ``logits [B, C]`` against ``targets``, reduced by ``self.reduction``."""
        owner = self.owner
        if len(inputs) != len(self.extra_inputs):
            expected = ", ".join(("logits", "targets", *self.extra_inputs))
            raise LtlibError(f"{owner} takes ({expected}); got {2 + len(inputs)} inputs")
        check_logits(logits, self.num_classes, owner)
        targets = self.check_targets(targets, logits)
        self.check_extra_inputs(logits, *inputs)
        if self.weight is not None and not self.takes_weight:
            raise LtlibError(f"{owner} takes no class weights; set weight=None")
        dtype = compute_dtype(logits)
        weight = weight_for(self.weight, logits, dtype, owner)
        return self.reduced_loss(logits.to(dtype), targets, weight, *inputs)

    def reduced_loss(self, logits: Tensor, targets: Tensor, weight: Tensor | None, *inputs: Tensor) -> Tensor:
        """:meth:`per_sample_loss` reduced by ``self.reduction`` (same arguments as that hook)."""
        losses = self.per_sample_loss(logits, targets, weight, *inputs)
        return reduce_losses(losses, targets, weight, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, weighted={self.weight is not None}"


class AdjustedCrossEntropyLoss(LongTailLoss):
    """Weighted cross-entropy on adjusted logits, ``l_i = -w_{y_i} log softmax(a(z_i))_{y_i}``.

    Subclasses implement :meth:`adjusted_logits` (margins, priors, stimuli). ``"mean"`` and ``"sum"``
    are left to ``F.cross_entropy``'s own reduction: the definitions of :data:`REDUCTIONS`, computed
    bit for bit as ``F.cross_entropy(a(z), y, weight=w, reduction=...)`` (a separate sum can differ in
    the last bit, which would change deterministic training runs).
    """

    @abstractmethod
    def adjusted_logits(self, logits: Tensor, targets: Tensor, *inputs: Tensor) -> Tensor:
        """The logits cross-entropy is applied to, ``[B, C]`` (inputs as :meth:`per_sample_loss` gets them)."""

    def per_sample_loss(self, logits: Tensor, targets: Tensor, weight: Tensor | None, *inputs: Tensor) -> Tensor:
        adjusted = self.adjusted_logits(logits, targets, *inputs)
        return F.cross_entropy(adjusted, targets, weight=weight, reduction="none")

    def reduced_loss(self, logits: Tensor, targets: Tensor, weight: Tensor | None, *inputs: Tensor) -> Tensor:
        if self.reduction in ("mean", "sum"):
            adjusted = self.adjusted_logits(logits, targets, *inputs)
            return F.cross_entropy(adjusted, targets, weight=weight, reduction=self.reduction)
        return super().reduced_loss(logits, targets, weight, *inputs)
