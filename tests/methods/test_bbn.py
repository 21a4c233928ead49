"""BBN against its equations: shapes and gradients, the two combiners, the adaptors, the samplers the
branches receive, inference, the weight-norm analysis, the CLI (single process and 2-process DDP), the
table-6 ensemble, and bad options."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.conftest import digits_datamodule, run_cli
from torch import nn

from ltlib.backbones import Backbone, create_backbone
from ltlib.errors import LtlibError
from ltlib.methods.bbn import BBN, BilateralClassifier
from ltlib.methods.ensemble import Ensemble

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COUNTS = [100, 60, 36, 22, 13, 10, 10, 10, 10, 10]
def make_bbn(combiner: str = "official", seed: int = 0, **kwargs) -> BBN:
    torch.manual_seed(seed)
    return BBN(create_backbone("resnet20", in_chans=3), 10, COUNTS, combiner=combiner, **kwargs)


def paired_batch(batch_size: int = 6, seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(batch_size, 3, 8, 8, generator=gen), torch.randint(0, 10, (batch_size,), generator=gen))
            for name in ("conventional", "rebalancing")}


def attach_fake_trainer(method: BBN, epoch: int, max_epochs: int, global_step: int = 0, total_steps: int = 1) -> None:
    """Stand-in for the trainer state that ``training_progress`` reads (epoch counted from 0)."""
    method._trainer = SimpleNamespace(current_epoch=epoch, max_epochs=max_epochs, global_step=global_step,
                                      estimated_stepping_batches=total_steps)


def grad_norm(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def map_official_to_paper(official: BBN, paper: BBN, bias_split: torch.Tensor) -> None:
    """Copy the representation and set W_c = 2 W[:, :D], W_r = 2 W[:, D:], b_c + b_r = b."""
    shared = {k: v for k, v in official.state_dict().items() if not k.startswith("classifier.")}
    paper.load_state_dict({**paper.state_dict(), **shared})
    d = official.backbone.out_dim
    weight, bias = official.classifier.fc.weight.detach(), official.classifier.fc.bias.detach()
    with torch.no_grad():
        paper.classifier.conventional.weight.copy_(2 * weight[:, :d])
        paper.classifier.rebalancing.weight.copy_(2 * weight[:, d:])
        paper.classifier.conventional.bias.copy_(bias - bias_split)
        paper.classifier.rebalancing.bias.copy_(bias_split)


# --------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("combiner", ["official", "paper"])
def test_shapes_and_which_branch_gets_gradients(combiner):
    method = make_bbn(combiner, alpha=0.3)
    batch = paired_batch()
    assert method.train_streams == {"conventional": "uniform", "rebalancing": "reversed"}
    assert method(batch["conventional"][0]).shape == (6, 10)
    loss = method.compute_loss(batch)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    for part in (method.backbone.trunk, method.backbone.last_block, method.rebalancing_block, method.classifier):
        assert grad_norm(part) > 0
    # alpha = 1 (the first epoch of parabolic decay): the re-balancing features are multiplied by 0, so
    # its block learns nothing; alpha = 0: the conventional block learns nothing.
    for alpha, idle, busy in ((1.0, "rebalancing_block", "last_block"), (0.0, "last_block", "rebalancing_block")):
        method = make_bbn(combiner, alpha=alpha)
        method.compute_loss(batch).backward()
        blocks = {"rebalancing_block": method.rebalancing_block, "last_block": method.backbone.last_block}
        assert grad_norm(blocks[idle]) == 0 and grad_norm(blocks[busy]) > 0


def test_loss_is_eq3_on_eq1_logits():
    method = make_bbn("paper", alpha=0.3)
    batch = paired_batch()
    (x_c, y_c), (x_r, y_r) = batch["conventional"], batch["rebalancing"]
    method.eval()  # deterministic batch norm, so the independent computation below sees the same features
    f_c = F.adaptive_avg_pool2d(method.backbone.last_block(method.backbone.trunk(x_c)), 1).flatten(1)
    f_r = F.adaptive_avg_pool2d(method.rebalancing_block(method.backbone.trunk(x_r)), 1).flatten(1)
    cls = method.classifier
    z = 0.3 * f_c @ cls.conventional.weight.T + cls.conventional.bias + 0.7 * f_r @ cls.rebalancing.weight.T \
        + cls.rebalancing.bias
    expected = 0.3 * F.cross_entropy(z, y_c) + 0.7 * F.cross_entropy(z, y_r)
    assert torch.allclose(method.compute_loss(batch), expected, atol=1e-6)


def test_each_subbatch_has_its_own_batchnorm_pass():
    method = make_bbn()
    method.train()
    trunk_bn = method.backbone.trunk.bn1
    conv_bn, rebal_bn = method.backbone.last_block.bn1, method.rebalancing_block.bn1
    before = [int(bn.num_batches_tracked) for bn in (trunk_bn, conv_bn, rebal_bn)]
    method.compute_loss(paired_batch())
    after = [int(bn.num_batches_tracked) for bn in (trunk_bn, conv_bn, rebal_bn)]
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 1]


def test_rebalancing_block_is_a_fresh_copy_of_the_last_block():
    method = make_bbn()
    conv = dict(method.backbone.last_block.named_parameters())
    rebal = dict(method.rebalancing_block.named_parameters())
    assert conv.keys() == rebal.keys()
    assert all(conv[k].shape == rebal[k].shape and conv[k].data_ptr() != rebal[k].data_ptr() for k in conv)
    assert not torch.equal(conv["conv1.weight"], rebal["conv1.weight"])


# ----------------------------------------------------------------------------------------- combiners
def test_paper_and_official_combiners_give_the_same_logits_for_mapped_weights():
    torch.manual_seed(0)
    d, c = 16, 7
    official = BilateralClassifier(d, c, "official")
    paper = BilateralClassifier(d, c, "paper")
    split = torch.randn(c)
    with torch.no_grad():
        official.fc.bias.normal_()
        paper.conventional.weight.copy_(2 * official.fc.weight[:, :d])
        paper.rebalancing.weight.copy_(2 * official.fc.weight[:, d:])
        paper.conventional.bias.copy_(official.fc.bias - split)
        paper.rebalancing.bias.copy_(split)
    f_c, f_r = torch.randn(5, d), torch.randn(5, d)
    for alpha in (0.0, 0.25, 0.5, 0.81, 1.0):
        assert torch.allclose(official(f_c, f_r, alpha), paper(f_c, f_r, alpha), atol=1e-5)
        # and both are eq. 1 with the official layer's weights: z = 2a W1 f_c + 2(1-a) W2 f_r + b
        w = official.fc.weight
        manual = 2 * alpha * f_c @ w[:, :d].T + 2 * (1 - alpha) * f_r @ w[:, d:].T + official.fc.bias
        assert torch.allclose(official(f_c, f_r, alpha), manual, atol=1e-5)
    w_c, w_r = official.inference_weights()
    p_c, p_r = paper.inference_weights()
    assert torch.allclose(w_c, p_c) and torch.allclose(w_r, p_r)


def test_whole_models_agree_across_combiners():
    official, paper = make_bbn("official", alpha=0.6), make_bbn("paper", seed=5, alpha=0.6)
    map_official_to_paper(official, paper, torch.randn(10))
    official.eval(), paper.eval()
    images = torch.randn(4, 3, 8, 8)
    assert torch.allclose(official.evaluate_logits(images), paper.evaluate_logits(images), atol=1e-5)
    batch = paired_batch()
    assert torch.allclose(official.compute_loss(batch), paper.compute_loss(batch), atol=1e-5)


# ------------------------------------------------------------------------------------------ adaptors
ADAPTOR_FORMULAS = {
    "parabolic_decay": lambda p: 1 - p ** 2,
    "linear_decay": lambda p: 1 - p,
    "cosine_decay": lambda p: math.cos(p * math.pi / 2),
    "equal_weight": lambda p: 0.5,
    "parabolic_increment": lambda p: p ** 2,
}


@pytest.mark.parametrize("adaptor", sorted(ADAPTOR_FORMULAS))
def test_alpha_at_chosen_epochs_matches_table4(adaptor):
    method = make_bbn(adaptor=adaptor)
    assert method.alpha_per_step is False
    for epoch in (1, 2, 61, 121, 200):  # counted from 1, as in the official code
        attach_fake_trainer(method, epoch - 1, 200, global_step=(epoch - 1) * 97 + 50, total_steps=200 * 97)
        expected = ADAPTOR_FORMULAS[adaptor]((epoch - 1) / 200)
        assert method.current_alpha() == pytest.approx(expected, abs=1e-12)
    if adaptor == "parabolic_decay":  # the official "1 - ((epoch - 1) / T_max) ** 2"
        attach_fake_trainer(method, 159, 200)
        assert method.current_alpha() == pytest.approx(1 - (159 / 200) ** 2)


def test_alpha_per_step_and_adaptor_epochs():
    method = make_bbn(alpha_per_step=True)
    attach_fake_trainer(method, 3, 10, global_step=345, total_steps=1000)
    assert method.current_alpha() == pytest.approx(1 - 0.345 ** 2)
    # the official iNaturalist horizon: 90 epochs, T_max = 100
    method = make_bbn(adaptor_epochs=100)
    attach_fake_trainer(method, 89, 90)
    assert method.current_alpha() == pytest.approx(1 - (89 / 100) ** 2)
    method = make_bbn(alpha=0.2)
    attach_fake_trainer(method, 50, 90)
    assert method.current_alpha() == 0.2


def test_beta_adaptor_draws_beta_02_02_every_step():
    method = make_bbn(adaptor="beta")
    assert method.alpha_per_step is True  # as the official code, a fresh draw per iteration
    total = 4000
    draws = []
    for step in range(total):
        attach_fake_trainer(method, step // 100, 40, global_step=step, total_steps=total)
        draws.append(method.current_alpha())
    attach_fake_trainer(method, 0, 40, global_step=17, total_steps=total)
    assert method.current_alpha() == draws[17]  # reproducible: every DDP rank draws the same alpha
    draws = np.asarray(draws)
    interior = draws[(draws > 1e-9) & (draws < 1 - 1e-9)]  # Beta(0.2, 0.2) often rounds to exactly 0 or 1
    assert ((draws >= 0) & (draws <= 1)).all() and len(np.unique(interior)) == interior.size > total // 2
    a = b = 0.2
    assert draws.mean() == pytest.approx(0.5, abs=0.03)
    assert draws.var() == pytest.approx(a * b / ((a + b) ** 2 * (a + b + 1)), rel=0.1)


def test_beta_adaptor_keeps_drawing_past_its_horizon_and_depends_on_the_seed():
    # adaptor_epochs < max_epochs clips the progress at 1 from epoch 10 on: the draws must not repeat there.
    late = []
    for seed in (0, 1):
        method = make_bbn(adaptor="beta", adaptor_epochs=10, alpha_per_step=False, adaptor_seed=seed)
        per_epoch = []
        for epoch in range(10, 40):
            attach_fake_trainer(method, epoch, 40, global_step=epoch * 100, total_steps=4000)
            per_epoch.append(method.current_alpha())
        assert len(set(per_epoch)) == len(per_epoch)
        late.append(per_epoch)
    assert late[0] != late[1]
    # and the draws of two seeds are uncorrelated (|r| small over 2,000 steps)
    per_seed = []
    for seed in (0, 1):
        method = make_bbn(adaptor="beta", adaptor_seed=seed)
        draws = []
        for step in range(2000):
            attach_fake_trainer(method, step // 100, 20, global_step=step, total_steps=2000)
            draws.append(method.current_alpha())
        per_seed.append(draws)
    assert abs(np.corrcoef(per_seed[0], per_seed[1])[0, 1]) < 0.1


# ----------------------------------------------------------------------------------- sampler streams
def tiny_backbone() -> Backbone:
    trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    last = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    return Backbone(trunk, last, 4, arch="tiny")


class RecordingBBN(BBN):
    """BBN that records the labels each branch receives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: dict[str, list[int]] = {"conventional": [], "rebalancing": []}

    def compute_loss(self, batch):
        for stream in self.seen:
            self.seen[stream].extend(batch[stream][1].tolist())
        return super().compute_loss(batch)


