"""BaselineClassifier (focal, CB focal, LDAM, DRW, DRS, logit adjustment) against formulas written out
in numpy, its deferred switches in real Lightning training, its bad inputs, every baseline from the
CLI, and the BBN table 1 preset."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tests.conftest import REPO, digits_datamodule, run_cli, run_in_process
from tests.losses.reference import np_cui_sigmoid_focal, np_ldam_code_focal

from ltlib.backbones.cifar_resnet import CifarResNet
from ltlib.data import ClassBalancedSampler, LongTailDataModule, UniformSampler
from ltlib.errors import LtlibError
from ltlib.losses import LDAMCodeFocalLoss, NormedLinear, posthoc_logit_adjustment
from ltlib.methods.baselines import BaselineClassifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COUNTS = [100, 46, 22, 10, 5]
C = len(COUNTS)


def tiny_backbone(in_chans: int = 1) -> CifarResNet:
    return CifarResNet(8, in_chans=in_chans)


def make(**kwargs) -> BaselineClassifier:
    torch.manual_seed(0)
    return BaselineClassifier(tiny_backbone(), C, COUNTS, **kwargs)


# ----------------------------------------------------------------------------- independent formulas
def np_cb_weights(counts, beta):
    counts = np.asarray(counts, dtype=np.float64)
    w = (1.0 - beta) / (1.0 - beta ** counts)
    return w / w.sum() * counts.size


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def np_reduce(per_sample, y, weight, reduction):
    w = np.ones(len(y)) if weight is None else np.asarray(weight)[y]
    return (w * per_sample).sum() / (w.sum() if reduction == "weighted_mean" else len(y))


def np_ce(z, y, weight=None, reduction="weighted_mean"):
    return np_reduce(-np_log_softmax(z)[np.arange(len(y)), y], y, weight, reduction)


def np_ldam(z, y, counts, weight=None, max_margin=0.5, scale=30.0):
    margins = np.asarray(counts, dtype=np.float64) ** -0.25
    margins *= max_margin / margins.max()
    z = np.array(z, dtype=np.float64)
    z[np.arange(len(y)), y] -= margins[y]
    return np_ce(scale * z, y, weight)


def np_softmax_focal(z, y, gamma, weight=None, reduction="weighted_mean"):
    logp = np_log_softmax(z)[np.arange(len(y)), y]
    return np_reduce(-((1 - np.exp(logp)) ** gamma) * logp, y, weight, reduction)


def np_sigmoid_focal(z, y, gamma, weight):
    """Cui et al.'s code: per class -(1 - p_t)^gamma log p_t with sigmoids, summed, times w_y, / B."""
    z = np.asarray(z, dtype=np.float64)
    onehot = np.eye(z.shape[1])[y]
    p = 1 / (1 + np.exp(-z))
    pt = np.where(onehot == 1, p, 1 - p)
    per_sample = (-((1 - pt) ** gamma) * np.log(pt)).sum(axis=1)
    return (np.asarray(weight)[y] * per_sample).mean()


# ----------------------------------------------------------------------------- losses of compute_loss
def loss_of(method: BaselineClassifier, images: torch.Tensor, targets: torch.Tensor) -> tuple[float, np.ndarray]:
    """The method's training loss on a batch and the logits it used (eval mode: fixed batch norm)."""
    method.eval()
    with torch.no_grad():
        return float(method.compute_loss((images, targets))), method(images).double().numpy()


BATCH = (torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(3)),
         torch.tensor([0, 1, 2, 3, 4, 4, 3, 0, 2, 1, 4, 4]))


