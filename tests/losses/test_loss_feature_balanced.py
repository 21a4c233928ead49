"""FeatureBalancedLoss against FBL eq. 5-8 written out independently in numpy, its curricula (table 4),
the official code's progress mapping, the README snippet and its one-line errors."""

from __future__ import annotations

import inspect
import math
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.losses.reference import np_log_softmax, np_reduce

from ltlib.errors import LtlibError
from ltlib.losses import FeatureBalancedLoss, feature_balanced_stimulus
from ltlib.schedules import get_schedule, list_schedules

COUNTS = [500, 200, 80, 30, 10, 3]
REDUCTIONS = ["mean", "sum", "none"]

SNIPPET = """\
import torch
from ltlib.losses import FeatureBalancedLoss
backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 64), torch.nn.ReLU())
classifier = torch.nn.Linear(64, 10)
criterion = FeatureBalancedLoss(class_counts=[5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50])
optimizer = torch.optim.SGD([*backbone.parameters(), *classifier.parameters()], lr=0.1)
images, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
criterion.set_progress(0.5)                      # epoch / max_epochs
features = backbone(images)
loss = criterion(classifier(features), targets, features)
loss.backward(); optimizer.step()
"""


# ---- independent reference ---------------------------------------------------------------------
def np_stimulus(counts, kind: str) -> np.ndarray:
    n = np.asarray(counts, dtype=np.float64)
    s = np.log(n.max()) - np.log(n)
    if kind == "normalized":
        span = np.log(n.max()) - np.log(n.min())
        s = s / span if span > 0 else np.zeros_like(s)
    return s


def np_fbl(z, y, f, counts, lam, alpha, kind, weight=None, reduction="mean", eps=1e-12):
    """FBL eq. 5 (logits) and eq. 8 (cross-entropy) in float64 numpy."""
    s = np_stimulus(counts, kind)
    norms = np.sqrt((f ** 2).sum(axis=1))
    zb = np.empty_like(z)
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            zb[i, j] = z[i, j] - alpha * lam * s[j] / max(norms[i], eps)
    logp = np_log_softmax(zb)
    losses = np.array([-logp[i, y[i]] for i in range(len(y))])
    return np_reduce(losses, y, weight, reduction)


def _batch(num_classes: int, batch: int = 16, dim: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, generator=g, dtype=torch.float64) * 3
    features = torch.randn(batch, dim, generator=g, dtype=torch.float64).abs() * 0.5
    targets = torch.randint(0, num_classes, (batch,), generator=g)
    return logits, targets, features


# ---- values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("stimulus", ["normalized", "log"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_eq5_eq8(stimulus: str, reduction: str, weighted: bool) -> None:
    logits, targets, features = _batch(len(COUNTS))
    weight = np.array([0.2, 0.5, 1.0, 1.5, 2.0, 3.0]) if weighted else None
    lam, p = 7.0, 0.7
    loss_fn = FeatureBalancedLoss(COUNTS, lambda_=lam, stimulus=stimulus, reduction=reduction,
                                  weight=None if weight is None else torch.tensor(weight))
    loss_fn.set_progress(p)
    got = loss_fn(logits, targets, features)
    want = np_fbl(logits.numpy(), targets.numpy(), features.numpy(), COUNTS, lam, p ** 2, stimulus,
                  weight, reduction)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-6, atol=1e-6)
    if reduction == "none":
        assert got.shape == (16,)


def test_feature_balanced_logits_are_eq5() -> None:
    logits, _, features = _batch(len(COUNTS))
    loss_fn = FeatureBalancedLoss(COUNTS, lambda_=60.0)
    loss_fn.set_progress(0.5)
    got = loss_fn.feature_balanced_logits(logits, features).numpy()
    s = np_stimulus(COUNTS, "normalized")
    norms = np.sqrt((features.numpy() ** 2).sum(axis=1))
    want = logits.numpy() - 0.25 * 60.0 * s[None, :] / norms[:, None]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # the head class (stimulus 0) keeps its raw logit; every other class is lowered
    np.testing.assert_array_equal(got[:, 0], logits.numpy()[:, 0])
    assert (got[:, 1:] < logits.numpy()[:, 1:]).all()