@pytest.mark.parametrize("sampler", ["reversed", "class_balanced"])
def test_branches_receive_uniform_and_rebalancing_class_frequencies(sampler):
    datamodule = digits_datamodule(seed=3)
    counts = np.asarray(datamodule.class_counts)
    method = RecordingBBN(tiny_backbone(), 10, counts.tolist(), rebalancing_sampler=sampler,
                          optim={"warmup_epochs": 0})
    epochs = 8
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(method, datamodule=datamodule)
    conventional = np.bincount(method.seen["conventional"], minlength=10)
    assert conventional.tolist() == (counts * epochs).tolist()  # every image once per epoch
    rebalancing = np.bincount(method.seen["rebalancing"], minlength=10)
    weights = counts.max() / counts if sampler == "reversed" else np.ones(10)  # BBN eq. 4
    expected = weights / weights.sum() * rebalancing.sum()
    chi2 = float(((rebalancing - expected) ** 2 / expected).sum())
    assert chi2 < 27.88, (rebalancing.tolist(), expected.round(1).tolist())  # chi-square 9 dof, p = 0.001
    if sampler == "reversed":
        assert rebalancing[-1] > 5 * rebalancing[0]  # the rarest class drawn far more than the largest


# ----------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("combiner", ["official", "paper"])
def test_inference_uses_both_branches_with_alpha_half(combiner):
    method = make_bbn(combiner).eval()
    images = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        shared = method.backbone.trunk(images)
        f_c = method.backbone.last_block(shared).mean(dim=(2, 3))
        f_r = method.rebalancing_block(shared).mean(dim=(2, 3))
        d = method.backbone.out_dim
        if combiner == "official":  # the official test path: one fc over [f_c, f_r]
            w, b = method.classifier.fc.weight, method.classifier.fc.bias
            expected = f_c @ w[:, :d].T + f_r @ w[:, d:].T + b
        else:  # section 4.4: W_c (0.5 f_c) and W_r (0.5 f_r), logits added
            cls = method.classifier
            expected = cls.conventional(0.5 * f_c) + cls.rebalancing(0.5 * f_r)
        logits = method.evaluate_logits(images)
        assert torch.allclose(logits, expected, atol=1e-5)
        assert torch.allclose(logits, method(images))
        assert torch.equal(method.penultimate_features(images), torch.cat([f_c, f_r], dim=1))
        method.rebalancing_block.conv2.weight.mul_(3.0)
        assert not torch.allclose(method.evaluate_logits(images), logits, atol=1e-3)  # the r-branch counts