@pytest.mark.parametrize("kwargs,expected", [
    (dict(loss="ce"), lambda z, y: np_ce(z, y)),
    (dict(loss="ce", class_weighting="class_balanced"), lambda z, y: np_ce(z, y, np_cb_weights(COUNTS, 0.9999))),
    (dict(loss="ce", class_weighting="class_balanced", reduction="batch_mean"),
     lambda z, y: np_ce(z, y, np_cb_weights(COUNTS, 0.9999), "batch_mean")),
    (dict(loss="focal", gamma=2.0), lambda z, y: np_softmax_focal(z, y, 2.0)),
    (dict(loss="focal", gamma=1.0, class_weighting="class_balanced", beta=0.99),
     lambda z, y: np_softmax_focal(z, y, 1.0, np_cb_weights(COUNTS, 0.99))),
    (dict(loss="focal", gamma=1.0, focal_form="ldam_code", class_weighting="class_balanced", reduction="batch_mean"),
     lambda z, y: np_ldam_code_focal(z, y, 1.0, np_cb_weights(COUNTS, 0.9999))),
    (dict(loss="focal", gamma=0.5, focal_form="sigmoid", class_weighting="class_balanced", reduction="batch_mean"),
     lambda z, y: np_sigmoid_focal(z, y, 0.5, np_cb_weights(COUNTS, 0.9999))),
    (dict(loss="ldam"), lambda z, y: np_ldam(z, y, COUNTS)),
    (dict(loss="logit_adjusted", tau=1.5),
     lambda z, y: np_ce(z + 1.5 * np.log(np.asarray(COUNTS) / sum(COUNTS)), y)),
])
def test_training_loss_matches_its_formula(kwargs, expected) -> None:
    method = make(**kwargs)
    value, logits = loss_of(method, *BATCH)
    assert value == pytest.approx(expected(logits, BATCH[1].numpy()), rel=1e-5)


def test_ldam_code_focal_loss_differs_from_lin_only_with_weights() -> None:
    z, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
    w = torch.tensor([0.2, 1.0, 3.0])
    unweighted = LDAMCodeFocalLoss(2.0)(z, y)
    assert float(unweighted) == pytest.approx(np_softmax_focal(z.numpy(), y.numpy(), 2.0))
    weighted = LDAMCodeFocalLoss(2.0, weight=w, reduction="none")(z, y).mean()
    assert float(weighted) == pytest.approx(np_ldam_code_focal(z.numpy(), y.numpy(), 2.0, w.numpy()))
    assert float(weighted) != pytest.approx(np_softmax_focal(z.numpy(), y.numpy(), 2.0, w.numpy(), "batch_mean"))


def test_ldam_uses_the_cosine_classifier_and_ce_the_linear_one() -> None:
    assert isinstance(make(loss="ldam").classifier, NormedLinear)
    assert isinstance(make(loss="ce").classifier, torch.nn.Linear)
    assert isinstance(make(loss="ce", classifier="normed").classifier, NormedLinear)


def test_sigmoid_focal_head_starts_at_the_prior_and_its_bias_is_not_decayed() -> None:
    method = make(loss="focal", focal_form="sigmoid")
    assert torch.allclose(method.classifier.bias, torch.full((C,), -math.log(C - 1)))
    groups = method.parameter_groups()
    assert groups[1]["params"] == [method.classifier.bias] and groups[1]["weight_decay"] == 0.0
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in method.parameters())


def test_posthoc_logit_adjustment_at_evaluation_only() -> None:
    plain, adjusted = make(), make(posthoc_tau=1.0)
    adjusted.load_state_dict(plain.state_dict())
    images = BATCH[0]
    plain.eval()
    adjusted.eval()
    with torch.no_grad():
        raw = plain.evaluate_logits(images)
        torch.testing.assert_close(adjusted.evaluate_logits(images), posthoc_logit_adjustment(raw, COUNTS, 1.0))
        torch.testing.assert_close(adjusted(images), raw)  # training logits are not adjusted
    assert loss_of(adjusted, *BATCH)[0] == pytest.approx(loss_of(plain, *BATCH)[0])


# ----------------------------------------------------------------------------- DRW / DRS in training
class Probe(BaselineClassifier):
    """Keeps the logits of the last forward pass so a callback can recompute the loss."""

    def forward(self, images):
        self.last_logits = super().forward(images)
        return self.last_logits


class Recorder(Callback):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        weight = pl_module.criterion.weight
        self.rows.append({"epoch": trainer.current_epoch, "loss": float(outputs["loss"]),
                          "logits": pl_module.last_logits.detach().double().numpy(), "targets": batch[1].numpy(),
                          "weight": None if weight is None else weight.numpy().copy()})


def fit_two_epochs(method: BaselineClassifier, datamodule: LongTailDataModule, tmp_path: Path) -> tuple[Recorder, L.Trainer]:
    recorder = Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[recorder], deterministic=True,
                        default_root_dir=str(tmp_path))
    trainer.fit(method, datamodule=datamodule)
    return recorder, trainer