def test_equal_counts_give_plain_cross_entropy_without_nan() -> None:
    logits, targets, features = _batch(4)
    for stimulus in ("normalized", "log"):
        loss_fn = FeatureBalancedLoss([100, 100, 100, 100], stimulus=stimulus)
        loss_fn.set_progress(1.0)
        assert loss_fn.class_stimulus.tolist() == [0.0, 0.0, 0.0, 0.0]
        loss = loss_fn(logits, targets, features)
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, F.cross_entropy(logits, targets))


def test_one_class() -> None:
    logits, targets, features = _batch(1)
    loss_fn = FeatureBalancedLoss([7])
    loss_fn.set_progress(1.0)
    loss = loss_fn(logits, targets, features)
    assert torch.isfinite(loss) and loss.item() == 0.0


def test_class_with_one_image() -> None:
    counts = [1000, 40, 1]
    logits, targets, features = _batch(3)
    s_norm = feature_balanced_stimulus(counts, "normalized")
    s_log = feature_balanced_stimulus(counts, "log")
    assert s_norm.tolist() == pytest.approx([0.0, math.log(25) / math.log(1000), 1.0])
    assert s_log.tolist() == pytest.approx([0.0, math.log(25), math.log(1000)])
    loss_fn = FeatureBalancedLoss(counts, lambda_=60.0)
    loss_fn.set_progress(1.0)
    loss = loss_fn(logits, targets, features)
    want = np_fbl(logits.numpy(), targets.numpy(), features.numpy(), counts, 60.0, 1.0, "normalized")
    assert np.isfinite(loss.item())
    np.testing.assert_allclose(loss.item(), want, rtol=1e-6)


def test_tail_classes_get_larger_stimulus() -> None:
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    for kind in ("normalized", "log"):
        s = feature_balanced_stimulus(counts, kind)
        assert s[0] == 0.0
        assert (s[1:] > s[:-1]).all()
    assert feature_balanced_stimulus(counts, "normalized")[-1] == pytest.approx(1.0)
    # unsorted counts: the order follows the counts, not the class index
    s = feature_balanced_stimulus([10, 1000, 100], "normalized")
    assert s.tolist() == pytest.approx([1.0, 0.0, 0.5])


def test_log_stimulus_equals_rescaled_normalized_stimulus() -> None:
    logits, targets, features = _batch(len(COUNTS))
    ratio = math.log(max(COUNTS) / min(COUNTS))
    log_fn = FeatureBalancedLoss(COUNTS, lambda_=2.0, stimulus="log")
    norm_fn = FeatureBalancedLoss(COUNTS, lambda_=2.0 * ratio, stimulus="normalized")
    for fn in (log_fn, norm_fn):
        fn.set_progress(0.8)
    torch.testing.assert_close(log_fn.class_stimulus, norm_fn.class_stimulus * ratio)
    torch.testing.assert_close(log_fn(logits, targets, features), norm_fn(logits, targets, features))
    # with the same lambda_ the paper's (log) stimulus is stronger whenever n_max / n_min > e
    assert log_fn.class_stimulus.max() > FeatureBalancedLoss(COUNTS).class_stimulus.max()


# ---- curricula ---------------------------------------------------------------------------------------
def test_progress_zero_is_cross_entropy_for_schedules_that_start_at_zero() -> None:
    starting_at_zero = [name for name in list_schedules() if get_schedule(name)(0.0) == 0.0]
    assert {"parabolic_increment", "linear_increment", "sine_increment", "cosine_increment"} <= set(starting_at_zero)
    logits, targets, features = _batch(len(COUNTS))
    for name in starting_at_zero:
        loss_fn = FeatureBalancedLoss(COUNTS, lambda_=60.0, schedule=name)
        loss_fn.set_progress(0.0)
        assert loss_fn.alpha == 0.0
        torch.testing.assert_close(loss_fn(logits, targets, features), F.cross_entropy(logits, targets))


