"""Mixup and manifold mixup: mixed targets, mixing at exactly the chosen layer (checked with hooks),
one sampler and BBN's two samplers, the loss against lam CE(y_i) + (1 - lam) CE(y_j), bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ltlib.backbones import create_backbone
from ltlib.backbones.cifar_resnet import CifarResNet
from ltlib.errors import LtlibError
from ltlib.methods.mixup import sample_mix_weight
from ltlib.methods.mixup_baselines import MixupClassifier, backbone_stages, mix_locations, mixed_targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COUNTS = [40, 20, 10, 5]
C = len(COUNTS)
B = 6


def make(**kwargs) -> MixupClassifier:
    torch.manual_seed(0)
    method = MixupClassifier(CifarResNet(14, in_chans=1), C, COUNTS, **kwargs)
    return method.eval()  # fixed batch-norm statistics: hidden features are functions of single images


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, 8, 8, generator=gen), torch.randint(0, C, (B,), generator=gen)


def test_locations_name_the_backbone_stages() -> None:
    assert mix_locations(CifarResNet(14)) == ["input", "conv1", "bn1", "relu", "layer1", "layer2", "layer3",
                                              "last_block", "pool"]
    assert mix_locations(create_backbone("resnet18"))[:6] == ["input", "conv1", "bn1", "relu", "maxpool", "layer1"]
    backbone = CifarResNet(14)
    x = torch.randn(2, 3, 8, 8)
    hidden = x
    for _, stage in backbone_stages(backbone.eval()):
        hidden = stage(hidden)
    torch.testing.assert_close(hidden, backbone(x))  # the stages compose to the backbone


def test_mixed_targets_sum_to_one_and_put_lam_on_each_label() -> None:
    targets, partner = torch.tensor([0, 1, 2, 3, 3]), torch.tensor([1, 1, 0, 2, 3])
    soft = mixed_targets(targets, partner, 0.3, C)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(5))
    expected = 0.3 * F.one_hot(targets, C).float() + 0.7 * F.one_hot(partner, C).float()
    torch.testing.assert_close(soft, expected)
    assert soft[1, 1] == 1.0 and soft[0, 0] == pytest.approx(0.3) and soft[0, 1] == pytest.approx(0.7)


def capture(module: torch.nn.Module, store: dict, key: str, *, pre: bool) -> torch.utils.hooks.RemovableHandle:
    if pre:
        return module.register_forward_pre_hook(lambda m, args: store.__setitem__(key, args[0].detach().clone()))
    return module.register_forward_hook(lambda m, args, out: store.__setitem__(key, out.detach().clone()))


@pytest.mark.parametrize("location,next_module", [
    ("layer1", "backbone.trunk.layer2"), ("layer2", "backbone.trunk.layer3"), ("layer3", "backbone.last_block"),
    ("pool", "classifier"),
])
@pytest.mark.parametrize("two_samplers", [False, True])
def test_manifold_mixup_mixes_exactly_at_the_chosen_layer(location, next_module, two_samplers) -> None:
    method = make(locations=[location], second_sampler="reversed" if two_samplers else None)
    images, _ = batch(0)
    partner, _ = batch(1)
    lam = 0.3
    permutation = torch.tensor([3, 0, 5, 1, 2, 4])
    modules = dict(method.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [capture(modules[next_module], seen, "mixed", pre=True)]
    if location != "pool":
        handles.append(capture(modules[f"backbone.trunk.{location}"], seen, "hidden", pre=False))
    with torch.no_grad():
        logits = method.mixed_forward(images, lam, location, partner=partner if two_samplers else None,
                                      permutation=None if two_samplers else permutation)
    for handle in handles:
        handle.remove()
    clean = {}
    with torch.no_grad():
        for name, x in (("a", images), ("b", partner)):
            hidden = x
            for stage_name, stage in backbone_stages(method.backbone):
                hidden = stage(hidden)
                if stage_name == location:
                    clean[name] = hidden
                    break
    h_a = clean["a"]
    h_b = clean["b"] if two_samplers else h_a[permutation]
    torch.testing.assert_close(seen["mixed"], lam * h_a + (1 - lam) * h_b)
    if "hidden" in seen:  # the layer itself saw unmixed inputs: its output is the clean one
        torch.testing.assert_close(seen["hidden"], torch.cat([h_a, clean["b"]]) if two_samplers else h_a)
    assert logits.shape == (B, C)


@pytest.mark.parametrize("two_samplers", [False, True])
def test_input_mixup_feeds_the_mixed_images(two_samplers) -> None:
    method = make(locations=["input"], second_sampler="reversed" if two_samplers else None)
    images, partner = batch(0)[0], batch(1)[0]
    permutation = torch.tensor([1, 2, 3, 4, 5, 0])
    seen: dict[str, torch.Tensor] = {}
    handle = capture(method.backbone.trunk.conv1, seen, "input", pre=True)
    with torch.no_grad():
        logits = method.mixed_forward(images, 0.8, "input", partner=partner if two_samplers else None,
                                      permutation=None if two_samplers else permutation)
    handle.remove()
    other = partner if two_samplers else images[permutation]
    mixed = 0.8 * images + 0.2 * other
    torch.testing.assert_close(seen["input"], mixed)
    with torch.no_grad():
        torch.testing.assert_close(logits, method(mixed))


def test_lam_one_is_the_plain_forward_pass() -> None:
    method = make(locations=["layer2"])
    images, _ = batch(0)
    with torch.no_grad():
        torch.testing.assert_close(method.mixed_forward(images, 1.0, "layer2", permutation=torch.arange(B).flip(0)),
                                   method(images))


@pytest.mark.parametrize("two_samplers", [False, True])
def test_loss_is_lam_ce_of_one_label_plus_one_minus_lam_ce_of_the_other(two_samplers) -> None:
    method = make(alpha=0.4, locations=["layer1"], second_sampler="reversed" if two_samplers else None)
    (images, targets), (partner, partner_targets) = batch(0), batch(1)
    train_batch = {"main": [images, targets], "partner": [partner, partner_targets]} if two_samplers else (images, targets)
    torch.manual_seed(11)
    with torch.no_grad():
        loss = method.compute_loss(train_batch)
    torch.manual_seed(11)  # replay the draws: permutation (one sampler), then lam
    permutation = None if two_samplers else torch.randperm(B)
    lam = sample_mix_weight(0.4)
    assert 0.0 < lam < 1.0
    with torch.no_grad():
        logits = method.mixed_forward(images, lam, "layer1", partner=partner if two_samplers else None,
                                      permutation=permutation)
    other = partner_targets if two_samplers else targets[permutation]
    expected = lam * F.cross_entropy(logits, targets) + (1 - lam) * F.cross_entropy(logits, other)
    torch.testing.assert_close(loss, expected)


def test_bce_softmax_loss_of_verma_et_al_code() -> None:
    method = make(alpha=0.4, locations=["input"], mix_loss="bce_softmax")
    images, targets = batch(0)
    torch.manual_seed(5)
    with torch.no_grad():
        loss = method.compute_loss((images, targets))
    torch.manual_seed(5)
    permutation = torch.randperm(B)
    lam = sample_mix_weight(0.4)
    with torch.no_grad():
        p = torch.softmax(method.mixed_forward(images, lam, "input", permutation=permutation), dim=1)
    q = lam * F.one_hot(targets, C) + (1 - lam) * F.one_hot(targets[permutation], C)
    expected = -(q * p.log() + (1 - q) * (1 - p).log()).mean()
    torch.testing.assert_close(loss, expected.float())


def test_two_samplers_declare_a_uniform_and_a_reversed_stream() -> None:
    assert make().train_streams == {"main": "uniform"}
    assert make(second_sampler="reversed").train_streams == {"main": "uniform", "partner": "reversed"}


def test_layers_are_drawn_uniformly() -> None:
    method = make(locations=["input", "layer1", "layer2"])
    torch.manual_seed(0)
    draws = [method.sample_location() for _ in range(3000)]
    for location in method.locations:
        assert abs(draws.count(location) / 3000 - 1 / 3) < 5 * (2 / 9 / 3000) ** 0.5


def test_gradients_reach_the_backbone() -> None:
    method = make(locations=["layer2"]).train()
    method.compute_loss(batch(0)).backward()
    assert method.backbone.trunk.conv1.weight.grad.abs().sum() > 0
    assert method.classifier.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,expected", [
    (dict(alpha=-0.5), "alpha=-0.5 is out of range"),
    (dict(locations=["layer9"]), "unknown mixing location 'layer9'"),
    (dict(locations=[]), "locations is empty"),
    (dict(second_sampler="balanced"), "unknown sampler 'balanced'"),
    (dict(mix_loss="mse"), "unknown mix_loss 'mse'"),
])
def test_bad_arguments_are_one_line_errors(kwargs, expected) -> None:
    with pytest.raises(LtlibError) as info:
        MixupClassifier(CifarResNet(8, in_chans=1), C, COUNTS, **kwargs)
    assert expected in str(info.value) and "\n" not in str(info.value)