@pytest.mark.parametrize("loss", ["ce", "ldam"])
def test_drw_and_drs_switch_at_exactly_the_configured_epoch(loss, tmp_path) -> None:
    """Epoch 0 (= E - 1) trains unweighted on the uniform sampler, epoch 1 (= E) with the class-balanced
    weights on the class-balanced sampler; the loss of every step matches its formula; the checkpoint
    taken after the switch loads into a fresh model (the weights are not part of the state)."""
    datamodule = digits_datamodule()
    counts = datamodule.class_counts
    torch.manual_seed(0)
    method = Probe(tiny_backbone(), 10, counts, loss=loss, class_weighting="class_balanced", beta=0.9999,
                   reweight_from_epoch=1, deferred_sampler="class_balanced", resample_from_epoch=1,
                   optim={"warmup_epochs": 0, "milestones": []})
    recorder, trainer = fit_two_epochs(method, datamodule, tmp_path)

    cb = np_cb_weights(counts, 0.9999)
    formula = np_ce if loss == "ce" else partial(np_ldam, counts=counts)
    for row in recorder.rows:
        weight = None if row["epoch"] < 1 else cb
        assert (row["weight"] is None) == (weight is None)
        if weight is not None:
            np.testing.assert_allclose(row["weight"], weight, rtol=1e-6)
        assert row["loss"] == pytest.approx(formula(row["logits"], row["targets"], weight=weight), rel=1e-5)

    targets = datamodule.train_targets
    by_epoch = {e: np.concatenate([r["targets"] for r in recorder.rows if r["epoch"] == e]) for e in (0, 1)}
    uniform, balanced = UniformSampler(targets.size, seed=0), ClassBalancedSampler(targets, seed=0)
    uniform.set_epoch(0)
    balanced.set_epoch(1)
    np.testing.assert_array_equal(by_epoch[0], targets[list(uniform)])
    np.testing.assert_array_equal(by_epoch[1], targets[list(balanced)])
    assert np.bincount(by_epoch[0], minlength=10).tolist() == counts

    path = tmp_path / "after_switch.ckpt"
    trainer.save_checkpoint(path)
    fresh = BaselineClassifier.load_from_checkpoint(path, backbone=tiny_backbone(), class_counts=counts)
    assert fresh.criterion.weight is None  # a fresh model starts at epoch 0
    for key, value in method.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)


def test_weights_at_epochs_before_and_after_the_switch() -> None:
    method = make(loss="ldam", class_weighting="class_balanced", reweight_from_epoch=160)
    assert method.active_class_weights(159) is None
    np.testing.assert_allclose(method.active_class_weights(160).numpy(), np_cb_weights(COUNTS, 0.9999), rtol=1e-6)
    assert make(class_weighting="inverse_frequency").active_class_weights(0) is not None
    assert make().active_class_weights(10_000) is None


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs,expected", [
    (dict(gamma=-1.0), "gamma=-1.0 is out of range"),
    (dict(beta=1.0), "beta=1.0 is out of range; allowed: [0, 1)"),
    (dict(beta=-0.5), "beta=-0.5 is out of range"),
    (dict(counts=[5, 0, 3, 2, 1]), "class_counts must be positive"),
    (dict(sampler="balanced"), "unknown sampler 'balanced'"),
    (dict(deferred_sampler="balanced"), "unknown sampler 'balanced'"),
    (dict(loss="lda"), "unknown loss 'lda'"),
    (dict(focal_form="tanh"), "unknown focal_form 'tanh'"),
    (dict(reduction="median"), "unknown reduction 'median'"),
    (dict(class_weighting="cb"), "unknown class_weighting 'cb'"),
    (dict(reweight_from_epoch=-1), "reweight_from_epoch=-1 is invalid"),
    (dict(posthoc_tau=-1.0), "posthoc_tau=-1.0 is out of range"),
])
def test_bad_arguments_are_one_line_errors(kwargs, expected) -> None:
    counts = kwargs.pop("counts", COUNTS)
    with pytest.raises(LtlibError) as info:
        BaselineClassifier(tiny_backbone(), C, counts, **kwargs)
    assert expected in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- the CLI
BASELINES = ["ce_drw", "ldam_drw", "ldam", "ce_drs", "focal", "cb_focal", "la", "ce_posthoc_la",
             "mixup", "manifold_mixup", "manifold_mixup_two_samplers"]