@pytest.mark.parametrize(
    ("schedule", "formula"),
    [
        ("parabolic_increment", lambda p: p ** 2),                       # FBL default, eq. 7
        ("linear_increment", lambda p: p),
        ("sine_increment", lambda p: math.sin(p * math.pi / 2)),
        ("cosine_increment", lambda p: 1 - math.cos(p * math.pi / 2)),
        ("linear_decay", lambda p: 1 - p),
    ],
)
def test_table4_curricula(schedule: str, formula) -> None:
    loss_fn = FeatureBalancedLoss(COUNTS, schedule=schedule)
    for p in (0.0, 0.5, 1.0):
        loss_fn.set_progress(p)
        assert loss_fn.progress == p
        assert loss_fn.alpha == pytest.approx(formula(p), abs=1e-12)


def test_table4_curricula_exact_values() -> None:
    expected = {
        "parabolic_increment": (0.0, 0.25, 1.0),
        "linear_increment": (0.0, 0.5, 1.0),
        "sine_increment": (0.0, math.sqrt(0.5), 1.0),
        "cosine_increment": (0.0, 1 - math.sqrt(0.5), 1.0),
        "linear_decay": (1.0, 0.5, 0.0),
    }
    for name, values in expected.items():
        loss_fn = FeatureBalancedLoss(COUNTS, schedule=name)
        for p, value in zip((0.0, 0.5, 1.0), values, strict=True):
            loss_fn.set_progress(p)
            assert loss_fn.alpha == pytest.approx(value, abs=1e-12), (name, p)


def test_official_progress_matches_official_code() -> None:
    # official train.py: curr = (epoch / (args.epochs - 10)) ** 2 with a 0-based epoch, not clipped
    assert FeatureBalancedLoss.official_progress(0, 200) == 0.0
    assert FeatureBalancedLoss.official_progress(95, 200) == 0.5
    assert FeatureBalancedLoss.official_progress(190, 200) == 1.0
    assert FeatureBalancedLoss.official_progress(199, 200) == pytest.approx(199 / 190)
    loss_fn = FeatureBalancedLoss(COUNTS, progress_mode="official")
    for epoch in (0, 50, 190, 199):
        loss_fn.set_epoch(epoch, 200)
        assert loss_fn.alpha == pytest.approx((epoch / 190) ** 2)
    assert loss_fn.alpha > 1.09  # the last epochs exceed 1
    standard = FeatureBalancedLoss(COUNTS)
    standard.set_epoch(199, 200)
    assert standard.alpha == pytest.approx((199 / 200) ** 2)


def test_official_mode_alpha_above_one_changes_the_loss() -> None:
    logits, targets, features = _batch(len(COUNTS))
    loss_fn = FeatureBalancedLoss(COUNTS, lambda_=5.0, progress_mode="official")
    loss_fn.set_progress(FeatureBalancedLoss.official_progress(199, 200))
    want = np_fbl(logits.numpy(), targets.numpy(), features.numpy(), COUNTS, 5.0, (199 / 190) ** 2, "normalized")
    np.testing.assert_allclose(loss_fn(logits, targets, features).item(), want, rtol=1e-6)


# ---- gradients ----------------------------------------------------------------------------------------
def test_gradients_reach_features_and_logits() -> None:
    logits, targets, features = _batch(len(COUNTS))
    logits.requires_grad_(True)
    features.requires_grad_(True)
    loss_fn = FeatureBalancedLoss(COUNTS, lambda_=60.0)
    loss_fn.set_progress(0.5)
    loss_fn(logits, targets, features).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_gradients_match_finite_differences() -> None:
    logits, targets, features = _batch(len(COUNTS), batch=4, dim=5)
    loss_fn = FeatureBalancedLoss(COUNTS, lambda_=3.0, reduction="sum")
    loss_fn.set_progress(0.6)
    assert torch.autograd.gradcheck(lambda z, f: loss_fn(z, targets, f),
                                    (logits.requires_grad_(True), features.requires_grad_(True)))


