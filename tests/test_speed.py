"""Fast training settings leave results unchanged on the CPU; the fast trainer and phase timer work end to
end through the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from tests.conftest import run_cli
from torchmetrics import MeanMetric

from ltlib.backbones import create_backbone
from ltlib.errors import LtlibError
from ltlib.methods import StandardClassifier
from ltlib.methods.bbn import BBN
from ltlib.training.speed import (
    FastTraining,
    SpeedSettings,
    apply_speed_settings,
    compile_targets,
    disable_metric_nan_checks,
    fast_trainer,
)


def bbn_and_batch() -> tuple[BBN, dict]:
    torch.manual_seed(0)
    method = BBN(create_backbone("resnet20"), 3, [20, 8, 3], optim={})
    x = torch.randn(8, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    return method, {"conventional": [x, y], "rebalancing": [x.flip(0), y.flip(0)]}


def loss_and_grads(method, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    method.zero_grad(set_to_none=True)
    loss = method.compute_loss(batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in method.parameters() if p.grad is not None]


# compile with the eager backend: the modules run through dynamo's captured graphs, without inductor's
# C++ code generation, which takes minutes on a CPU.
@pytest.mark.parametrize("settings", [SpeedSettings(channels_last=True),
                                      SpeedSettings(channels_last=True, compile=True, compile_backend="eager")],
                         ids=["channels_last", "channels_last+compile"])
def test_fast_settings_leave_loss_and_gradients_unchanged(settings):
    method, batch = bbn_and_batch()
    fast = copy.deepcopy(method)
    done = apply_speed_settings(fast, settings)
    loss, grads = loss_and_grads(method, batch)
    fast_batch = batch
    if settings.channels_last:
        first = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d))
        assert first.weight.is_contiguous(memory_format=torch.channels_last) and not first.weight.is_contiguous()
        fast_batch = {k: [v[0].contiguous(memory_format=torch.channels_last), v[1]] for k, v in batch.items()}
    if settings.compile:
        assert done["compiled"] == ["backbone.last_block", "backbone.trunk", "rebalancing_block"]
    fast_loss, fast_grads = loss_and_grads(fast, fast_batch)
    torch.testing.assert_close(fast_loss, loss, rtol=0, atol=1e-5)
    assert len(fast_grads) == len(grads)
    for g_fast, g in zip(fast_grads, grads, strict=True):
        torch.testing.assert_close(g_fast, g, rtol=1e-4, atol=1e-5)
    # evaluation too
    method.eval()
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast.evaluate_logits(batch["conventional"][0]),
                                   method.evaluate_logits(batch["conventional"][0]), rtol=1e-4, atol=1e-5)


def test_compile_targets_skip_classifiers_and_cover_the_convolutions():
    method = StandardClassifier(create_backbone("resnet20"), 3, [5, 3, 1], optim={})
    assert sorted(compile_targets(method)) == ["backbone.last_block", "backbone.trunk"]


def test_metric_nan_checks_are_turned_off():
    method = StandardClassifier(create_backbone("resnet20"), 3, [5, 3, 1], optim={})
    method.extra_mean = MeanMetric()
    assert disable_metric_nan_checks(method) == 1
    assert method.extra_mean.nan_strategy == "disable"
    method.extra_mean.update(torch.tensor([1.0, float("nan")]))
    assert torch.isnan(method.extra_mean.compute())  # a NaN shows in the mean instead of a host-synced warning


def test_bad_settings_are_one_line_errors():
    with pytest.raises(LtlibError, match="unknown speed.compile_mode 'fast'; available: "):
        SpeedSettings(compile_mode="fast")
    with pytest.raises(LtlibError, match="unknown speed setting 'chanels_last'; available: .*channels_last"):
        SpeedSettings.from_mapping({"chanels_last": True})
    with pytest.raises(LtlibError, match=r"speed.progress_refresh=0 is invalid"):
        SpeedSettings(progress_refresh=0)


def test_fast_trainer_adds_its_callbacks():
    trainer = fast_trainer(speed={"channels_last": True, "progress_refresh": 25}, accelerator="cpu", logger=False,
                           enable_checkpointing=False)
    fast = [c for c in trainer.callbacks if isinstance(c, FastTraining)]
    bars = [c for c in trainer.callbacks if isinstance(c, TQDMProgressBar)]
    assert len(fast) == 1 and fast[0].settings.channels_last
    assert len(bars) == 1 and bars[0].refresh_rate == 25
    quiet = fast_trainer(speed={"progress_refresh": 25}, accelerator="cpu", logger=False, enable_progress_bar=False)
    assert not any(isinstance(c, TQDMProgressBar) for c in quiet.callbacks)


def test_fast_trainer_config_and_timing_run_end_to_end(tmp_path: Path, tiny_run_args):
    """trainer=gpu_fast (its GPU-only parts switched off) + data.loader=device + callbacks=timing on the CPU."""
    proc = run_cli("method=bbn", *tiny_run_args, "trainer=gpu_fast", "trainer.accelerator=cpu",
                   "trainer.precision=32-true", "trainer.benchmark=false", "trainer.speed.compile=false",
                   "trainer.speed.matmul_precision=null", "data.loader=device", "callbacks=timing",
                   "callbacks.timing.test_every_epoch=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    timings = results["timings"]
    assert timings == json.loads((tmp_path / "run" / "timings.json").read_text())
    assert timings["epochs"] == 2 and len(timings["test_each_epoch"]) == 2
    assert timings["steps"] == 2 * 7  # 403 digits training images, batch 64
    assert 0 < timings["data_s"] < timings["train_s"] <= timings["fit_s"]
    assert timings["eval_s"] > 0 and timings["final_eval_s"] > 0 and timings["data_alone_s_per_epoch"] > 0
    assert 0.0 <= timings["test_top1_last_epoch"] <= 1.0
    assert results["config"]["trainer"]["speed"]["channels_last"] is True


def test_bbn_concatenated_trunk_pass_differs_only_through_batch_norm():
    method, batch = bbn_and_batch()
    # another distribution in the re-balancing sub-batch, so that its batch statistics differ
    batch["rebalancing"][0] = 2.0 * batch["rebalancing"][0] + 1.0
    concatenated = copy.deepcopy(method)
    concatenated.trunk_pass = "concatenated"
    frozen = [copy.deepcopy(m).eval() for m in (method, concatenated)]  # before training updates the statistics
    train_losses = [m.compute_loss(batch) for m in (method, concatenated)]
    assert abs(float(train_losses[0].detach() - train_losses[1].detach())) > 1e-4  # batch statistics over both sub-batches
    with torch.no_grad():  # running statistics: every image is normalised alike, so one pass equals two
        eval_losses = [m.compute_loss(batch) for m in frozen]
    torch.testing.assert_close(eval_losses[1], eval_losses[0], rtol=0, atol=1e-5)
    with pytest.raises(LtlibError, match="unknown BBN trunk_pass 'fused'; available: concatenated, separate"):
        BBN(create_backbone("resnet20"), 3, [20, 8, 3], optim={}, trunk_pass="fused")