def test_weight_norm_plot_of_both_classifiers_and_their_combination(tmp_path):
    method = make_bbn()
    out = method.on_run_end(tmp_path)
    assert (tmp_path / "weight_norms.png").stat().st_size > 0
    norms = out["weight_norms"]
    w, d = method.classifier.fc.weight.detach(), method.backbone.out_dim
    expected = {"BBN-CB (W_c)": w[:, :d].norm(dim=1), "BBN-RB (W_r)": w[:, d:].norm(dim=1),
                "BBN-ALL ([W_c, W_r])": w.norm(dim=1)}
    assert set(norms) == set(expected)
    for name, values in expected.items():
        assert norms[name]["norms"] == pytest.approx(values.tolist(), rel=1e-5)
        assert norms[name]["std"] == pytest.approx(float(values.numpy().std()), rel=1e-4)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,expected", [
    ({"adaptor": "quadratic"}, "quadratic"),
    ({"alpha": 1.5}, "1.5"),
    ({"alpha": -0.1}, "-0.1"),
    ({"combiner": "sum"}, "sum"),
    ({"rebalancing_sampler": "inverse"}, "inverse"),
    ({"adaptor_epochs": 0}, "0"),
])
def test_bad_options_are_one_line_errors(kwargs, expected):
    with pytest.raises(LtlibError) as info:
        make_bbn(**kwargs)
    message = str(info.value)
    assert expected in message and "\n" not in message


