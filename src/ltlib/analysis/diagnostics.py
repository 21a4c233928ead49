"""Representation and classifier diagnostics of trained models, as data first and plots second.

The three papers look inside their models:

* intra-class compactness (BBN supplementary B, figure 6): for each class, the mean l2 distance of its
  l2-normalised features to their centroid, :func:`intra_class_compactness`;
* classifier weight norms per class (BBN figure 4, two-head figure 3), :func:`class_weight_norms` for
  any ltlib method (a linear classifier, BBN's two classifiers, the two-head model's cluster classifier
  and feature-balancing head);
* feature norms per class (FBL figure 2), :func:`ltlib.analysis.feature_norms.per_class_feature_norms`;
* per-class accuracy against the training count and many / medium / few accuracy,
  :func:`per_class_accuracy` and :func:`shot_accuracies`.

:func:`model_outputs` runs a model over a data loader once and :func:`diagnose` turns the outputs into a
:class:`RunDiagnostics`; the ``plot_*`` functions draw several runs side by side from such data
(classes sorted by training count, head to tail) and return the matplotlib figure, saved when given
a path. ``python -m ltlib.analyze RUN_DIR ...`` applies all of it to finished runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
from torch import Tensor, nn

from ltlib.analysis.feature_norms import per_class_feature_norms
from ltlib.analysis.results import save_figure
from ltlib.errors import LtlibError
from ltlib.metrics import SHOT_NAMES, shot_name

_SHOT_COLORS = {"many": "#4C72B0", "medium": "#DD8452", "few": "#C44E52"}


# ------------------------------------------------------------------------------------------ the data
def _check_pairs(features: Tensor, targets: Tensor) -> None:
    if features.dim() < 2 or targets.dim() != 1 or features.shape[0] != targets.shape[0]:
        raise LtlibError(f"features of shape {list(features.shape)} and targets of shape {list(targets.shape)} "
                         "do not match; expected [N, D] and [N]")


def class_centroids(features: Tensor, targets: Tensor, num_classes: int, normalize: bool = True) -> Tensor:
    """``[C, D]`` mean feature of each class (of the l2-normalised features with ``normalize``); NaN rows
    for classes without samples."""
    _check_pairs(features, targets)
    feats = features.detach().flatten(1).double()
    if normalize:
        feats = F.normalize(feats, dim=1)
    targets = targets.long().to(feats.device)
    sums = torch.zeros(num_classes, feats.shape[1], dtype=feats.dtype, device=feats.device)
    sums.index_add_(0, targets, feats)
    counts = torch.bincount(targets, minlength=num_classes).to(feats.dtype)
    centroids = sums / counts.clamp_min(1.0).unsqueeze(1)
    return torch.where(counts.unsqueeze(1) > 0, centroids, torch.full_like(centroids, math.nan))


def intra_class_compactness(features: Tensor, targets: Tensor, num_classes: int, normalize: bool = True) -> Tensor:
    """Intra-class compactness (BBN supplementary B): per class, the mean l2 distance between the class's
    features, each l2-normalised to norm 1, and their centroid (the mean of those normalised features).
    Smaller is more compact. ``[C]`` float64, NaN for classes without samples.

    >>> f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    >>> intra_class_compactness(f, torch.tensor([0, 0, 1]), 3)
    tensor([0.7071, 0.0000,    nan], dtype=torch.float64)
    """
    centroids = class_centroids(features, targets, num_classes, normalize)
    feats = features.detach().flatten(1).double()
    if normalize:
        feats = F.normalize(feats, dim=1)
    targets = targets.long().to(feats.device)
    distances = torch.linalg.vector_norm(feats - centroids[targets], dim=1)
    sums = torch.zeros(num_classes, dtype=feats.dtype, device=feats.device).index_add_(0, targets, distances)
    counts = torch.bincount(targets, minlength=num_classes).to(feats.dtype)
    return torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.full_like(sums, math.nan)).cpu()


def per_class_accuracy(predictions: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """``[C]`` fraction of each class's samples predicted correctly (float64, NaN without samples).
    ``predictions`` are class indices ``[N]`` or scores ``[N, C]`` (arg-maxed)."""
    if predictions.dim() == 2:
        predictions = predictions.argmax(dim=1)
    if predictions.shape != targets.shape:
        raise LtlibError(f"predictions of shape {list(predictions.shape)} and targets of shape "
                         f"{list(targets.shape)} do not match")
    targets = targets.long().cpu()
    correct = (predictions.long().cpu() == targets).double()
    hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, targets, correct)
    counts = torch.bincount(targets, minlength=num_classes).double()
    return torch.where(counts > 0, hits / counts.clamp_min(1.0), torch.full_like(hits, math.nan))


def shot_accuracies(per_class_acc: Sequence[float] | np.ndarray | Tensor, class_counts: Sequence[int],
                    many_threshold: int = 100, few_threshold: int = 20) -> dict[str, float]:
    """Mean per-class accuracy of the many- (> ``many_threshold`` training images), medium- and few-shot
    (< ``few_threshold``) classes, over classes with an accuracy; NaN for an empty group."""
    accs = np.asarray(torch.as_tensor(per_class_acc, dtype=torch.float64))
    shots = np.array([shot_name(int(c), many_threshold, few_threshold) for c in class_counts])
    out = {}
    for name in SHOT_NAMES:
        values = accs[(shots == name) & ~np.isnan(accs)]
        out[name] = float(values.mean()) if len(values) else math.nan
    return out


def class_weight_norms(method: nn.Module) -> dict[str, Tensor]:
    """Per-class l2-norms of the classifier weights, ``{name: [C]}``: an ltlib method's own
    :meth:`~ltlib.methods.base.LongTailMethod.class_weight_norms` (BBN: ``W_c``, ``W_r`` and their
    concatenation as they act at inference, figure 4; the two-head model: the mean norm of each class's
    cluster weight vectors, figure 3, and the feature-balancing head's kernel norms; any other: the rows of
    its ``[C, D]`` classifier weight). Empty for another module or a method without such a classifier."""
    from ltlib.methods.base import LongTailMethod

    return method.class_weight_norms() if isinstance(method, LongTailMethod) else {}


def default_features(method: nn.Module, images: Tensor) -> Tensor:
    """The representation a method's classifier reads: ``method.penultimate_features(images)`` where the
    method defines it (BBN: ``[f_c, f_r]``; cRT: the frozen features), else ``method.backbone(images)``
    (the pooled backbone output)."""
    extract = getattr(method, "penultimate_features", None)
    return extract(images) if callable(extract) else method.backbone(images)


@dataclass
class ModelOutputs:
    """What one pass of a model over a data set gives: ``features`` ``[N, D]`` (float32, CPU),
    ``predictions`` and ``targets`` ``[N]`` (int64, CPU)."""

    features: Tensor
    predictions: Tensor
    targets: Tensor


@torch.no_grad()
def model_outputs(method: nn.Module, loader: Any, device: torch.device | str = "cpu",
                  features_fn: Callable[[nn.Module, Tensor], Tensor] = default_features) -> ModelOutputs:
    """Run ``method`` in eval mode over ``loader`` (batches ``(images, targets, ...)``): the features of
    ``features_fn`` and the predictions of ``method.evaluate_logits`` (what ltlib's test uses; the model's
    forward pass where there is none)."""
    device = torch.device(device)
    was_training = method.training
    method.eval().to(device)
    evaluate = getattr(method, "evaluate_logits", None) or method
    features, predictions, targets = [], [], []
    try:
        for batch in loader:
            images = batch[0].to(device)
            features.append(features_fn(method, images).detach().flatten(1).float().cpu())
            predictions.append(evaluate(images).argmax(dim=1).cpu())
            targets.append(torch.as_tensor(batch[1]).long().cpu())
    finally:
        method.train(was_training)
    if not targets:
        raise LtlibError("the data loader yielded no batches; nothing to analyse")
    return ModelOutputs(torch.cat(features), torch.cat(predictions), torch.cat(targets))


@dataclass
class RunDiagnostics:
    """Per-class diagnostics of one model on one split (arrays of length C, NaN where undefined)."""

    label: str
    class_names: list[str]
    class_counts: list[int]
    accuracy: np.ndarray
    compactness: np.ndarray
    feature_norms: np.ndarray
    weight_norms: dict[str, np.ndarray] = field(default_factory=dict)
    many_threshold: int = 100
    few_threshold: int = 20
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    @property
    def shots(self) -> list[str]:
        return [shot_name(int(c), self.many_threshold, self.few_threshold) for c in self.class_counts]

    def shot_accuracies(self) -> dict[str, float]:
        return shot_accuracies(self.accuracy, self.class_counts, self.many_threshold, self.few_threshold)

    def summary(self) -> dict[str, Any]:
        """Scalars: top-1 is not here (it needs sample counts): mean class accuracy, shot accuracies,
        mean compactness and feature norm, and the std / mean of each weight-norm profile."""
        out: dict[str, Any] = {"label": self.label, "mean_class_acc": _nanmean(self.accuracy)}
        out.update({f"{name}_acc": value for name, value in self.shot_accuracies().items()})
        out["mean_compactness"] = _nanmean(self.compactness)
        out["mean_feature_norm"] = _nanmean(self.feature_norms)
        for name, norms in self.weight_norms.items():
            out[f"weight_norm_std[{name}]"] = float(np.std(norms))
            out[f"weight_norm_mean[{name}]"] = float(np.mean(norms))
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One dict per class: class, name, train_count, shot, accuracy, compactness, feature_norm and
        ``weight_norm[<name>]`` for each weight-norm profile."""
        shots = self.shots
        rows = []
        for c in range(self.num_classes):
            row = {"class": c, "name": self.class_names[c], "train_count": int(self.class_counts[c]),
                   "shot": shots[c], "accuracy": float(self.accuracy[c]), "compactness": float(self.compactness[c]),
                   "feature_norm": float(self.feature_norms[c])}
            row.update({f"weight_norm[{name}]": float(norms[c]) for name, norms in self.weight_norms.items()})
            rows.append(row)
        return rows


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else math.nan


