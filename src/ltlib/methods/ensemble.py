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

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ltlib.errors import LtlibError, unknown_name
from ltlib.methods.base import LongTailMethod
from ltlib.runs import RunDir, Task, build_method, load_weights

AVERAGES = ("logits", "probabilities")


def resolve_member(path: str | Path) -> tuple[Path, Path, dict[str, Any]]:
    """``(run_dir, checkpoint, results)`` of an ensemble member given as a run directory (its
    ``results.json`` names the checkpoint) or as a checkpoint file inside ``<run_dir>/checkpoints/``."""
    given = Path(path).expanduser()
    run = RunDir.containing(given)
    try:
        results = run.results(required=True)
        checkpoint = given if given.is_file() else run.checkpoint("selected")
    except LtlibError as exc:
        raise LtlibError(f"ensemble member {str(path)!r}: {exc}") from None
    return run.path, checkpoint, results


def load_member(path: str | Path, num_classes: int, in_chans: int) -> tuple[LongTailMethod, dict[str, Any]]:
    """Rebuild the trained method of one run (as ``ltlib.run`` built it) with its checkpoint's weights.

    Returns the module (the ensemble freezes it) and a summary (run directory, method, its own test top-1).
    """
    run_dir, checkpoint, results = resolve_member(path)
    config = results.get("config") or {}
    task = Task.from_results(results, in_chans)
    if task.num_classes != num_classes:
        raise LtlibError(f"ensemble member {str(path)!r} was trained on {task.num_classes} classes; "
                         f"the data here has {num_classes}")
    member = build_method(config["method"], config.get("optim"), task, config["backbone"],
                          many_threshold=config.get("many_threshold", 100),
                          few_threshold=config.get("few_threshold", 20))
    load_weights(member, checkpoint, what=f"ensemble member {str(path)!r}: {checkpoint}")
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
        self, backbone: nn.Module, num_classes: int, class_counts: Sequence[int], *,
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
        super().__init__(backbone, num_classes, class_counts, head=nn.Identity(), **kwargs)
        del self.backbone  # each member has its own
        loaded = [load_member(path, num_classes, in_chans) for path in members]
        self.members = nn.ModuleList([member for member, _ in loaded])
        self.freeze(self.members)
        self.member_summaries = [summary for _, summary in loaded]
        self.average = average
        # Training nothing is the point: no optimiser, frozen members in eval mode.
        warnings.filterwarnings("ignore", message=r".*configure_optimizers.* returned .None.*")
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

    def forward(self, images: Tensor) -> Tensor:
        outputs = torch.stack([member.evaluate_logits(images) for member in self.members])
        if self.average == "logits":
            return outputs.mean(dim=0)
        return outputs.softmax(dim=-1).mean(dim=0).log()

    def compute_loss(self, batch: Any) -> Tensor:
        raise LtlibError("method=ensemble evaluates trained runs and does not train")

    def on_train_start(self) -> None:
        # Nothing to train: end the fit before its first epoch; run.py then evaluates this module as is.
        self.trainer.should_stop = True

    def configure_optimizers(self) -> None:
        return None

    def on_run_end(self, output_dir: Path) -> dict[str, Any]:
        """The members and their own test accuracies, for comparison with the ensemble's."""
        return {"ensemble": {"average": self.average, "members": self.member_summaries}}