def test_zero_feature_norm_is_clamped() -> None:
    logits, targets, features = _batch(len(COUNTS), batch=4)
    features[0] = 0.0
    features.requires_grad_(True)
    loss_fn = FeatureBalancedLoss(COUNTS, lambda_=2.0, eps=0.5, reduction="none")
    loss_fn.set_progress(1.0)
    losses = loss_fn(logits, targets, features)
    want = np_fbl(logits.numpy(), targets.numpy(), features.detach().numpy(), COUNTS, 2.0, 1.0,
                  "normalized", reduction="none", eps=0.5)
    np.testing.assert_allclose(losses.detach().numpy(), want, rtol=1e-6)
    losses.sum().backward()
    assert torch.isfinite(features.grad).all()
    # the default eps gives a huge but finite stimulus for an all-zero feature
    default = FeatureBalancedLoss(COUNTS)
    default.set_progress(1.0)
    assert torch.isfinite(default(logits, targets, features.detach()))


def test_half_precision_inputs_are_computed_in_float32() -> None:
    logits, targets, features = _batch(len(COUNTS))
    loss_fn = FeatureBalancedLoss(COUNTS)
    loss_fn.set_progress(0.5)
    loss = loss_fn(logits.bfloat16(), targets, features.bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_weight_can_be_replaced_for_deferred_reweighting() -> None:
    logits, targets, features = _batch(len(COUNTS))
    loss_fn = FeatureBalancedLoss(COUNTS)
    loss_fn.set_progress(0.5)
    weight = np.linspace(0.5, 3.0, len(COUNTS))
    loss_fn.weight = torch.tensor(weight, dtype=torch.float32)
    want = np_fbl(logits.numpy(), targets.numpy(), features.numpy(), COUNTS, 60.0, 0.25, "normalized", weight)
    np.testing.assert_allclose(loss_fn(logits, targets, features).item(), want, rtol=1e-6)
    assert "weight" not in loss_fn.state_dict()
    loss_fn.weight = torch.ones(3)
    with pytest.raises(LtlibError, match=r"weight has shape \[3\]"):
        loss_fn(logits, targets, features)


# ---- README snippet ------------------------------------------------------------------------------
def test_docstring_example_is_the_readme_snippet_and_trains() -> None:
    doc = inspect.getdoc(FeatureBalancedLoss)
    block = doc.split("Example (plain PyTorch, no trainer)::\n", 1)[1]
    code = textwrap.dedent("\n".join(line for line in block.splitlines() if line.startswith("    ") or not line))
    assert code.strip() == SNIPPET.strip()
    before, after = code.split("loss.backward(); optimizer.step()")
    namespace: dict[str, object] = {}
    torch.manual_seed(0)
    exec(before, namespace)
    params = [p.detach().clone() for p in (*namespace["backbone"].parameters(), *namespace["classifier"].parameters())]
    exec("loss.backward(); optimizer.step()" + after, namespace)
    assert torch.isfinite(namespace["loss"])
    new = [*namespace["backbone"].parameters(), *namespace["classifier"].parameters()]
    assert all(not torch.equal(old, cur) for old, cur in zip(params, new, strict=True))


# ---- errors ----------------------------------------------------------------------------------------
def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_class_count_mismatch_is_checked_at_call_time() -> None:
    logits, targets, features = _batch(7)
    loss_fn = FeatureBalancedLoss(COUNTS)
    with pytest.raises(LtlibError) as excinfo:
        loss_fn(logits, targets, features)
    message = _one_line(excinfo)
    assert "7 classes" in message and "6 entries" in message


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"lambda_": -1.0}, r"lambda_=-1\.0 .*\[0, inf\)"),
        ({"lambda_": float("nan")}, r"lambda_=nan"),
        ({"stimulus": "sqrt"}, r"unknown stimulus 'sqrt'; available: log, normalized"),
        ({"schedule": "quadratic"}, r"unknown schedule 'quadratic'; available: .*parabolic_increment"),
        ({"progress_mode": "paper"}, r"unknown progress_mode 'paper'; available: official, standard"),
        ({"reduction": "avg"}, r"unknown reduction 'avg'; available: batch_mean, mean, none, sum"),
        ({"eps": 0.0}, r"eps=0\.0"),
        ({"weight": [1.0, 2.0]}, r"weight has 2 entries but there are 6 classes"),
        ({"weight": [1.0, -2.0, 1, 1, 1, 1]}, r"weight must be finite and non-negative; got \[-2\.0\]"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, pattern: str) -> None:
    with pytest.raises(LtlibError, match=pattern) as excinfo:
        FeatureBalancedLoss(COUNTS, **kwargs)
    _one_line(excinfo)