def diagnose(outputs: ModelOutputs, class_counts: Sequence[int], *, label: str,
             class_names: Sequence[str] | None = None, weight_norms: Mapping[str, Tensor] | None = None,
             many_threshold: int = 100, few_threshold: int = 20, info: Mapping[str, Any] | None = None
             ) -> RunDiagnostics:
    """Per-class accuracy, compactness (normalised features) and mean feature norm (raw features) from a
    model's outputs; ``weight_norms`` (from :func:`class_weight_norms`) are carried along."""
    num_classes = len(class_counts)
    if outputs.targets.numel() and int(outputs.targets.max()) >= num_classes:
        raise LtlibError(f"targets go up to class {int(outputs.targets.max())} but there are {num_classes} class counts")
    norms = {}
    for name, values in (weight_norms or {}).items():
        array = np.asarray(torch.as_tensor(values, dtype=torch.float64))
        if array.shape != (num_classes,):
            raise LtlibError(f"weight norms {name!r} have shape {array.shape}; expected ({num_classes},)")
        norms[name] = array
    return RunDiagnostics(
        label=label,
        class_names=[str(n) for n in class_names] if class_names is not None else [str(c) for c in range(num_classes)],
        class_counts=[int(c) for c in class_counts],
        accuracy=per_class_accuracy(outputs.predictions, outputs.targets, num_classes).numpy(),
        compactness=intra_class_compactness(outputs.features, outputs.targets, num_classes).numpy(),
        feature_norms=per_class_feature_norms(outputs.features, outputs.targets, num_classes).double().numpy(),
        weight_norms=norms, many_threshold=many_threshold, few_threshold=few_threshold, info=dict(info or {}),
    )


