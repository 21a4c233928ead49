"""Classifier re-training on a frozen representation (BBN section 3 and table 5; Kang et al.'s cRT).

Stage 1 is any ltlib run; its checkpoint holds the representation (``backbone.*``, and for BBN the
re-balancing block ``rebalancing_block.*``). Stage 2 loads that representation, freezes it
bit-identically (parameters without gradients and outside the optimiser, batch norm kept in eval mode
so its running statistics never move) and trains a linear classifier, re-initialised from scratch
(BBN: "retrain classifiers from scratch"), with a chosen sampler and class weighting::

    python -m ltlib.run method=crt method.stage1_checkpoint=outputs/.../checkpoints/best.ckpt \\
        method.sampler=class_balanced

``branch`` chooses which representation of a BBN checkpoint to use (table 5): ``conventional`` (trunk
and conventional block, "BBN-CB"), ``rebalancing`` (trunk and re-balancing block, "BBN-RB") or
``both`` (the two pooled features concatenated). Any other checkpoint has one representation,
``conventional``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltlib.backbones.base import state_dict_mismatches
from ltlib.data.samplers import check_sampler
from ltlib.errors import LtlibError, unknown_name
from ltlib.methods.base import LongTailMethod
from ltlib.methods.reweighting import ClassReweighting
from ltlib.runs import RunDir, read_state_dict

BRANCHES = ("conventional", "rebalancing", "both")
CLASSIFIER_INITS = ("scratch", "stage1")
_BACKBONE, _REBALANCING, _CLASSIFIER = "backbone.", "rebalancing_block.", "classifier."


def load_stage1_state(path: str | Path | None, option: str = "method.stage1_checkpoint") -> dict[str, Tensor]:
    """The model state dict of an ltlib (Lightning) checkpoint file, or a plain saved state dict.

    Raises LtlibError, naming ``option`` and the path, when the file is missing, unreadable or holds no
    ltlib model (no ``backbone.*`` keys).
    """
    if path is None or str(path) == "":
        raise LtlibError(f"{option} is required: the stage-1 run's checkpoints/best.ckpt (or last.ckpt)")
    state = read_state_dict(path, key=option)
    if not any(str(k).startswith(_BACKBONE) for k in state):
        raise LtlibError(f"{option}={str(path)!r} holds no ltlib model (no backbone.* weights); "
                         "give a checkpoint written by python -m ltlib.run")
    return {str(k): v for k, v in state.items() if isinstance(v, Tensor)}


def is_bbn_state(state: Mapping[str, Tensor]) -> bool:
    """Whether a stage-1 state dict comes from BBN (it has a re-balancing block)."""
    return any(k.startswith(_REBALANCING) for k in state)


def representation_state(state: Mapping[str, Tensor], branch: str = "conventional"
                         ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Split a stage-1 state dict into ``(backbone_state, rebalancing_block_state)`` for ``branch``.

    ``conventional`` and ``both``: the backbone as trained (trunk and last block); ``rebalancing``: the
    trunk with BBN's re-balancing block in place of the last block. The second item is the re-balancing
    block for ``both``, else None.
    """
    if branch not in BRANCHES:
        raise unknown_name("crt branch", branch, BRANCHES)
    backbone = {k[len(_BACKBONE):]: v for k, v in state.items() if k.startswith(_BACKBONE)}
    rebalancing = {k[len(_REBALANCING):]: v for k, v in state.items() if k.startswith(_REBALANCING)}
    if branch == "conventional":
        return backbone, None
    if not rebalancing:
        raise LtlibError(f"crt branch={branch!r} needs a BBN checkpoint (with a re-balancing block); this one "
                         "has a single representation: use branch=conventional")
    if branch == "both":
        return backbone, rebalancing
    trunk = {k: v for k, v in backbone.items() if not k.startswith("last_block.")}
    return {**trunk, **{f"last_block.{k}": v for k, v in rebalancing.items()}}, None


def load_exactly(module: nn.Module, state: Mapping[str, Tensor], what: str, hint: str = "") -> None:
    """Load ``state`` into ``module`` requiring the same keys and shapes; else a one-line LtlibError."""
    problems = state_dict_mismatches(module.state_dict(), state)
    if problems:
        raise LtlibError(f"{what} does not fit: {'; '.join(problems)}{hint}")
    module.load_state_dict(dict(state), strict=True)


