"""The contract every method config keeps, parametrised over ``conf/method/*.yaml``.

Each method, composed from its config on the embedded digits data with a small backbone: takes one
training step, round-trips its ``state_dict`` with ``strict=True``, gives ``[B, C]`` evaluation logits,
writes its end-of-run analysis (JSON-serialisable), and comes back from ``load_from_checkpoint`` with the
same logits. ``crt`` and ``ensemble`` read finished runs, which a module fixture trains first. A new
method config that breaks any of this fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from ltlib.config import compose, config_dir
from ltlib.methods import LongTailMethod
from ltlib.runs import build_method

#: every method config
METHODS = sorted(p.stem for p in (Path(config_dir()) / "method").glob("*.yaml"))
SMALL = ("backbone=resnet20", "data.batch_size=32", "optim.warmup_epochs=0")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def compose_cfg(*overrides: str):
    return compose([*SMALL, *overrides])


def build(cfg, datamodule) -> LongTailMethod:
    return build_method(cfg.method, cfg.optim, datamodule, cfg.backbone, many_threshold=cfg.many_threshold,
                        few_threshold=cfg.few_threshold)


def tiny_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=str(tmp_path), use_distributed_sampler=False, **kwargs)


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory) -> list[Path]:
    """Two finished one-epoch CE runs (run directories with results.json and checkpoints)."""
    from ltlib.training.train import train

    runs = []
    for seed in (0, 1):
        out = tmp_path_factory.mktemp(f"run{seed}")
        train(compose_cfg(f"seed={seed}", "trainer.max_epochs=1", "logger=none"), out)
        runs.append(out)
    return runs


def method_overrides(method: str, runs: list[Path]) -> list[str]:
    if method == "crt":
        return [f"method.stage1_checkpoint={runs[0] / 'checkpoints' / 'last.ckpt'}"]
    if method == "ensemble":
        return [f"method.members=[{runs[0]},{runs[1]}]"]
    return []


@pytest.mark.parametrize("method", METHODS)
def test_method_keeps_the_contract(method, finished_runs, tmp_path):
    overrides = [f"method={method}", "trainer.max_epochs=2", *method_overrides(method, finished_runs)]
    cfg = compose_cfg(*overrides)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = build(cfg, datamodule)
    assert isinstance(model, LongTailMethod)

    # one training step (the ensemble trains nothing and stops before its first step)
    trainer = tiny_trainer(tmp_path, max_epochs=2, max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == (0 if method == "ensemble" else 1)
    for p in model.parameters():
        assert torch.isfinite(p).all()

    model.eval()
    images, _ = next(iter(datamodule.val_dataloader()))
    with torch.no_grad():
        logits = model.evaluate_logits(images)
    assert logits.shape == (images.shape[0], datamodule.num_classes)
    assert torch.isfinite(logits).all()

    # state_dict round trip into a freshly built model, strict
    fresh = build(cfg, datamodule)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.evaluate_logits(images), logits)

    # end-of-run analysis: files under the directory, JSON-serialisable entries for results.json
    extra = model.on_run_end(tmp_path)
    assert isinstance(extra, dict)
    json.dumps(extra)

    # load_from_checkpoint with only what a checkpoint cannot hold: the backbone module and the data's counts
    path = tmp_path / "contract.ckpt"
    trainer.save_checkpoint(path)
    loaded = type(model).load_from_checkpoint(
        path, backbone=instantiate(cfg.backbone, in_chans=datamodule.in_chans),
        class_counts=datamodule.class_counts, map_location="cpu")
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.evaluate_logits(images), logits)
    assert dict(loaded.hparams) == dict(model.hparams)