# ---------------------------------------------------------------------------------------------- CLI
def read_metrics_column(run_dir: Path, column: str) -> list[float]:
    with open(run_dir / "logs" / "metrics.csv") as handle:
        return [float(row[column]) for row in csv.DictReader(handle) if row.get(column)]


def steps_of_epoch_ends(run_dir: Path) -> list[int]:
    """The last optimiser step of each epoch (0-based), read from the rows that log train/alpha."""
    with open(run_dir / "logs" / "metrics.csv") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/alpha")]


CLI_ARGS = ["trainer.max_epochs=2", "optim.warmup_epochs=1", "backbone=resnet20"]


@pytest.fixture(scope="module")
def bbn_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("bbn") / "run"
    proc = run_cli("method=bbn", f"hydra.run.dir={run_dir}", *CLI_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def bbn_ddp_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("bbn_ddp") / "run"
    proc = run_cli("method=bbn", "trainer=ddp_cpu", f"hydra.run.dir={run_dir}", *CLI_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_cli_trains_bbn_end_to_end(bbn_run):
    results = json.loads((bbn_run / "results.json").read_text())
    assert results["method"] == "bbn" and results["metrics"]["test"]["num_samples"] == 500
    assert results["config"]["method"]["combiner"] == "official"
    assert read_metrics_column(bbn_run, "train/alpha") == [1.0, 0.75]  # 1 - (0/2)^2, 1 - (1/2)^2
    assert steps_of_epoch_ends(bbn_run) == [6, 13]  # 403 training images, batches of 64: 7 steps per epoch
    assert (bbn_run / "weight_norms.png").is_file() and len(results["weight_norms"]) == 3
    state = torch.load(bbn_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("rebalancing_block.") for k in state) and "classifier.fc.weight" in state


@pytest.mark.slow
def test_cli_trains_bbn_with_two_ddp_processes(bbn_ddp_run):
    results = json.loads((bbn_ddp_run / "results.json").read_text())
    assert results["method"] == "bbn" and results["epochs_trained"] == 2
    assert results["metrics"]["test"]["num_samples"] == 500  # each test image counted once over the 2 ranks
    assert read_metrics_column(bbn_ddp_run, "train/alpha") == [1.0, 0.75]
    assert steps_of_epoch_ends(bbn_ddp_run) == [3, 7]  # each rank: 202 of the 403 images, 4 steps per epoch
    assert (bbn_ddp_run / "train_ddp_process_1.log").is_file()  # the second process's Hydra log


def load_bbn(run_dir: Path, checkpoint: str) -> BBN:
    method = BBN(create_backbone("resnet20", in_chans=1), 10, [1] * 10)
    state = torch.load(run_dir / checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    method.load_state_dict(state)
    return method.eval()


@pytest.mark.slow
def test_cli_ensemble_averages_member_logits(bbn_run, bbn_ddp_run, tmp_path):
    out = tmp_path / "ensemble"
    members = f"method.members=[{bbn_run},{bbn_ddp_run / 'checkpoints' / 'last.ckpt'}]"
    proc = run_cli("method=ensemble", members, f"hydra.run.dir={out}", "backbone=resnet20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["epochs_trained"] == 0 and len(results["ensemble"]["members"]) == 2
    # independent computation: the two checkpoints' evaluation logits averaged over the digits test set
    first = json.loads((bbn_run / "results.json").read_text())["checkpoint"]
    models = [load_bbn(bbn_run, first), load_bbn(bbn_ddp_run, "checkpoints/last.ckpt")]
    datamodule = digits_datamodule("test", batch_size=128)
    correct = total = 0
    with torch.no_grad():
        for images, targets in datamodule.test_dataloader():
            logits = torch.stack([m.evaluate_logits(images) for m in models]).mean(0)
            correct += int((logits.argmax(1) == targets).sum())
            total += len(targets)
    assert total == 500
    assert results["metrics"]["test"]["top1"] == pytest.approx(correct / total)


@pytest.mark.slow
def test_ensemble_probability_average_and_bad_members(bbn_run, bbn_ddp_run, tmp_path):
    members = [str(bbn_run), str(bbn_ddp_run)]
    ensemble = Ensemble(create_backbone("resnet20", in_chans=1), 10, [1] * 10, members=members,
                        average="probabilities")
    ensemble.train()
    assert not any(m.training for m in ensemble.members.modules())  # members never leave eval mode
    first = json.loads((bbn_run / "results.json").read_text())["checkpoint"]
    models = [load_bbn(bbn_run, first), load_bbn(bbn_ddp_run, json.loads(
        (bbn_ddp_run / "results.json").read_text())["checkpoint"])]
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = torch.stack([m.evaluate_logits(images).softmax(1) for m in models]).mean(0).log()
        assert torch.allclose(ensemble.evaluate_logits(images), expected, atol=1e-5)
    (tmp_path / "empty").mkdir()
    cases = [
        ({"members": [str(bbn_run)]}, "two or more"),
        ({"members": [str(bbn_run), str(tmp_path / "empty")]}, "no results.json"),
        ({"members": members, "average": "median"}, "median"),
    ]
    for kwargs, expected_text in cases:
        with pytest.raises(LtlibError) as info:
            Ensemble(create_backbone("resnet20", in_chans=1), 10, [1] * 10, **kwargs)
        assert expected_text in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(LtlibError, match="trained on 10 classes"):
        Ensemble(create_backbone("resnet20", in_chans=1), 7, [1] * 7, members=members)
