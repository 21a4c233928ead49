"""The loss registry and the LongTailLoss base class: every registered loss built by name, its reductions,
weights and the shared input checks (run once, in the base class); create_loss's errors; the method-side
constructor calls and per-epoch weight swaps."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import ltlib.losses as losses
from ltlib.errors import LtlibError
from ltlib.losses import base, registry
from ltlib.losses.base import LongTailLoss, apply_class_weight

COUNTS = [500, 120, 40, 9, 2]
C, B, D = len(COUNTS), 12, 7
NAMES = losses.list_losses()
EXPECTED = {"ce", "focal", "sigmoid_focal", "cb_focal", "ldam_code_focal", "ldam", "logit_adjusted",
            "feature_balanced", "soft_target_ce"}


def _inputs(loss_fn: LongTailLoss, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Random (logits, targets, *extra inputs) for a 5-class problem; soft targets for soft-target losses."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, C, generator=g) * 2).to(dtype)
    labels = torch.randint(0, C, (B,), generator=g)
    targets = F.softmax(torch.randn(B, C, generator=g), dim=1).to(dtype) if not loss_fn.takes_weight else labels
    extra = tuple(torch.randn(B, D, generator=g).abs().to(dtype) for _ in loss_fn.extra_inputs)
    return logits, targets, *extra


def _build(name: str, **kwargs) -> LongTailLoss:
    loss_fn = losses.create_loss(name, class_counts=COUNTS, **kwargs)
    if isinstance(loss_fn, losses.FeatureBalancedLoss):
        loss_fn.set_progress(0.5)
    return loss_fn


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_every_loss_is_registered_under_its_name() -> None:
    assert set(NAMES) == EXPECTED and NAMES == sorted(NAMES)
    assert losses.list_losses("*focal") == ["cb_focal", "focal", "ldam_code_focal", "sigmoid_focal"]
    assert isinstance(losses.create_loss("ce"), losses.WeightedCrossEntropy)
    assert isinstance(losses.create_loss("focal"), losses.FocalLoss)
    assert isinstance(losses.create_loss("ldam", COUNTS), losses.LDAMLoss)
    assert isinstance(losses.create_loss("soft_target_ce"), losses.SoftTargetCrossEntropy)


# ---- every registered loss ----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_reductions_of_every_loss(name: str) -> None:
    values = {}
    for reduction in losses.REDUCTIONS:
        loss_fn = _build(name, reduction=reduction)
        assert isinstance(loss_fn, LongTailLoss) and loss_fn.reduction == reduction
        values[reduction] = loss_fn(*_inputs(loss_fn))
    for reduction in ("mean", "batch_mean", "sum"):
        assert values[reduction].shape == () and torch.isfinite(values[reduction]), reduction
    assert values["none"].shape == (B,) and torch.isfinite(values["none"]).all()
    torch.testing.assert_close(values["batch_mean"] * B, values["sum"])
    torch.testing.assert_close(values["sum"], values["none"].sum())
    # batch_mean is the methods' former "none, then .mean()", exactly
    assert torch.equal(values["batch_mean"], values["none"].mean())


@pytest.mark.parametrize("name", NAMES)
def test_uniform_weights_give_the_unweighted_mean(name: str) -> None:
    loss_fn = _build(name)
    inputs = _inputs(loss_fn)
    if not loss_fn.takes_weight:
        loss_fn.weight = torch.ones(C)
        with pytest.raises(LtlibError, match=rf"^{type(loss_fn).__name__} takes no class weights") as excinfo:
            loss_fn(*inputs)
        _one_line(excinfo)
        return
    loss_fn.weight = None
    unweighted = loss_fn(*inputs)
    loss_fn.weight = torch.ones(C)
    torch.testing.assert_close(loss_fn(*inputs), unweighted)
    # any constant weight c: mean = sum_i c l_i / (c B), so c * mean = batch_mean
    loss_fn.weight = torch.full((C,), 2.5)
    mean = loss_fn(*inputs)
    loss_fn.reduction = "batch_mean"
    torch.testing.assert_close(2.5 * mean, loss_fn(*inputs))


@pytest.mark.parametrize("name", NAMES)
def test_weight_is_settable_and_stays_out_of_the_state_dict(name: str) -> None:
    loss_fn = _build(name, reduction="none")
    assert loss_fn.state_dict() == {}
    if not loss_fn.takes_weight:
        return
    inputs = _inputs(loss_fn)
    loss_fn.weight = None
    before = loss_fn(*inputs)
    weight = torch.linspace(0.5, 3.0, C)
    loss_fn.weight = weight           # as a method does once per epoch (deferred re-weighting)
    assert loss_fn.weight is weight and "weight" not in loss_fn.state_dict()
    after = loss_fn(*inputs)
    assert not torch.allclose(before, after)
    loss_fn.weight = None
    assert torch.equal(loss_fn(*inputs), before)


@pytest.mark.parametrize("name", NAMES)
def test_moves_and_computes_half_precision_in_float32(name: str) -> None:
    loss_fn = _build(name).to(torch.float64)
    assert loss_fn(*_inputs(loss_fn, dtype=torch.float64)).dtype == torch.float64
    loss = loss_fn(*_inputs(loss_fn, dtype=torch.bfloat16))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def _bad_calls(loss_fn: LongTailLoss):
    """(description, inputs, pattern) of the shared input errors, for one loss."""
    logits, targets, *extra = _inputs(loss_fn)
    cases = [
        ("1-D logits", (logits[0], targets, *extra), r"logits must be a floating tensor .*shape \[5\]"),
        ("int logits", (logits.long(), targets, *extra), r"logits must be a floating tensor .*torch\.int64"),
        ("short targets", (logits, targets[:3], *extra), r"targets"),
        ("missing input", (logits,) if not extra else (logits, targets),
         r"takes \(logits, targets, features\); got 2 inputs" if extra else None),
        ("extra input", (logits, targets, *extra, logits), r"takes \(logits, targets.*\); got \d inputs"),
    ]
    if loss_fn.takes_weight:
        cases.append(("float targets", (logits, targets.double(), *extra),
                      r"targets must be integer class indices of shape \[batch\]; got shape \[12\] torch\.float64"))
        cases.append(("2-D targets", (logits, F.one_hot(targets, C), *extra), r"targets must be integer class indices"))
    else:
        cases.append(("index targets", (logits, torch.zeros(B, dtype=torch.long)),
                      r"targets must be a floating tensor shaped like the logits \[12, 5\]; got shape \[12\]"))
    if loss_fn.num_classes is not None:
        cases.append(("class mismatch", (logits[:, :4], targets.clamp_max(3), *extra),
                      r"logits have 4 classes .* class_counts has 5 entries"))
    return cases


@pytest.mark.parametrize("name", NAMES)
def test_shared_input_errors_are_one_line_and_name_the_loss(name: str) -> None:
    loss_fn = _build(name)
    owner = type(loss_fn).__name__
    for description, inputs, pattern in _bad_calls(loss_fn):
        if pattern is None:  # forward(logits) without targets is Python's own TypeError
            with pytest.raises(TypeError):
                loss_fn(*inputs)
            continue
        with pytest.raises(LtlibError, match=pattern) as excinfo:
            loss_fn(*inputs)
        assert _one_line(excinfo).startswith(f"{owner}"), description
    if loss_fn.takes_weight:
        loss_fn.weight = torch.ones(3)
        with pytest.raises(LtlibError, match=rf"^{owner}: weight has shape \[3\] but logits have 5 classes"):
            loss_fn(*_inputs(loss_fn))


_PREAMBLE = ("check_logits", "check_class_indices", "compute_dtype", "weight_for")
_LOSS_MODULES = [base, registry, *(importlib.import_module(f"ltlib.losses.{m}") for m in
                                   ("feature_balanced", "focal", "ldam", "logit_adjustment", "soft_target"))]


@pytest.mark.parametrize("name", NAMES)
def test_forward_checks_run_once_in_the_base_class(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No loss repeats the preamble: each shared check runs once per call (wherever a loss module imported
    it), and a bad target is caught by the base's target check before the subclass computes anything."""
    loss_fn = _build(name)
    calls = dict.fromkeys(_PREAMBLE, 0)
    for helper in _PREAMBLE:
        original = getattr(base, helper)

        def spy(*args, _original=original, _name=helper, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        for module in _LOSS_MODULES:
            if getattr(module, helper, None) is original:
                monkeypatch.setattr(module, helper, spy)
    inputs = _inputs(loss_fn)
    loss_fn(*inputs)
    assert calls == {"check_logits": 1, "check_class_indices": int(loss_fn.takes_weight), "compute_dtype": 1,
                     "weight_for": 1}

    def never(*args, **kwargs):
        raise AssertionError("per_sample_loss ran on unchecked targets")

    monkeypatch.setattr(loss_fn, "per_sample_loss", never)
    monkeypatch.setattr(loss_fn, "reduced_loss", never)
    bad_targets = torch.zeros(B, C + 1) if not loss_fn.takes_weight else inputs[1].float()
    with pytest.raises(LtlibError, match=rf"^{type(loss_fn).__name__}: targets must be"):
        loss_fn(inputs[0], bad_targets, *inputs[2:])
    assert type(loss_fn).forward is LongTailLoss.forward


# ---- create_loss ----------------------------------------------------------------------------------
def test_create_loss_passes_options_and_counts() -> None:
    ldam = losses.create_loss("ldam", COUNTS, max_margin=0.3, scale=10.0, reduction="batch_mean")
    assert (ldam.max_margin, ldam.scale, ldam.reduction, ldam.num_classes) == (0.3, 10.0, "batch_mean", C)
    cb = losses.create_loss("cb_focal", torch.tensor(COUNTS), beta=0.0, gamma=2, loss_type="sigmoid")
    assert cb.gamma == 2.0 and torch.equal(cb.weight, torch.ones(C))
    # losses without class_counts ignore them
    focal = losses.create_loss("focal", COUNTS, gamma=0.5)
    assert focal.gamma == 0.5 and focal.num_classes is None
    assert losses.create_loss("ce", weight=[1.0, 2.0]).weight.tolist() == [1.0, 2.0]


def test_loss_options() -> None:
    assert losses.loss_options("ldam") == ["max_margin", "scale", "weight", "reduction"]
    assert losses.loss_options("focal") == ["gamma", "weight", "reduction"]
    assert losses.loss_options("soft_target_ce") == ["reduction"]
    for name in NAMES:
        assert "reduction" in losses.loss_options(name) and "class_counts" not in losses.loss_options(name)
    with pytest.raises(LtlibError, match=r"unknown loss 'focals'; available: cb_focal, ce, "):
        losses.loss_options("focals")


@pytest.mark.parametrize(
    ("name", "counts", "kwargs", "pattern"),
    [
        ("cross_entropy", None, {}, r"unknown loss 'cross_entropy'; available: cb_focal, ce, feature_balanced, focal, "
                                    r"ldam, ldam_code_focal, logit_adjusted, sigmoid_focal, soft_target_ce$"),
        ("focal", None, {"gama": 1.0}, r"loss 'focal' got an unknown option 'gama'; allowed: gamma, weight, reduction$"),
        ("ldam", COUNTS, {"margin": 0.5}, r"loss 'ldam' got an unknown option 'margin'; allowed: max_margin, scale, "
                                          r"weight, reduction$"),
        ("soft_target_ce", None, {"weight": [1.0]}, r"loss 'soft_target_ce' got an unknown option 'weight'; "
                                                    r"allowed: reduction$"),
        ("ldam", None, {}, r"loss 'ldam' needs class_counts \(training images per class\); got None"),
        ("focal", None, {"gamma": "1"}, r"loss 'focal' option gamma='1' must be float"),
        ("feature_balanced", COUNTS, {"check_finite": 1}, r"option check_finite=1 must be bool"),
        ("focal", None, {"reduction": "weighted_mean"}, r"unknown reduction 'weighted_mean'; available: batch_mean, "
                                                        r"mean, none, sum"),
        ("logit_adjusted", [10, 0, 3], {}, r"class_counts must be positive"),
    ],
)
def test_create_loss_errors(name: str, counts, kwargs: dict, pattern: str) -> None:
    with pytest.raises(LtlibError, match=pattern) as excinfo:
        losses.create_loss(name, counts, **kwargs)
    _one_line(excinfo)


def test_register_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_LOSSES", registry._LOSSES.copy())

    @losses.register_loss("scaled_ce")
    class ScaledCrossEntropy(LongTailLoss):
        def __init__(self, class_counts, strength: float = 1.0, weight=None, reduction: str = "mean") -> None:
            super().__init__(num_classes=len(class_counts), weight=weight, reduction=reduction)
            self.strength = float(strength)

        def per_sample_loss(self, logits, targets, weight):
            return apply_class_weight(F.cross_entropy(self.strength * logits, targets, reduction="none"),
                                      targets, weight)

    assert "scaled_ce" in losses.list_losses()
    loss_fn = losses.create_loss("scaled_ce", COUNTS, strength=2.0, reduction="sum")
    logits, targets = _inputs(loss_fn)
    torch.testing.assert_close(loss_fn(logits, targets), F.cross_entropy(2.0 * logits, targets, reduction="sum"))
    with pytest.raises(LtlibError, match=r"^ScaledCrossEntropy: logits have 4 classes"):
        loss_fn(logits[:, :4], targets.clamp_max(3))
    losses.register_loss("scaled_ce")(ScaledCrossEntropy)  # the same class again: replaced, no error
    with pytest.raises(ValueError, match=r"loss 'focal' is already registered by ltlib\.losses\.focal\.FocalLoss"):
        losses.register_loss("focal")(ScaledCrossEntropy)
    with pytest.raises(TypeError, match=r"decorates LongTailLoss subclasses"):
        losses.register_loss("plain")(torch.nn.CrossEntropyLoss)


# ---- the methods' constructor calls -----------------------------------------------------------------
def test_method_constructor_calls_and_epoch_weight_swaps() -> None:
    """The calls in ltlib/methods/*.py work unchanged, and ``criterion.weight = w or None`` per epoch."""
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(B, C, generator=g), torch.randint(0, C, (B,), generator=g)
    weight = losses.class_balanced_weights(COUNTS, 0.9999)
    criteria = [
        losses.FocalLoss(0.0, reduction="none"),
        losses.LDAMLoss(counts, max_margin=0.5, scale=30.0, reduction="mean"),
        losses.LogitAdjustedLoss(counts, tau=1.0, reduction="none"),
        losses.CBFocalLoss(counts, beta=0.0, gamma=1.0, loss_type="sigmoid", reduction="mean"),
        losses.LDAMCodeFocalLoss(1.0, reduction="none"),
        losses.FocalLoss(1.0, reduction="mean"),
    ]
    for criterion in criteria:
        for epoch_weight in (None, weight, None):
            criterion.weight = epoch_weight
            assert torch.isfinite(criterion(logits, targets)).all()
    fbl = losses.FeatureBalancedLoss(COUNTS, lambda_=60.0, stimulus="normalized", schedule="parabolic_increment",
                                     progress_mode="standard", check_finite=False)
    fbl.set_progress(0.5)
    assert torch.isfinite(fbl(logits, targets, torch.randn(B, D, generator=g)))
    soft = losses.SoftTargetCrossEntropy()
    assert torch.isfinite(soft(logits, F.one_hot(targets, C).float()))


@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
def test_registered_forms_equal_the_classes_the_methods_build(reduction: str) -> None:
    """ce is FocalLoss(gamma=0) and sigmoid_focal is CBFocalLoss(beta=0, sigmoid) with the weight a method
    sets, bit for bit; ce is F.cross_entropy(weight=w) up to rounding."""
    g = torch.Generator().manual_seed(4)
    logits, targets = torch.randn(B, C, generator=g) * 3, torch.randint(0, C, (B,), generator=g)
    for weight in (None, losses.class_balanced_weights(COUNTS, 0.999)):
        ce = losses.create_loss("ce", weight=weight, reduction=reduction)
        assert torch.equal(ce(logits, targets), losses.FocalLoss(0.0, weight=weight, reduction=reduction)(logits, targets))
        if reduction in ("mean", "sum", "none"):
            torch.testing.assert_close(ce(logits, targets),
                                       F.cross_entropy(logits, targets, weight=weight, reduction=reduction))
        sigmoid = losses.create_loss("sigmoid_focal", gamma=0.5, weight=weight, reduction=reduction)
        cb = losses.CBFocalLoss(COUNTS, beta=0.0, gamma=0.5, loss_type="sigmoid", reduction=reduction)
        cb.weight = weight
        assert torch.equal(sigmoid(logits, targets), cb(logits, targets))


def test_a_loss_without_per_sample_loss_cannot_be_built():
    from ltlib.losses import AdjustedCrossEntropyLoss, LongTailLoss

    class Incomplete(LongTailLoss):
        pass

    class NoAdjustment(AdjustedCrossEntropyLoss):
        pass

    for cls in (Incomplete, NoAdjustment):
        with pytest.raises(TypeError, match="abstract"):
            cls()
