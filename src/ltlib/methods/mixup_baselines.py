"""Mixup and manifold mixup baselines (BBN table 1), with one sampler or with BBN's two samplers.

Mixup (Zhang et al., ICLR 2018) trains on convex combinations of two images and of their labels,
``x~ = lam x_i + (1 - lam) x_j`` and ``y~ = lam y_i + (1 - lam) y_j`` with ``lam ~ Beta(alpha, alpha)``
(one ``lam`` per batch). Manifold mixup (Verma et al., ICML 2019) mixes the hidden representations
``h~ = lam h_k(x_i) + (1 - lam) h_k(x_j)`` at a layer ``k`` drawn at random for every batch from a set of
eligible layers (their CIFAR code: the input, the output of stage 1 or of stage 2) and continues the
forward pass from ``h~``. The loss (``mix_loss="soft_ce"``) is the cross-entropy against the mixed
label vector, which equals ``lam CE(z, y_i) + (1 - lam) CE(z, y_j)`` (the form of BBN's and most
long-tail code); ``mix_loss="bce_softmax"`` is what Verma et al.'s code trains with, a binary
cross-entropy between ``softmax(z)`` and the mixed label vector, averaged over batch and classes.

Pairs ``(i, j)``:

* one sampler (``second_sampler=None``): a batch and a random permutation of itself (Zhang et al.);
* two samplers (BBN table 1, "Manifold Mixup (two samplers)": "the same [samplers] as ours"): two
  aligned streams, a uniform one and a reversed one (BBN eq. 4), and ``i`` from the first, ``j`` from
  the second. For a hidden layer both sub-batches go through the layers below it as one batch of
  ``2B`` images (batch-norm statistics over both), then the two halves are mixed.

Mixing locations are named by the layer whose output is mixed (:func:`mix_locations`): ``input``,
the children of the backbone's ``trunk`` (``layer1``, ``layer2``, ... for the ResNets), ``last_block``
(the feature map) and ``pool`` (the pooled features the classifier sees).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltlib.data.samplers import check_sampler
from ltlib.errors import LtlibError, check_in_range, unknown_name
from ltlib.losses import SoftTargetCrossEntropy
from ltlib.methods.base import LongTailMethod
from ltlib.methods.mixup import sample_mix_weight

INPUT = "input"
MIX_LOSSES = ("soft_ce", "bce_softmax")


def backbone_stages(backbone: nn.Module) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
    """The backbone as named consecutive stages whose composition is ``backbone(x)``: the children of
    an ``nn.Sequential`` trunk (else the trunk as one stage ``trunk``), ``last_block`` and ``pool``."""
    trunk = backbone.trunk
    stages: list[tuple[str, Callable[[Tensor], Tensor]]]
    if isinstance(trunk, nn.Sequential):
        stages = list(trunk.named_children())
    else:
        stages = [("trunk", trunk)]
    return [*stages, ("last_block", backbone.last_block), ("pool", backbone.pool)]


def mixed_targets(targets: Tensor, partner_targets: Tensor, lam: float, num_classes: int) -> Tensor:
    """``lam * onehot(y_i) + (1 - lam) * onehot(y_j)``: label distributions whose rows sum to one."""
    first = F.one_hot(targets, num_classes).float()
    return lam * first + (1.0 - lam) * F.one_hot(partner_targets, num_classes).float()


def mix_locations(backbone: nn.Module) -> list[str]:
    """Where a backbone can be mixed: ``input`` and the name of every stage of :func:`backbone_stages`."""
    return [INPUT, *(name for name, _ in backbone_stages(backbone))]


class MixupClassifier(LongTailMethod):
    """A backbone and a linear classifier trained on mixed inputs (mixup) or mixed hidden features
    (manifold mixup), with one sampler or two.

    Args:
        alpha: ``lam ~ Beta(alpha, alpha)``; ``alpha = 0`` disables mixing (``lam = 1``).
        locations: where to mix, one chosen uniformly at random per batch: ``[input]`` is mixup,
            ``[input, layer1, layer2]`` Verma et al.'s manifold mixup on CIFAR ResNets; see
            :func:`mix_locations` for a backbone's names.
        sampler: the (first) stream's sampler.
        second_sampler: None for one sampler (pairs within the batch), or the second stream's sampler
            (``reversed`` for BBN's two samplers): pairs ``(first[i], second[i])``.
        mix_loss: ``soft_ce`` (default) or ``bce_softmax`` (Verma et al.'s code), see the module doc.
        Remaining arguments: see :class:`~ltlib.methods.base.LongTailMethod`.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, class_counts: Sequence[int], *,
        alpha: float = 1.0,
        locations: Sequence[str] = (INPUT,),
        sampler: str = "uniform",
        second_sampler: str | None = None,
        mix_loss: str = "soft_ce",
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes, class_counts, **kwargs)
        if mix_loss not in MIX_LOSSES:
            raise unknown_name("mix_loss", mix_loss, MIX_LOSSES)
        self.mix_loss = mix_loss
        self.alpha = check_in_range("alpha", float(alpha), 0.0, math.inf, high_inclusive=False)
        if isinstance(locations, str):
            locations = [locations]
        self.locations = [str(loc) for loc in locations]
        known = mix_locations(backbone)
        if not self.locations:
            raise LtlibError(f"locations is empty; give at least one of: {', '.join(known)}")
        for location in self.locations:
            if location not in known:
                raise LtlibError(f"unknown mixing location {location!r} for backbone "
                                 f"{getattr(backbone, 'arch', type(backbone).__name__)!r}; available: "
                                 f"{', '.join(known)}")
        for name in (sampler, second_sampler):
            if name is not None:
                check_sampler(name)
        self.two_samplers = second_sampler is not None
        self.train_streams = {"main": sampler, "partner": second_sampler} if self.two_samplers else {"main": sampler}
        self.soft_cross_entropy = SoftTargetCrossEntropy()

    # ----------------------------------------------------------------- model
    def mixed_forward(self, images: Tensor, lam: float, location: str, *, partner: Tensor | None = None,
                      permutation: Tensor | None = None) -> Tensor:
        """Logits of the batch with its representation at ``location`` replaced by
        ``lam * h + (1 - lam) * h_pair``; ``h_pair`` comes from ``partner`` images (two samplers) or
        from ``h[permutation]`` (one sampler)."""
        if (partner is None) == (permutation is None):
            raise ValueError("mixed_forward needs exactly one of partner and permutation")

        def mix(hidden: Tensor) -> Tensor:
            if partner is None:
                return lam * hidden + (1.0 - lam) * hidden[permutation]
            first, second = hidden.split(images.shape[0])
            return lam * first + (1.0 - lam) * second

        if location == INPUT:
            hidden = mix(images if partner is None else torch.cat([images, partner]))
            return self(hidden)
        hidden = images if partner is None else torch.cat([images, partner])
        for name, stage in backbone_stages(self.backbone):
            hidden = stage(hidden)
            if name == location:
                hidden = mix(hidden)
        return self.classifier(hidden)

    def sample_location(self) -> str:
        """One of :attr:`locations`, uniformly at random (CPU generator: no device sync)."""
        if len(self.locations) == 1:
            return self.locations[0]
        return self.locations[int(torch.randint(len(self.locations), (1,)))]

    # -------------------------------------------------------------- training
    def compute_loss(self, batch: Any) -> Tensor:
        if self.two_samplers:
            (images, targets), (partner, partner_targets) = batch["main"], batch["partner"]
            permutation = None
        else:
            images, targets = batch
            partner = None
            permutation = torch.randperm(images.shape[0], device=images.device)
            partner_targets = targets[permutation]
        lam = sample_mix_weight(self.alpha)
        logits = self.mixed_forward(images, lam, self.sample_location(), partner=partner, permutation=permutation)
        soft = mixed_targets(targets, partner_targets, lam, self.num_classes).to(logits.dtype)
        if self.mix_loss == "bce_softmax":
            return F.binary_cross_entropy(F.softmax(logits, dim=1), soft)
        return self.soft_cross_entropy(logits, soft)
