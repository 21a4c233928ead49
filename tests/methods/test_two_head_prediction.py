"""The two-head model's K -> C prediction rule (docs/methods/two_head.md, section 5): the decomposition of the
K-way soft-label loss into class-level cross-entropy plus a within-class term, the effect of ``max_logit``
against ``sum_prob`` on a synthetic long-tailed problem, and both rules recorded on every evaluation
(``val_<rule>/*``, ``test_<rule>/*``, ``results.json`` ``metrics_by_prediction``)."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from tests.conftest import run_cli

from ltlib.analysis import print_results_table
from ltlib.backbones import create_backbone
from ltlib.methods.class_division import (
    ClassDivision,
    assign_clusters,
    cluster_to_class_logits,
    soft_cluster_targets,
)
from ltlib.methods.two_head import TwoHeadModel
from ltlib.metrics import LongTailMetrics

DIGITS_COUNTS = [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]  # digits_lt: long_tail_counts(100, 10, 10)
SUMMARY = ("top1", "mean_class_acc", "many_acc", "medium_acc", "few_acc", "num_samples")


def make_model(counts=DIGITS_COUNTS, **kwargs) -> TwoHeadModel:
    torch.manual_seed(0)
    return TwoHeadModel(create_backbone("resnet20", in_chans=1), len(counts), counts, **kwargs)


# ---------------------------------------------------------------------------------------------------
# The decomposition: K-way soft CE = CE on s_c = LSE_{k in c} z_k + within-class soft CE


def eq4_targets(cluster_ids: np.ndarray, owner: np.ndarray, alpha: float) -> np.ndarray:
    """Eq. 4 written out in NumPy: alpha on the own cluster, (1 - alpha) / (u_c - 1) on each sibling."""
    q = np.zeros((cluster_ids.size, owner.size))
    for i, k in enumerate(cluster_ids):
        siblings = np.flatnonzero(owner == owner[k])
        if siblings.size == 1:
            q[i, k] = 1.0
        else:
            q[i, siblings] = (1.0 - alpha) / (siblings.size - 1)
            q[i, k] = alpha
    return q


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha", [0.5, 0.9, 1.0, 0.1])
def test_kway_soft_ce_is_class_ce_on_logsumexp_plus_within_class_term(seed, alpha):
    rng = np.random.default_rng(seed)
    u = rng.integers(1, 6, size=7)  # a random division: 1 .. 5 clusters for each of 7 classes
    owner = np.repeat(np.arange(u.size), u)
    batch = 32
    labels = rng.integers(0, u.size, size=batch)
    cluster_ids = np.array([rng.choice(np.flatnonzero(owner == y)) for y in labels])
    z = rng.normal(scale=3.0, size=(batch, owner.size))
    q = eq4_targets(cluster_ids, owner, alpha)
    assert np.allclose(q.sum(1), 1.0) and (q[owner[None, :] != labels[:, None]] == 0).all()

    log_p = z - logsumexp(z)[:, None]  # K-way log-softmax
    kway = -(q * log_p).sum(1)
    s = np.stack([logsumexp(z[:, owner == c]) for c in range(u.size)], axis=1)  # [B, C]
    class_ce = -(s[np.arange(batch), labels] - logsumexp(s))
    within = np.zeros(batch)
    for i, y in enumerate(labels):
        members = owner == y
        within[i] = -(q[i, members] * (z[i, members] - s[i, y])).sum()  # soft CE of the within-class softmax
    np.testing.assert_allclose(kway, class_ce + within, rtol=0, atol=1e-6)
    assert (within >= -1e-12).all()

    # ltlib's pieces agree with the independent computation: eq. 4 and sum_prob = s
    division = ClassDivision(tuple(int(n) for n in u))
    targets = soft_cluster_targets(torch.as_tensor(cluster_ids), torch.tensor(division.cluster_to_class),
                                   torch.tensor(division.clusters_per_class), alpha)
    np.testing.assert_allclose(targets.numpy(), q, atol=1e-6)
    sum_prob = cluster_to_class_logits(torch.as_tensor(z), division.cluster_index(), "sum_prob")
    np.testing.assert_allclose(sum_prob.numpy(), s, atol=1e-9)
    max_logit = cluster_to_class_logits(torch.as_tensor(z), division.cluster_index())  # the default rule
    np.testing.assert_allclose(max_logit.numpy(), np.stack([z[:, owner == c].max(1) for c in range(u.size)], 1))
    # max_logit is below sum_prob by at most log u_c
    gap = s - max_logit.numpy()
    assert (gap >= -1e-12).all() and (gap <= np.log(u)[None, :] + 1e-9).all()


# ---------------------------------------------------------------------------------------------------
# The statistical check: max_logit moves accuracy to the tail, sum_prob behaves like CE

TOY_COUNTS = [400, 200, 100, 50, 25, 12]  # eq. 3 with u = 4: 4, 2, 2, 1, 1, 1 clusters (K = 11)
TOY_DIM, TOY_STEPS, TOY_U, TOY_ALPHA = 8, 200, 4, 0.5


def _toy_problem(seed: int) -> tuple[torch.Tensor, ...]:
    """Gaussian blobs (unit variance, means ~ N(0, I) in 8-D), long-tailed training set, 300 test images per class."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(len(TOY_COUNTS), TOY_DIM, generator=gen)

    def sample(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        return means[y] + torch.randn(len(y), TOY_DIM, generator=gen), y

    return (*sample(TOY_COUNTS), *sample([300] * len(TOY_COUNTS)))


def _fit_linear(x: torch.Tensor, targets: torch.Tensor, seed: int) -> torch.nn.Linear:
    """A linear classifier trained full-batch with Adam on soft-target cross-entropy (one budget for all)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], targets.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(TOY_STEPS):
        optimizer.zero_grad()
        (-(targets * F.log_softmax(model(x), dim=1)).sum(1).mean()).backward()
        optimizer.step()
    return model


def _per_class_acc(scores: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    pred = scores.argmax(1)
    return np.array([(pred[y == c] == c).double().mean().item() for c in range(len(TOY_COUNTS))])


def toy_accuracies(seed: int) -> dict[str, np.ndarray]:
    """Balanced-test per-class accuracy of CE and of the K-way head (eq. 4 labels, random division) read with
    ``max_logit`` and ``sum_prob``."""
    x, y, x_test, y_test = _toy_problem(seed)
    division = ClassDivision.from_counts(TOY_COUNTS, TOY_U)
    cluster_ids = torch.as_tensor(assign_clusters(y.numpy(), division, "random", seed=seed))
    q = soft_cluster_targets(cluster_ids, torch.tensor(division.cluster_to_class),
                             torch.tensor(division.clusters_per_class), TOY_ALPHA)
    kway = _fit_linear(x, q, seed)
    ce = _fit_linear(x, F.one_hot(y, len(TOY_COUNTS)).float(), seed)
    with torch.no_grad():
        z = kway(x_test)
        return {"ce": _per_class_acc(ce(x_test), y_test),
                **{rule: _per_class_acc(cluster_to_class_logits(z, division.cluster_index(), rule), y_test)
                   for rule in ("max_logit", "sum_prob")}}


def test_max_logit_moves_accuracy_to_the_tail_and_sum_prob_matches_cross_entropy(one_torch_thread):
    # 6 seeds. Verified over seeds 0..49: the few-class (25 and 12 images) accuracy gain of max_logit over CE is
    # +0.090 on average and positive in every seed (+0.025 .. +0.165); sum_prob's is +0.006 (-0.012 .. +0.052),
    # smaller in magnitude than max_logit's in every seed; mean class accuracy: +0.037 (min +0.017) vs +0.001.
    seeds = range(6)
    few_max, few_sum, mean_max, mean_sum = [], [], [], []
    for seed in seeds:
        acc = toy_accuracies(seed)
        few = {rule: values[-2:].mean() for rule, values in acc.items()}
        few_max.append(few["max_logit"] - few["ce"])
        few_sum.append(few["sum_prob"] - few["ce"])
        mean_max.append(acc["max_logit"].mean() - acc["ce"].mean())
        mean_sum.append(acc["sum_prob"].mean() - acc["ce"].mean())
    few_max, few_sum = np.array(few_max), np.array(few_sum)
    assert few_max.mean() > 0.04 and (few_max > 0).all(), few_max
    assert abs(few_sum.mean()) < 0.25 * few_max.mean() and (np.abs(few_sum) < few_max).all(), few_sum
    # the shift is a correction, not a loss: the balanced mean class accuracy rises too
    assert np.mean(mean_max) > 0.01 and abs(np.mean(mean_sum)) < 0.25 * np.mean(mean_max), (mean_max, mean_sum)


# ---------------------------------------------------------------------------------------------------
# Both rules on every evaluation


def _evaluate(model: TwoHeadModel, images: torch.Tensor, targets: torch.Tensor, split: str = "val") -> None:
    """One evaluation epoch without a Trainer (``self.log`` only warns then)."""
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for start in range(0, len(targets), 8):
            batch = (images[start:start + 8], targets[start:start + 8])
            (model.validation_step if split == "val" else model.test_step)(batch, 0)
        (model.on_validation_epoch_end if split == "val" else model.on_test_epoch_end)()


def _reference(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    metric = LongTailMetrics(10, DIGITS_COUNTS)
    metric.update(scores, targets)
    return metric.compute()


@pytest.mark.parametrize("prediction", ["max_logit", "sum_prob"])
@pytest.mark.parametrize("predict_heads", ["main", "both"])
def test_every_evaluation_records_both_rules_from_the_same_logits(prediction, predict_heads):
    model = make_model(prediction=prediction, predict_heads=predict_heads)
    other = {"max_logit": "sum_prob", "sum_prob": "max_logit"}[prediction]
    assert model.evaluation_variants == (other,) and model.configured_variant == prediction
    assert model.variant_group == "prediction"
    gen = torch.Generator().manual_seed(1)
    images, targets = torch.randn(24, 1, 8, 8, generator=gen), torch.randint(10, (24,), generator=gen)
    with torch.no_grad():
        model.eval()
        fmap = model.backbone.forward_features(images)
        cluster_logits = model.classifier(model.backbone.pool(fmap))
        fbh = F.log_softmax(model.fbh(fmap), dim=1)
    expected = {}
    for rule in ("max_logit", "sum_prob"):
        main = cluster_to_class_logits(cluster_logits, model.cluster_index, rule)
        if predict_heads == "both":  # the rule maps the main head, then the two heads' probabilities are averaged
            main = torch.log((main.softmax(1) + fbh.exp()) / 2)
        expected[rule] = _reference(main, targets)
    forward_calls = []
    features = model.backbone.forward_features
    model.backbone.forward_features = lambda x: forward_calls.append(1) or features(x)
    for split in ("val", "test"):
        _evaluate(model, images, targets, split)
    assert len(forward_calls) == 2 * 3  # one forward pass per batch: the other rule reuses the logits
    for split in ("val", "test"):
        assert torch.equal(model.last_metrics[split]["confusion"], expected[prediction]["confusion"])
        for rule in ("max_logit", "sum_prob"):
            assert torch.equal(model.last_variant_metrics[rule][split]["confusion"], expected[rule]["confusion"])
        assert model.last_variant_metrics[prediction][split]["top1"] == model.last_metrics[split]["top1"]
    # the variant metrics are reset after each epoch, like the standard ones
    assert all(int(metric.confusion.sum()) == 0 for metric in model.variant_metrics.values())


def test_no_variants_where_the_rules_do_not_apply_or_coincide():
    assert make_model(predict_heads="fbh").evaluation_variants == ()  # the main head is not evaluated
    assert make_model(class_division=False).evaluation_variants == ()  # u_c = 1: max = logsumexp
    assert make_model(u=1).evaluation_variants == ()
    model = make_model(class_division=False)
    _evaluate(model, torch.randn(8, 1, 8, 8), torch.randint(10, (8,)))
    assert model.last_variant_metrics == {} and set(model.last_metrics) == {"val"}


def test_default_rule_is_max_logit_and_checkpoints_are_unchanged():
    model = make_model()
    assert model.prediction == "max_logit" and model.hparams["prediction"] == "max_logit"
    plain = make_model(predict_heads="fbh")
    # the variant metrics are not state: checkpoints with and without them load into each other
    assert set(model.state_dict()) == set(plain.state_dict())


# ---------------------------------------------------------------------------------------------------
# A CLI run on the digits: results.json, the console table and the CSV log


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("two_head_prediction") / "run"
    proc = run_cli("method=two_head", f"hydra.run.dir={run_dir}", "trainer.max_epochs=2", "optim.warmup_epochs=1",
                   "backbone=resnet20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_results_json_holds_both_rules_and_the_configured_one_is_the_standard(digits_run):
    results = json.loads((digits_run / "results.json").read_text())
    assert results["config"]["method"]["prediction"] == "max_logit"
    by_rule = results["metrics_by_prediction"]
    assert set(by_rule) == {"max_logit", "sum_prob"}
    for rule in by_rule:
        assert set(by_rule[rule]) == {"val", "test"}
        for split, summary in by_rule[rule].items():
            assert set(SUMMARY) <= set(summary) and len(summary["per_class_acc"]) == 10
            assert summary["num_samples"] == results["metrics"][split]["num_samples"]
            per_class = [a for a in summary["per_class_acc"] if a is not None]
            assert summary["mean_class_acc"] == pytest.approx(np.mean(per_class), abs=1e-12)
    for split in ("val", "test"):
        assert {k: by_rule["max_logit"][split][k] for k in SUMMARY} == results["metrics"][split]
        assert by_rule["max_logit"][split]["per_class_acc"] == [row[f"{split}_acc"] for row in results["per_class"]]
    console = Console(record=True, width=160)
    table = print_results_table(results, console=console)
    assert table.row_count == 4  # val, val · sum_prob, test, test · sum_prob
    text = " ".join(console.export_text().split())
    assert "val · sum_prob" in text and "test · sum_prob" in text
    assert "val, test: prediction=max_logit (configured); · sum_prob: prediction=sum_prob" in text


@pytest.mark.slow
def test_csv_log_has_both_rules_every_epoch(digits_run):
    with open(digits_run / "logs" / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("val/mean_class_acc")]
    assert [int(row["epoch"]) for row in rows][:2] == [0, 1]  # the two training epochs (+ the final validate)
    for row in rows:
        for rule in ("max_logit", "sum_prob"):
            for key in ("top1", "mean_class_acc", "medium_acc", "few_acc"):  # no digits class is many-shot
                assert not math.isnan(float(row[f"val_{rule}/{key}"]))
        assert row["val_max_logit/mean_class_acc"] == row["val/mean_class_acc"]
    with open(digits_run / "logs" / "metrics.csv", newline="") as f:
        test_rows = [row for row in csv.DictReader(f) if row.get("test/top1")]
    assert len(test_rows) == 1 and test_rows[0]["test_sum_prob/top1"] and test_rows[0]["test_max_logit/top1"]