# -------------------------------------------------------------------------------------------- plots
def _head_to_tail(class_counts: Sequence[int]) -> list[int]:
    """Class indices by training count, largest first (ties by index: CIFAR-LT keeps index order)."""
    return sorted(range(len(class_counts)), key=lambda c: (-int(class_counts[c]), c))


def _check_same_classes(runs: Mapping[str, Any], counts_of: Callable[[Any], Sequence[int]]) -> list[int]:
    if not runs:
        raise LtlibError("no runs to plot")
    first_label, first = next(iter(runs.items()))
    counts = [int(c) for c in counts_of(first)]
    for label, run in runs.items():
        if [int(c) for c in counts_of(run)] != counts:
            raise LtlibError(f"runs {first_label!r} and {label!r} have different class counts; plot runs of the "
                             "same training data together")
    return counts


def _class_axis(ax: Any, order: list[int], class_names: Sequence[str] | None) -> None:
    ax.set_xlim(-0.6, len(order) - 0.4)
    if len(order) <= 20:
        names = [class_names[c] if class_names else str(c) for c in order]
        ax.set_xticks(np.arange(len(order)), names, rotation=90 if max(map(len, names)) > 3 else 0, fontsize=8)
        ax.set_xlabel("class, sorted by training images (head → tail)")
    else:
        ax.set_xlabel("class rank by training images (head → tail)")


