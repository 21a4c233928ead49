"""Classifier re-training: the stage-1 representation loads and stays bit-identical while a fresh
classifier trains; BBN branches; re-weighting; the CLI; bad checkpoints and options."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from tests.conftest import digits_datamodule, run_cli, run_in_process

from ltlib.backbones import create_backbone
from ltlib.errors import LtlibError
from ltlib.methods import StandardClassifier
from ltlib.methods.bbn import BBN
from ltlib.methods.crt import ClassifierRetraining, representation_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COUNTS = [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]


def save_stage1(method, path: Path) -> Path:
    """A stage-1 checkpoint whose batch-norm statistics have moved away from their initial values."""
    method.train()
    with torch.no_grad():
        for _ in range(3):
            images = torch.rand(16, 1, 8, 8) * 2 - 1
            if isinstance(method, BBN):
                method.compute_loss({"conventional": (images, torch.zeros(16, dtype=torch.long)),
                                     "rebalancing": (images.flip(0), torch.zeros(16, dtype=torch.long))})
            else:
                method(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": method.state_dict(), "epoch": 1}, path)
    return path


@pytest.fixture(scope="module")
def bbn_stage1(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    method = BBN(create_backbone("resnet20", in_chans=1), 10, COUNTS, alpha=0.5)
    path = save_stage1(method, tmp_path_factory.mktemp("stage1") / "run" / "checkpoints" / "best.ckpt")
    results = {"config": {"backbone": {"_target_": "ltlib.backbones.create_backbone", "name": "resnet20"}}}
    (path.parent.parent / "results.json").write_text(json.dumps(results))
    return path, {k: v.clone() for k, v in method.state_dict().items()}


@pytest.fixture(scope="module")
def ce_stage1(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    method = StandardClassifier(create_backbone("resnet20", in_chans=1), 10, COUNTS)
    return save_stage1(method, tmp_path_factory.mktemp("ce") / "best.ckpt")


def make_crt(path, **kwargs) -> ClassifierRetraining:
    return ClassifierRetraining(create_backbone("resnet20", in_chans=1), 10, COUNTS, stage1_checkpoint=str(path),
                                **kwargs)



@pytest.mark.parametrize("branch,block_prefix", [("conventional", "backbone.last_block."),
                                                 ("rebalancing", "rebalancing_block.")])
def test_training_changes_only_the_classifier(bbn_stage1, branch, block_prefix):
    path, stage1 = bbn_stage1
    datamodule = digits_datamodule()
    method = ClassifierRetraining(create_backbone("resnet20", in_chans=1), 10, datamodule.class_counts,
                                  stage1_checkpoint=str(path), branch=branch, optim={"warmup_epochs": 0, "lr": 0.5})
    initial_classifier = {k: v.clone() for k, v in method.classifier.state_dict().items()}
    # the representation is the chosen branch of the BBN checkpoint, bit for bit
    expected = {**{k[len("backbone."):]: v for k, v in stage1.items() if k.startswith("backbone.trunk.")},
                **{"last_block." + k[len(block_prefix):]: v for k, v in stage1.items() if k.startswith(block_prefix)}}
    assert method.backbone.state_dict().keys() == expected.keys()
    assert all(torch.equal(method.backbone.state_dict()[k], v) for k, v in expected.items())
    assert not any(p.requires_grad for p in method.backbone.parameters())

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0)
    trainer.fit(method, datamodule=datamodule)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in method.classifier.parameters()}
    after = method.backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in expected.items())  # parameters and BN buffers
    assert not method.backbone.training  # still in eval mode after the validation loops
    assert any(not torch.equal(method.classifier.state_dict()[k], v) for k, v in initial_classifier.items())


def test_both_branches_concatenate_the_bbn_features(bbn_stage1):
    path, stage1 = bbn_stage1
    method = make_crt(path, branch="both").eval()
    bbn = BBN(create_backbone("resnet20", in_chans=1), 10, COUNTS)
    bbn.load_state_dict(stage1)
    bbn.eval()
    images = torch.randn(3, 1, 8, 8)
    f_c, f_r = bbn.branch_features(images)
    assert torch.equal(method.features(images), torch.cat([f_c, f_r], dim=1))
    assert method.classifier.in_features == 2 * 64
    assert method(images).shape == (3, 10)
    frozen = [method.backbone, method.rebalancing_block]
    assert all(not p.requires_grad for module in frozen for p in module.parameters())
    method.train()
    assert not any(m.training for module in frozen for m in module.modules())


def test_representation_state_swaps_in_the_rebalancing_block():
    state = {"backbone.trunk.w": torch.zeros(1), "backbone.last_block.w": torch.ones(1),
             "rebalancing_block.w": torch.full((1,), 2.0), "classifier.fc.weight": torch.zeros(1)}
    backbone, extra = representation_state(state, "rebalancing")
    assert backbone == {"trunk.w": state["backbone.trunk.w"], "last_block.w": state["rebalancing_block.w"]}
    assert extra is None
    backbone, extra = representation_state(state, "both")
    assert backbone["last_block.w"] is state["backbone.last_block.w"] and extra == {"w": state["rebalancing_block.w"]}


def test_reweighting_and_sampler_options(ce_stage1):
    method = make_crt(ce_stage1, sampler="uniform", class_weighting="inverse_frequency").eval()
    assert method.train_streams == {"main": "uniform"}
    images, targets = torch.randn(8, 1, 8, 8), torch.arange(8)
    weights = 1.0 / torch.tensor(COUNTS, dtype=torch.float)
    weights = weights / weights.sum() * len(COUNTS)
    expected = F.cross_entropy(method(images), targets, weight=weights)
    assert torch.allclose(method.compute_loss((images, targets)), expected, rtol=1e-5)
    assert make_crt(ce_stage1).train_streams == {"main": "class_balanced"}


def test_classifier_init_from_stage1(ce_stage1):
    stage1 = torch.load(ce_stage1, weights_only=True)["state_dict"]
    method = make_crt(ce_stage1, classifier_init="stage1")
    assert torch.equal(method.classifier.weight, stage1["classifier.weight"])
    assert not torch.equal(make_crt(ce_stage1).classifier.weight, stage1["classifier.weight"])


@pytest.mark.parametrize("kwargs,expected", [
    ({"stage1_checkpoint": None}, "stage1_checkpoint is required"),
    ({"stage1_checkpoint": "/nonexistent/best.ckpt"}, "/nonexistent/best.ckpt"),
    ({"branch": "left"}, "left"),
    ({"sampler": "sqrt"}, "sqrt"),
    ({"class_weighting": "inverse"}, "inverse"),
    ({"classifier_init": "random"}, "random"),
])
def test_bad_options_are_one_line_errors(ce_stage1, kwargs, expected):
    with pytest.raises(LtlibError) as info:
        ClassifierRetraining(create_backbone("resnet20", in_chans=1), 10, COUNTS,
                             **{"stage1_checkpoint": str(ce_stage1), **kwargs})
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_bad_checkpoints_are_one_line_errors(ce_stage1, bbn_stage1, tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    cases = [
        (lambda: make_crt(garbage), "could not be read as a checkpoint"),
        (lambda: make_crt(ce_stage1, branch="rebalancing"), "needs a BBN checkpoint"),
        # a stage-2 backbone unlike the stage-1 one; the hint reads the stage-1 run's results.json if any
        (lambda: ClassifierRetraining(create_backbone("resnet32", in_chans=1), 10, COUNTS,
                                      stage1_checkpoint=str(bbn_stage1[0])), "stage 1 used backbone=resnet20"),
        (lambda: ClassifierRetraining(create_backbone("resnet20", in_chans=3), 10, COUNTS,
                                      stage1_checkpoint=str(ce_stage1)), "has shape"),
        (lambda: make_crt(bbn_stage1[0], classifier_init="stage1"), "classifier_init=stage1"),
    ]
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, tmp_path / "foreign.ckpt")
    cases.append((lambda: make_crt(tmp_path / "foreign.ckpt"), "holds no ltlib model"))
    for build, expected in cases:
        with pytest.raises(LtlibError) as info:
            build()
        assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.slow
def test_cli_retrains_a_bbn_branch(bbn_stage1, tmp_path):
    path, stage1 = bbn_stage1
    run_dir = tmp_path / "run"
    proc = run_cli("method=crt", f"method.stage1_checkpoint={path}", "method.branch=rebalancing",
                   "method.sampler=reversed", f"hydra.run.dir={run_dir}", "trainer.max_epochs=2",
                   "optim.warmup_epochs=0", "backbone=resnet20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "crt" and results["metrics"]["test"]["num_samples"] == 500
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in stage1.items():
        if key.startswith("rebalancing_block."):
            assert torch.equal(state["backbone.last_block." + key[len("rebalancing_block."):]], value)
        elif key.startswith("backbone.trunk."):
            assert torch.equal(state[key], value)
    assert set(state) - {k for k in state if k.startswith("backbone.")} == {"classifier.weight", "classifier.bias"}


@pytest.mark.slow
def test_cli_missing_stage1_checkpoint_is_one_line_error(tmp_path):
    proc = run_in_process("method=crt", "method.stage1_checkpoint=/nowhere/best.ckpt", f"hydra.run.dir={tmp_path / 'run'}",
                   "backbone=resnet20")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ltlib: error:")]
    assert len(lines) == 1 and "/nowhere/best.ckpt" in lines[0], proc.stderr[-2000:]
