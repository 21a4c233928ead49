"""Ensembles of independently trained ltlib runs, evaluated by averaging their outputs.

BBN's supplementary table 6 compares BBN with ensembles of two single-branch models: one trained with
the uniform sampler and one with the class-balanced (or the reversed) sampler. ``method=ensemble``
rebuilds each member from its run directory (``results.json`` gives the method, backbone and
checkpoint), freezes it, and evaluates the average of the members' logits (or probabilities) on the
current data's validation and test splits. It trains nothing: the fit ends before its first epoch::

    python -m ltlib.run method=ensemble data=cifar10_lt data.imbalance_ratio=50 \\
        'method.members=[multirun/X/0_ce_cifar10_lt,multirun/X/1_ce_cifar10_lt]'
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ltlib.errors import LtlibError, unknown_name
from ltlib.methods.base import LongTailMethod, OptimConfig

AVERAGES = ("logits", "probabilities")


def resolve_member(path: str | Path) -> tuple[Path, Path, dict[str, Any]]:
    """``(run_dir, checkpoint, results)`` of an ensemble member given as a run directory (its
    ``results.json`` names the checkpoint) or as a checkpoint file inside ``<run_dir>/checkpoints/``."""
    given = Path(path).expanduser()
    run_dir = given.parent.parent if given.is_file() else given
    results_file = run_dir / "results.json"
    if not results_file.is_file():
        raise LtlibError(f"ensemble member {str(path)!r}: no results.json in {run_dir}; give the run directory "
                         "of a finished python -m ltlib.run")
    try:
        results = json.loads(results_file.read_text())
    except ValueError as exc:
        raise LtlibError(f"ensemble member {str(path)!r}: {results_file} is not valid JSON ({exc})") from None
    if given.is_file():
        checkpoint = given
    elif results.get("checkpoint"):
        checkpoint = run_dir / results["checkpoint"]
    else:
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise LtlibError(f"ensemble member {str(path)!r}: no checkpoint file at {checkpoint}")
    return run_dir, checkpoint, results


def load_member(path: str | Path, num_classes: int, in_chans: int) -> tuple[LongTailMethod, dict[str, Any]]:
    """Rebuild the trained method of one run (as ``ltlib.run`` built it) with its checkpoint's weights.

    Returns the frozen module in eval mode and a summary (run directory, method, its own test top-1).
    """
    from hydra.utils import instantiate

    run_dir, checkpoint, results = resolve_member(path)
    config = results.get("config") or {}
    per_class = results.get("per_class") or []
    if len(per_class) != num_classes:
        raise LtlibError(f"ensemble member {str(path)!r} was trained on {len(per_class)} classes; "
                         f"the data here has {num_classes}")
    backbone = instantiate(config["backbone"], in_chans=in_chans)
    member = instantiate(config["method"])(
        backbone=backbone,
        num_classes=num_classes,
        class_counts=[int(row["train_count"]) for row in per_class],
        class_names=[str(row.get("name", i)) for i, row in enumerate(per_class)],
        optim=config.get("optim"),
        many_threshold=config.get("many_threshold", 100),
        few_threshold=config.get("few_threshold", 20),
    )
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    try:
        member.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise LtlibError(f"ensemble member {str(path)!r}: {checkpoint} does not fit its own config: {first}") from None
    for parameter in member.parameters():
        parameter.requires_grad_(False)
    member.eval()
    test = (results.get("metrics") or {}).get("test") or {}
    summary = {"run_dir": str(run_dir), "checkpoint": str(checkpoint), "method": results.get("method"),
               "test_top1": test.get("top1"), "test_mean_class_acc": test.get("mean_class_acc")}
    return member, summary


def _first_conv_in_channels(module: nn.Module) -> int:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            return layer.in_channels
    return 3


class Ensemble(LongTailMethod):
    """Average the outputs of independently trained runs (BBN supplementary table 6).

    Args:
        members: run directories (or checkpoint files inside them) of two or more finished runs on data
            with the same classes.
        average: ``logits`` (default: the mean of the members' evaluation logits) or ``probabilities``
            (the log of the mean softmax).
        backbone: only used to read the input channels of the data; each member builds its own.
        Remaining arguments: see :class:`~ltlib.methods.base.LongTailMethod`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        class_counts: Sequence[int],
        optim: OptimConfig | Mapping[str, Any] | None = None,
        members: Sequence[str] | None = None,
        average: str = "logits",
        **kwargs: Any,
    ) -> None:
        if average not in AVERAGES:
            raise unknown_name("ensemble average", average, AVERAGES)
        if members is None or isinstance(members, str) or len(members) < 2:
            raise LtlibError(f"method.members={members!r} is invalid; give two or more run directories, e.g. "
                             "'method.members=[outputs/a,outputs/b]'")
        in_chans = _first_conv_in_channels(backbone)
        super().__init__(backbone, num_classes, class_counts, optim, **kwargs)
        del self.backbone  # each member has its own
        loaded = [load_member(path, num_classes, in_chans) for path in members]
        self.members = nn.ModuleList([member for member, _ in loaded])
        self.member_summaries = [summary for _, summary in loaded]
        self.average = average
        # Training nothing is the point: no optimiser, frozen members in eval mode.
        warnings.filterwarnings("ignore", message=r".*configure_optimizers.* returned .None.*")
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
        self.save_hyperparameters({"members": [str(m) for m in members], "average": average})

    def build_classifier(self, in_features: int, num_classes: int) -> nn.Module:
        return nn.Identity()

    def forward(self, images: Tensor) -> Tensor:
        outputs = torch.stack([member.evaluate_logits(images) for member in self.members])
        if self.average == "logits":
            return outputs.mean(dim=0)
        return outputs.softmax(dim=-1).mean(dim=0).log()

    def compute_loss(self, batch: Any) -> Tensor:
        raise LtlibError("method=ensemble evaluates trained runs and does not train")

    def train(self, mode: bool = True) -> Ensemble:
        """Members stay in eval mode: an ensemble never updates them."""
        super().train(mode)
        if hasattr(self, "members"):
            self.members.eval()
        return self

    def on_train_start(self) -> None:
        # Nothing to train: end the fit before its first epoch; run.py then evaluates this module as is.
        self.trainer.should_stop = True

    def configure_optimizers(self) -> None:
        return None

    def on_run_end(self, output_dir: Path) -> dict[str, Any]:
        """The members and their own test accuracies, for comparison with the ensemble's."""
        return {"ensemble": {"average": self.average, "members": self.member_summaries}}