def _grouped_bars(ax: Any, series: Mapping[str, np.ndarray], order: list[int]) -> None:
    width = 0.8 / max(len(series), 1)
    for k, (label, values) in enumerate(series.items()):
        array = np.asarray(values, dtype=np.float64)[order]
        ax.bar(np.arange(len(order)) + (k - (len(series) - 1) / 2) * width, array, width=width, label=label)


def _counts_line(ax: Any, counts: Sequence[int], order: list[int]) -> None:
    twin = ax.twinx()
    twin.plot(np.arange(len(order)), [max(int(counts[c]), 1) for c in order], color="black", linewidth=1.2,
              marker="." if len(order) <= 50 else None, label="training images")
    twin.set_yscale("log")
    low, high = twin.get_ylim()
    twin.set_ylim(low, high * (high / low) ** 0.25)  # the same headroom as the bars, on a log axis
    twin.set_ylabel("training images (log scale)")
    twin.legend(loc="upper right", fontsize="small")


def _finish(figure: Figure, path: str | os.PathLike[str] | None) -> Figure:
    figure.tight_layout()
    if path is not None:
        save_figure(figure, path)
    return figure


def plot_per_class_values(values: Mapping[str, np.ndarray | Tensor | Sequence[float]], class_counts: Sequence[int],
                          *, ylabel: str, title: str, class_names: Sequence[str] | None = None,
                          show_counts: bool = True, path: str | os.PathLike[str] | None = None) -> Figure:
    """Grouped bars of one per-class quantity for several runs (``{label: [C]}``), classes head to tail,
    with the training counts as a log-scale line."""
    order = _head_to_tail(class_counts)
    figure = Figure(figsize=(max(6.4, 0.12 * len(order) * max(len(values), 1) + 4), 4.0))
    ax = figure.add_subplot()
    _grouped_bars(ax, {k: np.asarray(torch.as_tensor(v, dtype=torch.float64)) for k, v in values.items()}, order)
    _class_axis(ax, order, class_names)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.2)  # headroom: the legends sit above the bars, not on them
    ax.legend(loc="upper left", fontsize="small", ncol=min(max(len(values), 1), 4))
    if show_counts:
        _counts_line(ax, class_counts, order)
    return _finish(figure, path)


def plot_compactness(runs: Mapping[str, RunDiagnostics], path: str | os.PathLike[str] | None = None,
                     title: str = "Intra-class compactness (mean distance to the class centroid; lower is tighter)"
                     ) -> Figure:
    """BBN supplementary figure 6: per-class compactness of several runs side by side."""
    counts = _check_same_classes(runs, lambda r: r.class_counts)
    first = next(iter(runs.values()))
    return plot_per_class_values({label: run.compactness for label, run in runs.items()}, counts,
                                 ylabel="mean l2 distance to centroid (normalised features)", title=title,
                                 class_names=first.class_names, path=path)


def plot_feature_norms(runs: Mapping[str, RunDiagnostics], path: str | os.PathLike[str] | None = None,
                       title: str = "Mean feature norm per class") -> Figure:
    """FBL figure 2 (right) as bars: each class's mean feature l2-norm, several runs, with class counts."""
    counts = _check_same_classes(runs, lambda r: r.class_counts)
    first = next(iter(runs.values()))
    return plot_per_class_values({label: run.feature_norms for label, run in runs.items()}, counts,
                                 ylabel="mean feature l2-norm", title=title, class_names=first.class_names, path=path)


def plot_class_weight_norms(runs: Mapping[str, RunDiagnostics], path: str | os.PathLike[str] | None = None,
                            title: str = "Classifier weight norm per class") -> Figure:
    """BBN figure 4 / two-head figure 3: per-class weight norms of every classifier of several runs (one
    series per run and classifier, the std over classes in the legend), with the class counts."""
    counts = _check_same_classes(runs, lambda r: r.class_counts)
    series = {}
    for label, run in runs.items():
        for name, norms in run.weight_norms.items():
            key = label if len(run.weight_norms) == 1 else f"{label}: {name}"
            series[f"{key} (σ={float(np.std(norms)):.3f})"] = norms
    if not series:
        raise LtlibError("none of the runs has classifier weight norms to plot")
    first = next(iter(runs.values()))
    return plot_per_class_values(series, counts, ylabel="weight l2-norm", title=title,
                                 class_names=first.class_names, path=path)


