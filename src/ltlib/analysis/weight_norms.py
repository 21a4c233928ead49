"""Per-class l2-norms of classifier weights (BBN figure 4, two-head paper figure 3).

A classifier trained on long-tailed data grows larger weight norms for head classes; re-balancing
flattens the profile. :func:`classifier_weight_norms` returns the data, :func:`plot_weight_norms`
draws one or several classifiers against the classes sorted by training count.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from ltlib.analysis.results import save_figure


def classifier_weight_norms(weight: torch.Tensor) -> torch.Tensor:
    """l2-norm of each class's weight vector; ``weight`` is ``[C, D]`` (``nn.Linear.weight``)."""
    return weight.detach().float().norm(dim=1).cpu()


def weight_norm_summary(norms: Mapping[str, torch.Tensor | np.ndarray]) -> dict[str, dict[str, object]]:
    """Per-classifier norms and their standard deviation over classes, as plain Python."""
    out: dict[str, dict[str, object]] = {}
    for name, values in norms.items():
        array = np.asarray(torch.as_tensor(values).float())
        out[name] = {"norms": array.tolist(), "std": float(array.std()), "mean": float(array.mean())}
    return out


def plot_weight_norms(norms: Mapping[str, torch.Tensor | np.ndarray], class_counts: Sequence[int],
                      path: str | os.PathLike[str], title: str = "Classifier weight norms") -> Path:
    """Bars of per-class weight norms (classes sorted by training count, largest first), one colour per
    classifier, the standard deviation over classes in the legend."""
    order = np.argsort(-np.asarray(class_counts), kind="stable")
    figure = Figure(figsize=(max(6.0, 0.12 * len(order) + 4), 3.6))
    ax = figure.add_subplot()
    width = 0.8 / max(len(norms), 1)
    for k, (name, values) in enumerate(norms.items()):
        array = np.asarray(torch.as_tensor(values).float())[order]
        ax.bar(np.arange(len(order)) + (k - (len(norms) - 1) / 2) * width, array, width=width,
               label=f"{name} (std {array.std():.3f})")
    ax.set_xlabel("class, sorted by training images (head → tail)")
    ax.set_ylabel("weight l2-norm")
    ax.set_title(title)
    ax.legend(fontsize="small")
    figure.tight_layout()
    return save_figure(figure, path)