def _stage1_backbone_hint(path: str | Path) -> str:
    """" (stage 1 used backbone=NAME)" from the stage-1 run's results.json, when there is one."""
    try:
        name = RunDir.containing(Path(path).expanduser().resolve()).results()["config"]["backbone"]["name"]
    except (LtlibError, KeyError, TypeError):
        return "; use the stage-1 run's backbone"
    return f"; stage 1 used backbone={name}"


class ClassifierRetraining(LongTailMethod):
    """Train a fresh linear classifier on the frozen representation of a stage-1 checkpoint.

    Args:
        stage1_checkpoint: path of the stage-1 checkpoint (any ltlib method; BBN for ``branch``).
        branch: ``conventional`` (default), ``rebalancing`` or ``both`` (BBN checkpoints, table 5).
        sampler: stage-2 sampler: ``class_balanced`` (default; cRT, BBN's best RS classifier),
            ``uniform``, ``reversed`` or ``square_root``.
        class_weighting: ``none`` (default), ``inverse_frequency`` (BBN's RW) or ``class_balanced``.
        beta: Cui et al.'s beta for ``class_balanced`` weighting.
        classifier_init: ``scratch`` (default: re-initialised, as BBN and cRT) or ``stage1`` (start
            from the stage-1 linear classifier, when it has one of the same shape).
        Remaining arguments: see :class:`~ltlib.methods.base.LongTailMethod`; the ``backbone`` must be
        built like the stage-1 one.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, class_counts: Sequence[int], *,
        stage1_checkpoint: str | None = None,
        branch: str = "conventional",
        sampler: str = "class_balanced",
        class_weighting: str = "none",
        beta: float = 0.9999,
        classifier_init: str = "scratch",
        **kwargs: Any,
    ) -> None:
        if branch not in BRANCHES:
            raise unknown_name("crt branch", branch, BRANCHES)
        check_sampler(sampler)
        if classifier_init not in CLASSIFIER_INITS:
            raise unknown_name("crt classifier_init", classifier_init, CLASSIFIER_INITS)
        state = load_stage1_state(stage1_checkpoint)
        backbone_state, rebalancing_state = representation_state(state, branch)
        reweighting = ClassReweighting(class_weighting, float(beta))
        in_features = 2 * backbone.out_dim if branch == "both" else backbone.out_dim
        super().__init__(backbone, num_classes, class_counts, head=nn.Linear(in_features, num_classes), **kwargs)
        self.branch = branch
        hint = _stage1_backbone_hint(stage1_checkpoint)
        source = f"the representation in {stage1_checkpoint}"
        load_exactly(self.backbone, backbone_state, f"{source} (branch {branch})", hint)
        self.freeze(self.backbone)
        if rebalancing_state is not None:
            self.rebalancing_block = backbone.copy_last_block()
            load_exactly(self.rebalancing_block, rebalancing_state, f"the re-balancing block in {stage1_checkpoint}",
                         hint)
            self.freeze(self.rebalancing_block)
        if classifier_init == "stage1":
            classifier_state = {k[len(_CLASSIFIER):]: v for k, v in state.items() if k.startswith(_CLASSIFIER)}
            load_exactly(self.classifier, classifier_state, f"the stage-1 classifier in {stage1_checkpoint}",
                         " (classifier_init=stage1 needs a plain linear classifier with as many classes)")
        self.train_streams = {"main": sampler}
        self.set_class_reweighting(reweighting)
        # The frozen representation is in eval mode on purpose; Lightning would warn about it.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


    def features(self, images: Tensor) -> Tensor:
        """The frozen representation's pooled features (``[f_c, f_r]`` for ``branch=both``)."""
        with torch.no_grad():
            if self.branch != "both":
                return self.backbone(images)
            shared = self.backbone.trunk(images)
            return torch.cat((self.backbone.pool(self.backbone.last_block(shared)),
                              self.backbone.pool(self.rebalancing_block(shared))), dim=1)

    def penultimate_features(self, images: Tensor) -> Tensor:
        """The classifier's input (what ``callbacks=feature_norms`` analyses)."""
        return self.features(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.features(images))

    def compute_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        images, targets = batch
        return F.cross_entropy(self(images), targets, weight=self.active_class_weights())

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Only the classifier is optimised (so weight decay never touches the representation)."""
        return [{"params": list(self.classifier.parameters())}]