@pytest.mark.slow
def test_every_baseline_trains_from_the_cli(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", f"method={','.join(BASELINES)}", f"hydra.sweep.dir={sweep}", "trainer.max_epochs=1",
                   "optim.warmup_epochs=0", "backbone=resnet20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for number, method in enumerate(BASELINES):
        results = json.loads((sweep / f"{number}_{method}_digits_lt" / "results.json").read_text())
        assert results["method"] == method and results["epochs_trained"] == 1
        assert 0.0 <= results["metrics"]["test"]["top1"] <= 1.0 and results["metrics"]["test"]["num_samples"] == 500
    ldam = json.loads((sweep / "1_ldam_drw_digits_lt" / "results.json").read_text())["config"]["method"]
    assert ldam["loss"] == "ldam" and ldam["reweight_from_epoch"] == 160 and ldam["class_weighting"] == "class_balanced"


@pytest.mark.slow
@pytest.mark.parametrize("overrides,expected", [
    (["method=focal", "method.gamma=-1"], "gamma=-1.0 is out of range"),
    (["method=ce_drs", "method.deferred_sampler=balanced"], "unknown sampler 'balanced'"),
])
def test_bad_cli_input_is_one_line_error(overrides, expected, tmp_path) -> None:
    proc = run_in_process(*overrides, f"hydra.run.dir={tmp_path / 'run'}", "backbone=resnet20")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ltlib: error:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]


# ----------------------------------------------------------------------------- the BBN table 1 preset
def compose_preset(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=bbn_table1_baselines", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize("method,milestones,per_step", [
    ("mixup", [120, 160], True), ("manifold_mixup_two_samplers", [120, 160], True),
    ("ce_drw", [160, 180], False), ("ce_drs", [160, 180], False), ("ldam_drw", [160, 180], False),
    # BBN prints Cui et al.'s table 2 numbers for these rows: Cui et al.'s recipe.
    ("ce", [160, 180], True), ("focal", [160, 180], True), ("cb_focal", [160, 180], True),
])
def test_table1_preset_gives_each_row_its_papers_recipe(method, milestones, per_step) -> None:
    from omegaconf import OmegaConf

    cfg = compose_preset(f"method={method}")
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    assert optim["milestones"] == milestones and optim["warmup_per_step"] is per_step
    assert (optim["lr"], optim["weight_decay"], optim["warmup_epochs"], optim["decay_factor"]) == (0.1, 2e-4, 5, 0.01)
    assert cfg.trainer.max_epochs == 200 and cfg.data.batch_size == 128 and cfg.backbone.name == "resnet32"
    if method in ("ce_drw", "ldam_drw"):
        assert cfg.method.reweight_from_epoch == milestones[0]  # DRW starts with the first decay
    if method == "ce_drs":
        assert cfg.method.resample_from_epoch == milestones[0]


def test_table1_preset_sweeps_every_row_dataset_and_ratio() -> None:
    cfg = compose_preset()
    params = cfg.hydra.sweeper.params
    methods = params.method.split(",")
    assert len(methods) == 9 and all((REPO / "conf" / "method" / f"{m}.yaml").is_file() for m in methods)
    assert "cb_focal" in methods  # the name ltlib.published gives BBN's "CB-Focal [5]" row
    assert params.data.split(",") == ["cifar10_lt", "cifar100_lt"]
    assert [float(r) for r in str(params["data.imbalance_ratio"]).split(",")] == [100, 50, 10]
    assert cfg.data.name == "cifar10_lt" and cfg.data.imbalance_ratio == 100


# ----------------------------------------------------------------------------- CB focal: form per table
def compose_method(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def np_cui_focal_of(z, y, gamma, weight):
    return np_cui_sigmoid_focal(z, y, gamma, np.ones(z.shape[1]) if weight is None else weight)


BATCH_128 = (torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(5)),
             torch.multinomial(torch.tensor(COUNTS, dtype=torch.float64), 128, replacement=True,
                               generator=torch.Generator().manual_seed(6)))


def composed_method(*overrides: str) -> BaselineClassifier:
    from hydra.utils import instantiate

    cfg = compose_method(*overrides)
    torch.manual_seed(0)
    return instantiate(cfg.method)(backbone=tiny_backbone(), num_classes=C, class_counts=COUNTS)