def plot_accuracy_vs_count(runs: Mapping[str, RunDiagnostics], path: str | os.PathLike[str] | None = None,
                           title: str = "Per-class accuracy against training images") -> Figure:
    """Per-class accuracy of several runs against each class's training count (log scale), one
    marker series per run, the many / medium / few boundaries marked."""
    _check_same_classes(runs, lambda r: r.class_counts)
    figure = Figure(figsize=(6.8, 4.2))
    ax = figure.add_subplot()
    first = next(iter(runs.values()))
    counts = np.asarray(first.class_counts, dtype=np.float64)
    jitter = np.linspace(-0.04, 0.04, len(runs)) if len(runs) > 1 else [0.0]
    for k, (label, run) in enumerate(runs.items()):
        ax.scatter(counts * (1 + jitter[k]), run.accuracy, s=18, alpha=0.8, label=label)
    for threshold in (first.few_threshold, first.many_threshold):
        if counts.min() <= threshold <= counts.max():
            ax.axvline(threshold, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return _finish(figure, path)


def plot_shot_accuracy(runs: Mapping[str, Mapping[str, float]], path: str | os.PathLike[str] | None = None,
                       title: str = "Accuracy by shot group") -> Figure:
    """Grouped bars: many / medium / few accuracy (and ``mean_class``/``top1`` where given) of several runs.
    ``runs`` maps a label to ``{"many": ..., "medium": ..., "few": ...}`` (fractions; NaN groups skipped)."""
    groups = [g for g in ("top1", "mean_class", *SHOT_NAMES)
              if any(not math.isnan(float(r.get(g, math.nan))) for r in runs.values())]
    if not groups:
        raise LtlibError("no shot accuracies to plot")
    figure = Figure(figsize=(max(5.0, 1.2 * len(groups) * max(len(runs), 1) ** 0.5 + 3), 3.8))
    ax = figure.add_subplot()
    width = 0.8 / max(len(runs), 1)
    for k, (label, values) in enumerate(runs.items()):
        heights = [float(values.get(g, math.nan)) for g in groups]
        bars = ax.bar(np.arange(len(groups)) + (k - (len(runs) - 1) / 2) * width, heights, width=width, label=label)
        for bar, height in zip(bars, heights, strict=True):
            if not math.isnan(height):
                ax.annotate(f"{100 * height:.1f}", (bar.get_x() + bar.get_width() / 2, height), ha="center",
                            va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(groups)), [g.replace("_", " ") for g in groups])
    ax.set_ylim(0, 1.08)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return _finish(figure, path)


def write_diagnostics_figures(runs: Mapping[str, RunDiagnostics], output_dir: str | os.PathLike[str],
                              extra_scalars: Mapping[str, Mapping[str, float]] | None = None) -> list[Path]:
    """All figures for ``runs`` into ``output_dir``: ``compactness.png``, ``feature_norms.png``,
    ``weight_norms.png`` (when any run has a classifier), ``accuracy_vs_count.png`` and
    ``shot_accuracy.png`` (with ``extra_scalars[label]``, e.g. top-1, merged into the shot bars)."""
    out = Path(output_dir)
    written = [out / "compactness.png", out / "feature_norms.png"]
    plot_compactness(runs, written[0])
    plot_feature_norms(runs, written[1])
    if any(run.weight_norms for run in runs.values()):
        written.append(out / "weight_norms.png")
        plot_class_weight_norms({k: r for k, r in runs.items() if r.weight_norms}, written[-1])
    written.append(out / "accuracy_vs_count.png")
    plot_accuracy_vs_count(runs, written[-1])
    shots = {label: {**(extra_scalars or {}).get(label, {}), "mean_class": _nanmean(run.accuracy),
                     **run.shot_accuracies()} for label, run in runs.items()}
    written.append(out / "shot_accuracy.png")
    plot_shot_accuracy(shots, written[-1])
    return written
