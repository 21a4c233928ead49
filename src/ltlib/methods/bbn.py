"""BBN: Bilateral-Branch Network with cumulative learning (Zhou et al., CVPR 2020).

Two branches share the backbone's trunk; each has its own last residual block. The *conventional*
branch (the backbone's ``last_block``) trains on a uniform sampler, the *re-balancing* branch (a
fresh copy of that block, :meth:`Backbone.copy_last_block`) on a reversed sampler (eq. 4). Their
pooled features ``f_c`` and ``f_r`` are mixed by the adaptor weight ``alpha`` (eq. 1)::

    z = alpha * W_c^T f_c + (1 - alpha) * W_r^T f_r                                   (eq. 1)
    L = alpha * CE(z, y_c) + (1 - alpha) * CE(z, y_r)                                 (eq. 3)
    alpha = 1 - (T / T_max)^2   (parabolic decay, eq. 5; other adaptors in table 4)

At inference both branches see the test image, ``alpha = 0.5`` and the two logits are added (section
4.4). ``combiner`` picks the parametrisation of eq. 1 (see :class:`BilateralClassifier`), ``adaptor``
any schedule of :mod:`ltlib.schedules`, ``rebalancing_sampler`` the re-balancing branch's sampler
(table 3). The official code (Megvii-Nanjing/BBN) holds alpha constant within an epoch and computes it
from ``(epoch - 1) / T_max`` with epochs counted from 1, i.e. ``training_progress()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltlib.analysis.weight_norms import classifier_weight_norms, plot_weight_norms, weight_norm_summary
from ltlib.data.samplers import check_sampler
from ltlib.errors import check_in_range, check_int, unknown_name
from ltlib.methods.base import LongTailMethod
from ltlib.schedules import BetaSchedule, get_schedule, list_schedules

COMBINERS = ("official", "paper")
#: How the training step runs the shared trunk over the two sub-batches (docs/speed.md).
TRUNK_PASSES = ("separate", "concatenated")
#: The adaptor whose alpha the official code draws afresh at every iteration (``alpha_per_step=None``).
PER_STEP_ADAPTORS = ("beta",)
#: Inference weight of the conventional branch (section 4.4).
INFERENCE_ALPHA = 0.5


class BilateralClassifier(nn.Module):
    """The classifier of eq. 1 in one of two parametrisations of the same function family.

    * ``paper``: two linear classifiers ``W_c`` and ``W_r`` applied to the weighted features, their
      outputs added (section 4.1: "the weighted feature vectors alpha f_c and (1 - alpha) f_r will be
      sent into the classifiers W_c and W_r respectively and the outputs will be integrated together
      by element-wise addition"): ``z = W_c (alpha f_c) + b_c + W_r ((1 - alpha) f_r) + b_r``.
      Eq. 1 writes no bias; each classifier is a fully-connected layer, so each has one when
      ``bias`` is true (the two biases only ever act through their sum).
    * ``official``: the official code's one linear layer over the concatenation
      ``[2 alpha f_c, 2 (1 - alpha) f_r]`` with one shared bias ``b``.

    With ``W_c = 2 W[:, :D]``, ``W_r = 2 W[:, D:]`` and ``b_c + b_r = b`` both give identical logits for
    every alpha; they differ in how SGD and weight decay act on the parameters.
    """

    def __init__(self, in_features: int, num_classes: int, combiner: str = "official", bias: bool = True) -> None:
        super().__init__()
        if combiner not in COMBINERS:
            raise unknown_name("BBN combiner", combiner, COMBINERS)
        self.combiner = combiner
        self.in_features = in_features
        if combiner == "paper":
            self.conventional = nn.Linear(in_features, num_classes, bias=bias)
            self.rebalancing = nn.Linear(in_features, num_classes, bias=bias)
        else:
            self.fc = nn.Linear(2 * in_features, num_classes, bias=bias)

    def forward(self, f_c: Tensor, f_r: Tensor, alpha: float) -> Tensor:
        """Logits ``z`` of eq. 1 for conventional features ``f_c`` and re-balancing features ``f_r``."""
        if self.combiner == "paper":
            return self.conventional(alpha * f_c) + self.rebalancing((1.0 - alpha) * f_r)
        return self.fc(torch.cat((2.0 * alpha * f_c, 2.0 * (1.0 - alpha) * f_r), dim=1))

    def inference_weights(self) -> tuple[Tensor, Tensor]:
        """``(W_c, W_r)``, each ``[C, D]``, as they act on ``f_c`` and ``f_r`` at inference (alpha = 0.5),
        so that the two parametrisations give comparable weight norms (BBN figure 4)."""
        if self.combiner == "paper":
            return INFERENCE_ALPHA * self.conventional.weight, (1.0 - INFERENCE_ALPHA) * self.rebalancing.weight
        d = self.in_features
        return 2.0 * INFERENCE_ALPHA * self.fc.weight[:, :d], 2.0 * (1.0 - INFERENCE_ALPHA) * self.fc.weight[:, d:]


class BBN(LongTailMethod):
    """Bilateral-branch network with cumulative learning.

    Args:
        rebalancing_sampler: the re-balancing branch's sampler, ``reversed`` (eq. 4, default),
            ``class_balanced`` or ``uniform`` (table 3), or any other name of
            :func:`ltlib.data.samplers.list_samplers`. The conventional branch always samples uniformly.
        combiner: ``official`` (default) or ``paper``, see :class:`BilateralClassifier`.
        classifier_bias: whether the classifier(s) have a bias (the official configs: yes).
        adaptor: a schedule name of :mod:`ltlib.schedules` giving alpha from training progress:
            ``parabolic_decay`` (eq. 5, default), ``linear_decay``, ``cosine_decay``, ``equal_weight``,
            ``beta`` (draws from Beta(0.2, 0.2)), ``parabolic_increment`` (table 4).
        alpha: a fixed alpha in [0, 1] instead of the adaptor (null: use the adaptor).
        alpha_per_step: recompute alpha at every optimiser step instead of once per epoch; null picks
            what the official code does: per step for ``beta`` (a fresh draw per iteration), per epoch
            otherwise.
        adaptor_epochs: the ``T_max`` of the adaptor in epochs; null means ``trainer.max_epochs`` (eq.
            5). The official code uses 100 for its 90-epoch and 200 for its 180-epoch iNaturalist runs.
        adaptor_seed: seed of the ``beta`` adaptor's draws (the run's ``seed`` in the configs), each a
            function of (adaptor_seed, optimiser step) (or epoch, with ``alpha_per_step=False``).
        trunk_pass: ``separate`` (default; the paper's and official code's training step: the trunk runs
            once per sub-batch, so batch norm normalises each with its own statistics) or
            ``concatenated`` (one trunk pass over both sub-batches: fewer, larger kernels, but batch norm
            then uses the statistics of the two together, a different model; see docs/speed.md).
        Remaining arguments: see :class:`~ltlib.methods.base.LongTailMethod`.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, class_counts: Sequence[int], *,
        rebalancing_sampler: str = "reversed",
        combiner: str = "official",
        classifier_bias: bool = True,
        adaptor: str = "parabolic_decay",
        alpha: float | None = None,
        alpha_per_step: bool | None = None,
        adaptor_epochs: int | None = None,
        trunk_pass: str = "separate",
        adaptor_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if trunk_pass not in TRUNK_PASSES:
            raise unknown_name("BBN trunk_pass", trunk_pass, TRUNK_PASSES)
        check_sampler(rebalancing_sampler, "rebalancing_sampler")
        if combiner not in COMBINERS:
            raise unknown_name("BBN combiner", combiner, COMBINERS)
        if adaptor not in list_schedules():
            raise unknown_name("BBN adaptor", adaptor, list_schedules())
        if alpha is not None:
            check_in_range("BBN alpha", alpha, 0.0, 1.0)
        check_int("BBN adaptor_epochs", adaptor_epochs, 1, optional=True)
        head = BilateralClassifier(backbone.out_dim, num_classes, combiner, bool(classifier_bias))
        super().__init__(backbone, num_classes, class_counts, head=head, **kwargs)
        self.combiner = combiner
        self.classifier_bias = bool(classifier_bias)
        self.rebalancing_block = backbone.copy_last_block()
        self.train_streams = {"conventional": "uniform", "rebalancing": rebalancing_sampler}
        self.adaptor_name = adaptor
        self.adaptor = get_schedule(adaptor)
        self.fixed_alpha = None if alpha is None else float(alpha)
        self.alpha_per_step = adaptor in PER_STEP_ADAPTORS if alpha_per_step is None else bool(alpha_per_step)
        self.adaptor_epochs = adaptor_epochs
        self.trunk_pass = trunk_pass
        self.adaptor_seed = int(adaptor_seed)
        self._alpha_sum = 0.0
        self._alpha_steps = 0

    # ----------------------------------------------------------------- model
    def conventional_features(self, images: Tensor) -> Tensor:
        """``f_c``: trunk, conventional block (the backbone's last block), global average pooling."""
        return self.backbone.pool(self.backbone.last_block(self.backbone.trunk(images)))

    def rebalancing_features(self, images: Tensor) -> Tensor:
        """``f_r``: trunk, re-balancing block, global average pooling."""
        return self.backbone.pool(self.rebalancing_block(self.backbone.trunk(images)))

    def branch_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(f_c, f_r)`` of the same images, the trunk run once (inference, section 4.4)."""
        shared = self.backbone.trunk(images)
        return (self.backbone.pool(self.backbone.last_block(shared)),
                self.backbone.pool(self.rebalancing_block(shared)))

    def penultimate_features(self, images: Tensor) -> Tensor:
        """``[f_c, f_r]`` of the same images: the input of the official combiner's fc at inference."""
        return torch.cat(self.branch_features(images), dim=1)

    def forward(self, images: Tensor) -> Tensor:
        """Inference logits: both branches on ``images``, alpha = 0.5, logits added (section 4.4)."""
        f_c, f_r = self.branch_features(images)
        return self.classifier(f_c, f_r, INFERENCE_ALPHA)

    def evaluate_logits(self, images: Tensor) -> Tensor:
        return self(images)

    # ----------------------------------------------------------------- alpha
    def alpha_at(self, progress: float) -> float:
        """The adaptor's alpha at training progress ``progress`` in [0, 1] (or the fixed alpha)."""
        if self.fixed_alpha is not None:
            return self.fixed_alpha
        return float(self.adaptor(min(max(progress, 0.0), 1.0)))

    def current_alpha(self) -> float:
        """Alpha for the current step: ``training_progress()`` (constant within an epoch, 0 in the first,
        as the official ``(epoch - 1) / T_max``) or per step, over ``adaptor_epochs`` when set."""
        if self.fixed_alpha is None and isinstance(self.adaptor, BetaSchedule):
            # A fresh draw per step (or epoch), never a function of the clipped progress, which stops at 1
            # past adaptor_epochs and would repeat one value from there on.
            key = self.trainer.global_step if self._trainer is not None and self.alpha_per_step else (
                self.current_epoch if self._trainer is not None else 0)
            return self.adaptor.draw(key, self.adaptor_seed)
        progress = self.training_progress(per_step=self.alpha_per_step)
        if self.adaptor_epochs is not None:
            progress = progress * self.max_epochs / self.adaptor_epochs
        return self.alpha_at(progress)

    # -------------------------------------------------------------- training
    def compute_loss(self, batch: Mapping[str, Sequence[Tensor]]) -> Tensor:
        """Eq. 3 on a ``{"conventional": (x_c, y_c), "rebalancing": (x_r, y_r)}`` batch. With
        ``trunk_pass="separate"`` each sub-batch has its own forward pass through the trunk, so batch norm
        sees each one on its own."""
        images_c, targets_c = batch["conventional"]
        images_r, targets_r = batch["rebalancing"]
        alpha = self.current_alpha()
        self._alpha_sum += alpha
        self._alpha_steps += 1
        if self.trunk_pass == "concatenated":
            shared_c, shared_r = self.backbone.trunk(torch.cat((images_c, images_r))).split(
                [images_c.shape[0], images_r.shape[0]])
            f_c = self.backbone.pool(self.backbone.last_block(shared_c))
            f_r = self.backbone.pool(self.rebalancing_block(shared_r))
        else:
            f_c, f_r = self.conventional_features(images_c), self.rebalancing_features(images_r)
        logits = self.classifier(f_c, f_r, alpha)
        return alpha * F.cross_entropy(logits, targets_c) + (1.0 - alpha) * F.cross_entropy(logits, targets_r)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._alpha_sum, self._alpha_steps = 0.0, 0

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # alpha is a host float, the same on every rank (the epoch mean when it changes per step).
        if self._alpha_steps:
            self.log("train/alpha", self._alpha_sum / self._alpha_steps, on_step=False, on_epoch=True,
                     sync_dist=True)

    # ------------------------------------------------------------ end of run
    def class_weight_norms(self) -> dict[str, Tensor]:
        """Per-class l2-norms of ``W_c``, ``W_r`` and ``[W_c, W_r]`` as they act at inference (BBN figure 4's
        BBN-CB, BBN-RB and BBN-ALL)."""
        w_c, w_r = self.classifier.inference_weights()
        return {"BBN-CB (W_c)": classifier_weight_norms(w_c), "BBN-RB (W_r)": classifier_weight_norms(w_r),
                "BBN-ALL ([W_c, W_r])": classifier_weight_norms(torch.cat((w_c, w_r), dim=1))}

    def on_run_end(self, output_dir: Path) -> dict[str, Any]:
        """BBN figure 4: per-class l2-norms of W_c, W_r and the combined classifier [W_c, W_r] (the
        weights as they act at inference), with their standard deviation, in ``weight_norms.png``."""
        norms = self.class_weight_norms()
        plot_weight_norms(norms, self.class_counts.tolist(), Path(output_dir) / "weight_norms.png",
                          title=f"BBN classifier weight norms ({self.combiner} combiner)")
        return {"weight_norms": weight_norm_summary(norms)}