@pytest.mark.parametrize("overrides,reference", [
    # The default: Cui et al.'s code (sigmoid, CB weights from epoch 0, sum over classes / B).
    ((), lambda z, y: np_cui_focal_of(z, y, 1.0, np_cb_weights(COUNTS, 0.9999))),
    # LDAM-DRW's code: --loss_type Focal --train_rule Reweight.
    (("method.focal_form=ldam_code", "method.reduction=batch_mean"),
     lambda z, y: np_ldam_code_focal(z, y, 1.0, np_cb_weights(COUNTS, 0.9999))),
])
def test_cb_focal_trains_the_official_codes_loss_on_a_batch_of_128(overrides, reference) -> None:
    method = composed_method("method=cb_focal", *overrides)
    value, logits = loss_of(method, *BATCH_128)
    assert value == pytest.approx(reference(logits, BATCH_128[1].numpy()), rel=1e-5)


def test_cb_focal_weighted_mean_differs_from_ldam_drws_batch_mean_by_the_weight_sum() -> None:
    y = BATCH_128[1].numpy()
    w = np_cb_weights(COUNTS, 0.9999)
    value, logits = loss_of(composed_method("method=cb_focal", "method.focal_form=ldam_code",
                                            "method.reduction=weighted_mean"), *BATCH_128)
    factor = w[y].sum() / len(y)
    assert factor < 0.6
    assert value == pytest.approx(np_ldam_code_focal(logits, y, 1.0, w) / factor, rel=1e-5)
    former, logits = loss_of(composed_method("method=cb_focal", "method.focal_form=softmax",
                                             "method.reduction=weighted_mean"), *BATCH_128)
    assert former != pytest.approx(np_ldam_code_focal(logits, y, 1.0, w), rel=0.05)


def test_focal_default_is_cuis_unweighted_sigmoid_focal_and_softmax_is_ldam_drws() -> None:
    y = BATCH_128[1].numpy()
    value, logits = loss_of(composed_method("method=focal"), *BATCH_128)
    assert value == pytest.approx(np_cui_focal_of(logits, y, 1.0, None), rel=1e-5)
    value, logits = loss_of(composed_method("method=focal", "method.focal_form=softmax"), *BATCH_128)
    assert value == pytest.approx(np_softmax_focal(logits, y, 1.0), rel=1e-5)


@pytest.mark.parametrize("method", ["focal", "cb_focal"])
def test_sigmoid_methods_start_at_the_prior_without_bias_decay(method) -> None:
    model = composed_method(f"method={method}")
    assert torch.allclose(model.classifier.bias, torch.full((C,), -math.log(C - 1)))
    assert model.parameter_groups()[1] == {"params": [model.classifier.bias], "weight_decay": 0.0}


CUI_FORM = {"focal_form": "sigmoid", "reduction": "batch_mean", "loss": "focal", "gamma": 1.0}


@pytest.mark.parametrize("preset,method,expected", [
    # BBN table 1 "CB-Focal [5]" and "Focal [17]": Cui et al.'s table 2, sigmoid form.
    ("bbn_table1_baselines", "cb_focal", {**CUI_FORM, "class_weighting": "class_balanced", "beta": 0.9999,
                                          "reweight_from_epoch": 0}),
    ("bbn_table1_baselines", "focal", {**CUI_FORM, "class_weighting": "none"}),
    # Two-head table 1 "CB+Focal": also Cui et al.'s table 2 (the preset leaves it to the BBN preset's recipe).
    ("two_head_table1_cifar10", "cb_focal", {**CUI_FORM, "class_weighting": "class_balanced"}),
    ("two_head_table1_cifar100", "cb_focal", {**CUI_FORM, "class_weighting": "class_balanced"}),
])
def test_each_preset_runs_the_cb_focal_form_that_produced_its_numbers(preset, method, expected) -> None:
    from omegaconf import OmegaConf

    cfg = compose_preset(f"method={method}") if preset == "bbn_table1_baselines" else \
        compose_method(f"experiment={preset}", f"method={method}")
    got = OmegaConf.to_container(cfg.method, resolve=True)
    assert {k: got[k] for k in expected} == expected


def test_the_two_head_presets_leave_cb_focal_to_cuis_recipe() -> None:
    for preset in ("two_head_table1_cifar10", "two_head_table1_cifar100"):
        assert "cb_focal" not in compose_method(f"experiment={preset}").hydra.sweeper.params.method.split(",")
