"""The one LightningModule every ltlib method extends.

:class:`LongTailMethod` owns what all methods share: the optimiser and learning-rate schedule, the
training-progress counter that schedules read (BBN's alpha, FBL's alpha(t)), evaluation through
:meth:`evaluate_logits`, and long-tail metrics accumulated on the device and synced once per epoch.
A method overrides :meth:`compute_loss` (and :meth:`evaluate_logits` when inference differs from a
plain forward pass) and declares the sampler streams it trains on in :attr:`train_streams`. A method
with several evaluation rules (the two-head model's K -> C prediction) records the alternatives beside
the configured one with :meth:`add_evaluation_variants` and :meth:`evaluate_variants`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import SumMetric

from ltlib.analysis.weight_norms import classifier_weight_norms, plot_weight_norms, weight_norm_summary
from ltlib.errors import LtlibError, check_choice, check_in_range
from ltlib.methods.reweighting import ClassReweighting
from ltlib.metrics import LongTailMetrics

log = logging.getLogger("ltlib")

LR_SCHEDULES = ("multistep", "cosine", "constant")
#: How a method's linear classifier layers are initialised (``method.classifier_weight_init``).
CLASSIFIER_INITS = ("auto", "pytorch", "kaiming_normal", "xavier_uniform")


@dataclass
class OptimConfig:
    """SGD with linear warm-up and a decay schedule (the recipe shared by the three papers).

    ``decay_factor`` multiplies the learning rate at each of ``milestones`` (epochs, counted from 0 as
    Lightning does, so milestone 120 means "from the 121st epoch on", as in the papers' code).
    Warm-up rises linearly from ``warmup_start_factor * lr`` to ``lr`` over ``warmup_epochs``,
    updated every step (``warmup_per_step=True``) or once per epoch.
    """

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    nesterov: bool = False
    warmup_epochs: int = 5
    warmup_start_factor: float = 0.0
    warmup_per_step: bool = True
    schedule: str = "multistep"
    milestones: list[int] = field(default_factory=lambda: [120, 160])
    decay_factor: float = 0.01
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        check_in_range("optim.lr", self.lr, 0.0, low_inclusive=False)
        check_in_range("optim.momentum", self.momentum, 0.0, 1.0)
        check_in_range("optim.weight_decay", self.weight_decay, 0.0)
        check_in_range("optim.warmup_epochs", self.warmup_epochs, 0)
        check_in_range("optim.warmup_start_factor", self.warmup_start_factor, 0.0, 1.0)
        check_in_range("optim.decay_factor", self.decay_factor, 0.0, 1.0, low_inclusive=False)
        check_choice("optim.schedule", self.schedule, LR_SCHEDULES)
        self.milestones = sorted(int(m) for m in self.milestones)

    def lr_factor(self, step: int, steps_per_epoch: int, max_epochs: int) -> float:
        """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
        epoch = step // max(steps_per_epoch, 1)
        factor = 1.0
        warmup_steps = self.warmup_epochs * steps_per_epoch
        if step < warmup_steps:
            done = (step + 1) / warmup_steps if self.warmup_per_step else (epoch + 1) / self.warmup_epochs
            factor = self.warmup_start_factor + (1.0 - self.warmup_start_factor) * done
        if self.schedule == "multistep":
            factor *= self.decay_factor ** sum(epoch >= m for m in self.milestones)
        elif self.schedule == "cosine":
            span = max(max_epochs * steps_per_epoch - warmup_steps, 1)
            t = min(max(step - warmup_steps, 0) / span, 1.0)
            floor = self.min_lr / self.lr
            factor *= floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        return factor


def plain_container(value: Any) -> Any:
    """``value`` with OmegaConf containers turned into plain dicts and lists."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value


def resolve_classifier_init(name: str, backbone: nn.Module) -> str:
    """``auto`` -> ``kaiming_normal`` for a CIFAR ResNet backbone, ``pytorch`` otherwise."""
    if name != "auto":
        return name
    from ltlib.backbones.cifar_resnet import CifarResNet

    return "kaiming_normal" if isinstance(backbone, CifarResNet) else "pytorch"


def init_classifier(classifier: nn.Module, scheme: str) -> None:
    """Apply ``scheme`` (``pytorch``, ``kaiming_normal`` or ``xavier_uniform``) to every ``nn.Linear`` inside
    ``classifier``; other layers (LDAM's cosine classifier, the two-head model's grouped conv) keep their own."""
    if scheme == "pytorch":
        return
    for layer in classifier.modules():
        if not isinstance(layer, nn.Linear):
            continue
        if scheme == "kaiming_normal":
            nn.init.kaiming_normal_(layer.weight)  # the bias keeps nn.Linear's default, as LDAM-DRW's code
        else:
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class LongTailMethod(L.LightningModule):
    """Base of every method: a backbone, a classification head, and the shared training machinery.

    The protocol other parts of ltlib read (declared here, overridden by the methods that differ):
    :attr:`train_streams` and :attr:`train_with_index` (what the DataModule feeds), :meth:`compute_loss`,
    :meth:`evaluate_logits`, :meth:`penultimate_features` (the classifier's input: feature analyses),
    :meth:`class_weight_norms` (per-class classifier weight norms: ``on_run_end`` and the diagnostics),
    :meth:`freeze` (submodules kept fixed and in eval mode), :meth:`set_class_reweighting` /
    :meth:`active_class_weights` (per-class loss weights, deferred or not) and :meth:`on_run_end`.
    Hyper-parameters are the constructor's arguments (``save_hyperparameters``), so
    ``load_from_checkpoint(path, backbone=..., class_counts=...)`` rebuilds any method.

    Args:
        backbone: a zoo backbone (``ltlib.backbones.create_backbone``) exposing ``out_dim``.
        num_classes: number of classes C.
        class_counts: training images per class (from ``LongTailDataModule.class_counts``).
        optim: an :class:`OptimConfig` or a mapping of its fields.
        class_names: optional names, used in logs and results.
        many_threshold, few_threshold: shot groups (many > 100, few < 20 by convention).
        classifier_weight_init: the classifier's linear layers: ``pytorch`` keeps ``nn.Linear``'s own
            initialisation (weight and bias U(-1/sqrt(D), 1/sqrt(D)), std about 0.072 for D = 64: the
            official BBN code); ``kaiming_normal`` draws the weight from Kaiming-normal (fan_in, gain
            sqrt(2): std sqrt(2 / D), 0.177 for D = 64) and keeps the bias, as the ``_weights_init`` of
            LDAM-DRW's and FBL's CIFAR ResNet-32 does; ``auto``: ``kaiming_normal`` on a CIFAR ResNet
            backbone (the nets those codes build), ``pytorch`` on every other backbone;
            ``xavier_uniform``: Glorot-uniform weight and zero bias, TensorFlow's dense-layer default (Cui et
            al.'s class-balanced-loss code, whose numbers BBN table 1 prints for CE, Focal and CB-Focal).
        head: the classification head; ``None`` builds ``nn.Linear(backbone.out_dim, num_classes)``.
            Methods with another head (BBN's bilateral classifier, LDAM's cosine classifier, the
            two-head model's K-way head) build it and pass it here.
    """

    #: stream name -> sampler name; the DataModule reads this to build the training batches.
    train_streams: Mapping[str, str] = {"main": "uniform"}
    #: whether training batches carry each image's dataset position as a third entry (the two-head model).
    train_with_index: bool = False
    #: the alternative evaluation rules (set by :meth:`add_evaluation_variants`).
    _variant_names: tuple[str, ...] = ()

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        class_counts: Sequence[int],
        optim: OptimConfig | Mapping[str, Any] | None = None,
        class_names: Sequence[str] | None = None,
        many_threshold: int = 100,
        few_threshold: int = 20,
        classifier_weight_init: str = "pytorch",
        head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if type(self).compute_loss is LongTailMethod.compute_loss:
            raise TypeError(f"{type(self).__name__} must define compute_loss(batch)")
        if len(class_counts) != num_classes:
            raise LtlibError(f"class_counts has {len(class_counts)} entries; expected num_classes={num_classes}")
        self.optim = optim if isinstance(optim, OptimConfig) else OptimConfig(**dict(optim or {}))
        # Every constructor argument of the whole __init__ chain (the subclass's too), except what a checkpoint
        # cannot or need not hold: modules and the data's counts and names (load_from_checkpoint takes them).
        self.save_hyperparameters(ignore=["backbone", "head", "class_counts", "class_names", "optim"])
        # Plain containers (Hydra passes DictConfig / ListConfig), so that checkpoints load with weights_only.
        self.save_hyperparameters({**{k: plain_container(v) for k, v in self.hparams.items()},
                                   "optim": asdict(self.optim)})
        self.backbone = backbone
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        self.register_buffer("class_counts", torch.as_tensor(list(class_counts), dtype=torch.long), persistent=False)
        check_choice("method.classifier_weight_init", classifier_weight_init, CLASSIFIER_INITS)
        self.classifier = head if head is not None else nn.Linear(backbone.out_dim, num_classes)
        self.classifier_weight_init = resolve_classifier_init(classifier_weight_init, backbone)
        init_classifier(self.classifier, self.classifier_weight_init)
        self._frozen: list[nn.Module] = []
        self.reweighting = ClassReweighting()
        self.register_buffer("class_weights", None, persistent=False)
        metric_args = dict(num_classes=num_classes, class_counts=list(class_counts),
                           many_threshold=many_threshold, few_threshold=few_threshold)
        self.val_metrics = LongTailMetrics(**metric_args)
        self.test_metrics = LongTailMetrics(**metric_args)
        self._metric_args = metric_args
        # Evaluation variants (add_evaluation_variants): none by default.
        self.variant_group: str | None = None
        self.configured_variant: str | None = None
        self.variant_metrics = nn.ModuleDict()
        self.last_variant_metrics: dict[str, dict[str, dict[str, Tensor]]] = {}
        # Epoch mean of the training loss: sums kept on the device, synced at epoch end. NaN checks are
        # off because torchmetrics' check reads the value on the host every step.
        self.train_loss_sum = SumMetric(nan_strategy="disable")
        self.train_loss_count = SumMetric(nan_strategy="disable")
        self.last_metrics: dict[str, dict[str, Tensor]] = {}

    # ----------------------------------------------------------------- model
    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.backbone(images))

    def evaluate_logits(self, images: Tensor) -> Tensor:
        """Logits used for validation and test (BBN overrides: both branches, alpha = 0.5)."""
        return self(images)

    def penultimate_features(self, images: Tensor) -> Tensor:
        """The representation the classifier reads, ``[B, D]`` (BBN: ``[f_c, f_r]``; cRT: the frozen features)."""
        return self.backbone(images)

    def class_weight_norms(self) -> dict[str, Tensor]:
        """Per-class l2-norms of the classifier weights as they act at inference, ``{name: [C]}`` (BBN figure 4,
        two-head figure 3); empty when the head has no ``[C, D]`` weight. Methods with another head override."""
        weight = getattr(self.classifier, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[0] != self.num_classes:
            return {}
        return {"classifier": classifier_weight_norms(weight)}

    def freeze(self, *modules: nn.Module) -> None:
        """Fix ``modules``: no gradients, and eval mode kept through every ``train()`` call (their batch-norm
        statistics never update). cRT's stage-1 representation, FBL's pretrained trunk, an ensemble's members."""
        for module in modules:
            module.requires_grad_(False)
            module.eval()
            self._frozen.append(module)

    def train(self, mode: bool = True) -> LongTailMethod:
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    # ------------------------------------------------------ class re-weighting
    def set_class_reweighting(self, reweighting: ClassReweighting) -> None:
        """Use per-class loss weights (``reweighting.weighting``) from ``reweighting.from_epoch`` on; the
        weights are a non-persistent buffer (they follow the module's device)."""
        self.reweighting = reweighting
        self.class_weights = reweighting.weights(self.class_counts.tolist())

    @property
    def reweight_epoch(self) -> int:
        """The first epoch (0-based) whose loss uses the class weights (:meth:`ClassReweighting.start_epoch`)."""
        return self.reweighting.start_epoch(self.optim, self.max_epochs)

    def active_class_weights(self, epoch: int | None = None) -> Tensor | None:
        """The per-class loss weights in force in ``epoch`` (default: the current one; None: unweighted, or
        before :attr:`reweight_epoch`)."""
        epoch = self.current_epoch if epoch is None else epoch
        if self.class_weights is None or epoch < self.reweight_epoch:
            return None
        return self.class_weights

    def on_train_start(self) -> None:
        if self.class_weights is not None and self.reweight_epoch >= self.max_epochs:
            log.warning("reweight_from_epoch=%d >= max_epochs=%d: the class weights never switch on",
                        self.reweight_epoch, self.max_epochs)

    def on_train_epoch_start(self) -> None:
        if self.class_weights is not None and self.reweighting.deferred(self.optim, self.max_epochs):
            on = float(self.active_class_weights() is not None)
            self.log("train/class_weights_on", on, on_step=False, on_epoch=True)

    # ---------------------------------------------------- evaluation variants
    @property
    def evaluation_variants(self) -> tuple[str, ...]:
        """Names of the alternative evaluation rules recorded besides the configured one (none by default)."""
        return tuple(self._variant_names)

    def add_evaluation_variants(self, group: str, configured: str, others: Sequence[str]) -> None:
        """Evaluate alternative rules of option ``group`` besides the ``configured`` one on every validation
        and test pass, from the same forward pass (:meth:`evaluate_variants`).

        Each rule ``name`` in ``others`` gets its own :class:`LongTailMetrics` for validation and test
        (accumulated on the device like the standard ones, synced once per epoch). The standard
        ``val/*`` / ``test/*`` metrics stay those of the configured rule (checkpoint selection reads them);
        every rule, the configured one included, is also logged as ``val_<name>/*`` / ``test_<name>/*``, kept
        in :attr:`last_variant_metrics` (``[name][split]``, ``LongTailMetrics.compute()`` dicts) and written
        to ``results.json`` as ``metrics_by_<group>``. Call it in ``__init__`` (the metrics move with the module).
        """
        others = [str(name) for name in others if name != configured]
        for name in [configured, *others]:
            if not name.isidentifier():
                raise LtlibError(f"evaluation variant name {name!r} must be an identifier (it names logged metrics)")
        self.variant_group, self.configured_variant = str(group), str(configured)
        self.variant_metrics = nn.ModuleDict({f"{split}_{name}": LongTailMetrics(**self._metric_args)
                                              for split in ("val", "test") for name in others})
        self._variant_names = tuple(others)

    def evaluate_variants(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The configured rule's logits (what :meth:`evaluate_logits` returns) and ``{name: logits}`` of every
        rule in :attr:`evaluation_variants`, from one forward pass. Methods that add variants override it."""
        return self.evaluate_logits(images), {}

    def compute_loss(self, batch: Any) -> Tensor:
        """The training loss for one batch; every method defines it (checked in ``__init__``)."""
        raise TypeError(f"{type(self).__name__} does not define compute_loss")

    # -------------------------------------------------------------- progress
    @property
    def max_epochs(self) -> int:
        return int(self.trainer.max_epochs) if self._trainer is not None and self.trainer.max_epochs else 1

    @property
    def total_steps(self) -> int:
        return max(int(self.trainer.estimated_stepping_batches), 1)

    def training_progress(self, per_step: bool = False) -> float:
        """Training progress in [0, 1): the current epoch over the total (0 in the first epoch), or
        with ``per_step`` the optimiser step over the total. The one place schedules read it from."""
        if self._trainer is None:
            return 0.0
        if per_step:
            return min(self.trainer.global_step / self.total_steps, 1.0)
        return min(self.current_epoch / self.max_epochs, 1.0)

    # -------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch)
        # A device tensor: Lightning reads it only at its log and refresh intervals, never every step.
        # Logged only on the steps Lightning writes step logs (every log_every_n_steps): a self.log call is
        # about 1,800 Python calls, host time of the order of a small GPU step (BENCHMARKS.md).
        if self._trainer is None or (self.trainer.global_step + 1) % max(self.trainer.log_every_n_steps, 1) == 0:
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        batch_size = self._batch_size(batch)
        self.train_loss_sum.update(loss.detach() * batch_size)
        self.train_loss_count.update(torch.full_like(loss.detach(), batch_size))
        return loss

    def on_train_epoch_end(self) -> None:
        mean_loss = self.train_loss_sum.compute() / self.train_loss_count.compute().clamp(min=1)
        self.log("train/loss_epoch", mean_loss, sync_dist=True)
        self.train_loss_sum.reset()
        self.train_loss_count.reset()

    @staticmethod
    def _batch_size(batch: Any) -> int:
        if isinstance(batch, Mapping):
            batch = next(iter(batch.values()))
        return int(batch[1].shape[0])

    # ------------------------------------------------------------ evaluation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, targets = batch
        self._update_metrics("val", self.val_metrics, images, targets)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        images, targets = batch
        self._update_metrics("test", self.test_metrics, images, targets)

    def _update_metrics(self, split: str, metrics: LongTailMetrics, images: Tensor, targets: Tensor) -> None:
        if not self._variant_names:
            metrics.update(self.evaluate_logits(images), targets)
            return
        logits, variants = self.evaluate_variants(images)
        if variants.keys() != set(self._variant_names):
            raise LtlibError(f"{type(self).__name__}.evaluate_variants returned the variants {sorted(variants)}; "
                             f"expected {sorted(self._variant_names)}")
        metrics.update(logits, targets)
        for name, variant_logits in variants.items():
            self.variant_metrics[f"{split}_{name}"].update(variant_logits, targets)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def _log_metrics(self, split: str, metrics: LongTailMetrics) -> None:
        values = metrics.compute()  # synced across ranks here, once per epoch
        self.last_metrics[split] = {k: v.detach() for k, v in values.items()}
        scalars = self._scalars(split, values)
        if self.configured_variant is not None:
            by_name = {self.configured_variant: values}
            for name in self._variant_names:
                variant = self.variant_metrics[f"{split}_{name}"]
                by_name[name] = variant.compute()
                variant.reset()
            for name, result in by_name.items():
                self.last_variant_metrics.setdefault(name, {})[split] = {k: v.detach() for k, v in result.items()}
                scalars.update(self._scalars(f"{split}_{name}", result))
        # Already reduced across ranks by torchmetrics; sync_dist only tells Lightning they are global.
        self.log_dict(scalars, prog_bar=False, sync_dist=True)
        metrics.reset()

    @staticmethod
    def _scalars(prefix: str, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {f"{prefix}/{k}": values[k] for k in ("top1", "mean_class_acc", "many_acc", "medium_acc", "few_acc")
                if k in values}

    # ------------------------------------------------------------ end of run
    def on_run_end(self, output_dir: Path) -> dict[str, Any]:
        """Called once, on rank 0, after the final evaluation: write method-specific analysis files to
        ``output_dir`` and return extra entries for ``results.json``. The default plots the classifier's
        per-class weight norms (:meth:`class_weight_norms`; BBN figure 4) to ``weight_norms.png``."""
        norms = self.class_weight_norms()
        if not norms:
            return {}
        plot_weight_norms(norms, self.class_counts.tolist(), Path(output_dir) / "weight_norms.png",
                          title=f"Classifier weight norms ({type(self).__name__})")
        return {"weight_norms": weight_norm_summary(norms)}

    # ------------------------------------------------------------- optimiser
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimiser (crt freezes the backbone by overriding this)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise LtlibError(f"trainer.max_epochs={max_epochs!r} is not allowed; ltlib's learning-rate and "
                             "training-progress schedules need a finite number of epochs (an integer >= 1)")
        optimizer = torch.optim.SGD(self.parameter_groups(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        steps_per_epoch = max(self.total_steps // self.max_epochs, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cfg.lr_factor(step, steps_per_epoch, self.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