@pytest.mark.parametrize("counts", [[10, 0, 5], [10, -3, 5], []])
def test_bad_class_counts(counts: list[int]) -> None:
    with pytest.raises(LtlibError, match="class_counts") as excinfo:
        FeatureBalancedLoss(counts)
    message = _one_line(excinfo)
    if counts:
        assert str(float(counts[1])) in message


def test_bad_progress() -> None:
    standard = FeatureBalancedLoss(COUNTS)
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(LtlibError, match=r"progress=.*\[0, 1\]"):
            standard.set_progress(p)
    official = FeatureBalancedLoss(COUNTS, progress_mode="official")
    official.set_progress(1.5)
    assert official.progress == 1.5
    for p in (-0.1, float("inf")):
        with pytest.raises(LtlibError, match=r"progress=.*\[0, inf\)"):
            official.set_progress(p)
    with pytest.raises(LtlibError, match=r"max_epochs=10 .*allowed: > 10"):
        FeatureBalancedLoss.official_progress(3, 10)
    with pytest.raises(LtlibError, match=r"epoch=-1"):
        FeatureBalancedLoss.official_progress(-1, 200)
    with pytest.raises(LtlibError, match=r"epoch=201"):
        standard.set_epoch(201, 200)


def test_non_finite_features() -> None:
    logits, targets, features = _batch(len(COUNTS))
    features[2, 3] = float("nan")
    features[5, 0] = float("inf")
    loss_fn = FeatureBalancedLoss(COUNTS)
    loss_fn.set_progress(0.5)
    with pytest.raises(LtlibError, match=r"features contain 2 non-finite values") as excinfo:
        loss_fn(logits, targets, features)
    _one_line(excinfo)
    unchecked = FeatureBalancedLoss(COUNTS, check_finite=False)
    unchecked.set_progress(0.5)
    assert torch.isnan(unchecked(logits, targets, features))


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda z, y, f: (z, y, f[:, :, None, None]), r"features must be pooled .*shape \[16, 12, 1, 1\]"),
        (lambda z, y, f: (z, y, f[:4]), r"features hold 4 samples but logits hold 16"),
        (lambda z, y, f: (z, y.double(), f), r"targets must be integer class indices .*float64"),
        (lambda z, y, f: (z, y[:3], f), r"targets hold 3 labels but logits hold 16"),
        (lambda z, y, f: (z[0], y, f), r"logits must be a floating tensor .*shape \[6\]"),
    ],
)
def test_bad_call_arguments(mutate, pattern: str) -> None:
    loss_fn = FeatureBalancedLoss(COUNTS)
    with pytest.raises(LtlibError, match=pattern) as excinfo:
        loss_fn(*mutate(*_batch(len(COUNTS))))
    _one_line(excinfo)


def test_repr_mentions_settings() -> None:
    text = repr(FeatureBalancedLoss(COUNTS, lambda_=150, schedule="linear_increment"))
    assert "lambda_=150" in text and "linear_increment" in text and "normalized" in text
