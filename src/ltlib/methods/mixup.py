"""Mixup (Zhang et al., ICLR 2018): convex combinations of image pairs and of their label vectors.

Used by the ``mixup`` / ``manifold_mixup`` baselines and by the two-head model's "full" variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ltlib.errors import check_in_range


def sample_mix_weight(alpha: float, generator: torch.Generator | None = None) -> float:
    """lambda ~ Beta(alpha, alpha); ``alpha = 0`` gives 1 (no mixing)."""
    check_in_range("mixup alpha", alpha, 0.0)
    if alpha == 0:
        return 1.0
    gammas = torch._standard_gamma(torch.full((2,), float(alpha), dtype=torch.float64), generator=generator)
    return float(gammas[0] / gammas.sum())


def mix(inputs: Tensor, soft_targets: Tensor, lam: float, permutation: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``lam * x + (1 - lam) * x[perm]`` and the same mixture of the soft targets (rows sum
    to one when the inputs' rows do)."""
    mixed_inputs = lam * inputs + (1.0 - lam) * inputs[permutation]
    mixed_targets = lam * soft_targets + (1.0 - lam) * soft_targets[permutation]
    return mixed_inputs, mixed_targets


def mixup_batch(images: Tensor, targets: Tensor, num_classes: int, alpha: float,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, float]:
    """Mix a batch with a random permutation of itself; ``targets`` are class indices or soft targets.

    Returns ``(mixed_images, mixed_soft_targets, lam)``.
    """
    soft = targets if targets.dim() == 2 else F.one_hot(targets, num_classes).to(images.dtype)
    lam = sample_mix_weight(alpha, generator)
    permutation = torch.randperm(images.shape[0], generator=generator).to(images.device)
    mixed_images, mixed_targets = mix(images, soft, lam, permutation)
    return mixed_images, mixed_targets, lam
