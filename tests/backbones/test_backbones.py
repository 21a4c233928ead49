"""Tests for ltlib.backbones: registry, the Backbone contract, architectures and pretrained loading.

No test touches the network: an autouse fixture makes any torchvision download fail the test.
"""

from __future__ import annotations

import copy
import os
import urllib.error
from collections.abc import Callable, Iterator

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum
from torchvision.models import mobilenetv2 as tv_mobilenet
from torchvision.models import resnet as tv_resnet
from torchvision.models import vgg as tv_vgg

from ltlib.backbones import (
    Backbone,
    cifar_resnet,
    create_backbone,
    list_backbones,
    register_backbone,
    registry,
)
from ltlib.errors import LtlibError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CIFAR_NETS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
OUT_DIMS = {
    "resnet20": 64, "resnet32": 64, "resnet44": 64, "resnet56": 64, "resnet110": 64,
    "resnet10": 512, "resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048,
    "resnet152": 2048, "resnext50_32x4d": 2048, "vgg16": 512, "mobilenet_v2": 1280,
}


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Fail any test that would download weights."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a backbone test tried to download weights")
    monkeypatch.setattr(WeightsEnum, "get_state_dict", forbidden)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)


@pytest.fixture(scope="module")
def built() -> Iterator[Callable[[str], Backbone]]:
    """``built(name)``: a default backbone built once per module; tests must not modify it."""
    cache: dict[str, Backbone] = {}

    def get(name: str) -> Backbone:
        if name not in cache:
            cache[name] = create_backbone(name).eval()
        return cache[name]

    yield get
    cache.clear()


def sample_input(name: str, in_chans: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, in_chans, 32, 32) if name in CIFAR_NETS else torch.randn(1, in_chans, 64, 64)


def one_line_error(excinfo: pytest.ExceptionInfo[LtlibError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- registry ---------------------------------------------------------------------------------------

def test_every_listed_backbone_is_registered_and_sorted():
    assert list_backbones() == sorted(OUT_DIMS)


def test_list_backbones_filters_with_fnmatch_pattern():
    resnets = list_backbones("resnet*")
    assert {"resnet10", "resnet18", "resnet32", "resnet110", "resnet152"} <= set(resnets)
    assert not {"vgg16", "mobilenet_v2", "resnext50_32x4d"} & set(resnets)
    assert list_backbones("vgg*") == ["vgg16"]
    assert list_backbones("resnet?0") == ["resnet10", "resnet20", "resnet50"]
    assert list_backbones("nothing*") == []


def test_unknown_name_lists_available_backbones():
    with pytest.raises(LtlibError) as excinfo:
        create_backbone("resnet33")
    message = one_line_error(excinfo)
    assert "unknown backbone 'resnet33'" in message
    assert all(name in message for name in list_backbones())


@pytest.mark.parametrize("name,kwargs,expected", [
    ("resnet32", {"small_input": True}, ["'resnet32'", "'small_input'"]),
    ("resnet18", {"widht_mult": 2.0}, ["'resnet18'", "'widht_mult'", "small_input"]),
    ("resnet18", {"small_input": "yes"}, ["'resnet18'", "small_input='yes'", "bool"]),
    ("mobilenet_v2", {"width_mult": "wide"}, ["'mobilenet_v2'", "width_mult='wide'", "float"]),
    ("mobilenet_v2", {"width_mult": 0.0}, ["'mobilenet_v2'", "width_mult=0.0"]),
    ("resnet20", {"in_chans": 0}, ["'resnet20'", "in_chans=0"]),
])
def test_bad_options_name_the_option_and_backbone(name, kwargs, expected):
    with pytest.raises(LtlibError) as excinfo:
        create_backbone(name, **kwargs)
    message = one_line_error(excinfo)
    assert all(part in message for part in expected), message


def test_register_backbone_adds_a_factory_and_rejects_a_different_duplicate(monkeypatch):
    monkeypatch.setattr(registry, "_BACKBONES", registry._BACKBONES.copy())

    @register_backbone("tiny_test_net")
    def tiny_test_net(*, in_chans: int = 3, width: int = 4) -> Backbone:
        trunk = nn.Conv2d(in_chans, width, 3, padding=1)
        return Backbone(trunk, nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU()), width, arch="tiny_test_net")

    assert "tiny_test_net" in list_backbones("tiny*")
    model = create_backbone("tiny_test_net", in_chans=2, width=6)
    assert model(torch.randn(3, 2, 8, 8)).shape == (3, 6)

    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet18")(tiny_test_net)

    @register_backbone("forwarding_test_net")
    def forwarding_test_net(*, in_chans: int = 3, **options) -> Backbone:
        return tiny_test_net(in_chans=in_chans, **options)

    with pytest.raises(LtlibError) as excinfo:
        create_backbone("forwarding_test_net", depth=3)
    message = one_line_error(excinfo)
    assert "'forwarding_test_net'" in message and "'depth'" in message


# --- the Backbone contract, for every backbone ------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OUT_DIMS))
def test_backbone_shapes_and_forward_decomposition(name, built):
    model = built(name)
    x = sample_input(name)
    assert isinstance(model, Backbone)
    assert model.out_dim == model.num_features == OUT_DIMS[name]
    with torch.no_grad():
        features = model(x)
        fmap = model.forward_features(x)
        manual = model.pool(model.last_block(model.trunk(x)))
    assert features.shape == (x.shape[0], OUT_DIMS[name])
    assert fmap.ndim == 4 and fmap.shape[:2] == (x.shape[0], OUT_DIMS[name])
    assert torch.equal(features, manual)
    assert torch.allclose(model.pool(fmap), fmap.mean(dim=(2, 3)), atol=1e-6)


@pytest.mark.parametrize("name", sorted(OUT_DIMS))
def test_copy_last_block_is_a_freshly_initialised_duplicate(name, built):
    model = copy.deepcopy(built(name))
    with torch.no_grad():  # make the original look trained: every value moves off its initial value
        for param in model.last_block.parameters():
            param.add_(0.5)
        for layer in model.last_block.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.add_(1.0)
    before = {key: value.clone() for key, value in model.last_block.state_dict().items()}

    fresh = model.copy_last_block()

    assert type(fresh) is type(model.last_block) and repr(fresh) == repr(model.last_block)
    old_params, new_params = dict(model.last_block.named_parameters()), dict(fresh.named_parameters())
    assert old_params.keys() == new_params.keys() and old_params
    for key, old in old_params.items():
        new = new_params[key]
        assert new.shape == old.shape and new.requires_grad
        assert not torch.equal(new, old), key
        assert new.untyped_storage().data_ptr() != old.untyped_storage().data_ptr(), key
    for layer in fresh.modules():
        if isinstance(layer, nn.BatchNorm2d):
            assert torch.equal(layer.running_mean, torch.zeros_like(layer.running_mean))
    for key, value in model.last_block.state_dict().items():
        assert torch.equal(value, before[key]), f"copy_last_block changed the original's {key}"

    # Same initialisation scheme as a freshly built model: matching spread of the large weights.
    reference = dict(built(name).last_block.named_parameters())
    for key, new in new_params.items():
        if new.ndim >= 2 and new.numel() >= 1000:
            ratio = (new.std() / reference[key].std()).item()
            assert 0.9 < ratio < 1.1, (key, ratio)

    with torch.no_grad():
        hidden = model.eval().trunk(sample_input(name))
        assert fresh.eval()(hidden).shape == model.last_block(hidden).shape


def test_last_block_is_the_last_residual_block(built):
    cifar = built("resnet32")
    assert isinstance(cifar.last_block, cifar_resnet.BasicBlock) and cifar.last_block.conv2.out_channels == 64
    trunk_blocks = [m for m in cifar.trunk.modules() if isinstance(m, cifar_resnet.BasicBlock)]
    assert len(trunk_blocks) == 3 * 5 - 1

    r50 = built("resnet50")
    assert isinstance(r50.last_block, tv_resnet.Bottleneck) and len(r50.trunk.layer4) == 2
    assert not hasattr(r50, "fc") and not hasattr(r50.trunk, "fc")
    r10 = built("resnet10")
    assert isinstance(r10.last_block, tv_resnet.BasicBlock) and not hasattr(r10.trunk, "layer4")

    vgg = built("vgg16")
    assert sum(isinstance(m, nn.Conv2d) for m in vgg.last_block) == 3
    assert isinstance(vgg.last_block[-1], nn.MaxPool2d)
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.trunk) == 4
    small_vgg = create_backbone("vgg16", small_input=True)
    assert not any(isinstance(m, nn.MaxPool2d) for m in small_vgg.last_block)

    mobile = built("mobilenet_v2")
    assert isinstance(mobile.last_block[0], tv_mobilenet.InvertedResidual)
    assert len(mobile.last_block) == 2 and mobile.last_block[1][0].out_channels == 1280
    assert isinstance(mobile.trunk[-1], tv_mobilenet.InvertedResidual)


# --- CIFAR ResNets ----------------------------------------------------------------------------------

def expected_cifar_parameters(depth: int, in_chans: int = 3) -> int:
    """Count from the architecture: 3x3 convs without bias, BN weight + bias, option-A shortcuts free."""
    def conv(cin: int, cout: int) -> int:
        return 3 * 3 * cin * cout

    def bn(channels: int) -> int:
        return 2 * channels

    total = conv(in_chans, 16) + bn(16)
    cin = 16
    for width in (16, 32, 64):
        for _ in range((depth - 2) // 6):
            total += conv(cin, width) + bn(width) + conv(width, width) + bn(width)
            cin = width
    return total


@pytest.mark.parametrize("depth,published_millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85), (110, 1.7)])
def test_cifar_resnet_parameter_counts(depth, published_millions):
    model = create_backbone(f"resnet{depth}")
    count = sum(p.numel() for p in model.parameters())
    assert count == expected_cifar_parameters(depth)
    assert round(count / 1e6, 2 if depth < 110 else 1) == published_millions


def test_option_a_shortcuts_subsample_and_zero_pad_without_parameters():
    model = create_backbone("resnet20")
    shortcuts = [m for m in model.modules() if isinstance(m, cifar_resnet.PadShortcut)]
    assert len(shortcuts) == 2  # the first block of stages 2 and 3
    assert all(not list(s.parameters()) for s in shortcuts)
    x = torch.randn(2, 16, 9, 9)
    out = shortcuts[0](x)
    assert out.shape == (2, 32, 5, 5)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


@pytest.mark.parametrize("name", ["resnet20", "resnet32"])
def test_cifar_resnet_grey_8x8_digits(name):
    model = create_backbone(name, in_chans=1).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert model(x).shape == (4, 64)
        assert model.forward_features(x).shape == (4, 64, 2, 2)
    assert sum(p.numel() for p in model.parameters()) == expected_cifar_parameters(int(name[6:]), in_chans=1)


# --- small inputs and channels of the ImageNet families ---------------------------------------------

@pytest.mark.parametrize("name,kwargs,side", [
    ("resnet18", {}, 1), ("resnet18", {"small_input": True}, 4),
    ("resnet50", {"small_input": True}, 4),
    ("vgg16", {}, 1), ("vgg16", {"small_input": True}, 2),
    ("vgg16", {"small_input": True, "batch_norm": False}, 2),
    ("mobilenet_v2", {}, 1), ("mobilenet_v2", {"small_input": True}, 2),
])
def test_feature_map_size_on_32x32(name, kwargs, side, built):
    model = create_backbone(name, **kwargs).eval() if kwargs else built(name)
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, OUT_DIMS[name], side, side)


def test_small_input_stems(built):
    resnet = create_backbone("resnet18", small_input=True)
    assert resnet.trunk.conv1.kernel_size == (3, 3) and resnet.trunk.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in resnet.trunk)
    mobile = create_backbone("mobilenet_v2", small_input=True)
    assert mobile.trunk[0][0].stride == (1, 1)
    assert built("mobilenet_v2").trunk[0][0].stride == (2, 2)


def test_vgg16_batch_norm_option(built):
    plain = create_backbone("vgg16", batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(p.numel() for p in plain.parameters()) == 14_714_688  # torchvision vgg16 features
    assert any(isinstance(m, nn.BatchNorm2d) for m in built("vgg16").modules())


def test_mobilenet_width_mult():
    model = create_backbone("mobilenet_v2", width_mult=1.4).eval()
    assert model.out_dim == 1792
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1792)


@pytest.mark.parametrize("name", ["resnet18", "resnext50_32x4d", "vgg16", "mobilenet_v2"])
def test_imagenet_families_take_grey_input(name):
    model = create_backbone(name, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, OUT_DIMS[name])


# --- pretrained weights -----------------------------------------------------------------------------

@pytest.mark.parametrize("failure", [urllib.error.URLError("Name or service not known"),
                                     OSError("Network is unreachable"), TimeoutError("timed out")])
def test_pretrained_offline_is_a_one_line_error_naming_the_file(monkeypatch, tmp_path, failure):
    def offline(*args, **kwargs):
        raise failure
    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(LtlibError) as excinfo:
        create_backbone("resnet18", pretrained=True)
    message = one_line_error(excinfo)
    assert "ResNet18_Weights.IMAGENET1K_V1" in message and "'resnet18'" in message
    assert "resnet18-f37072fd.pth" in message
    assert os.path.join(str(tmp_path), "hub", "checkpoints") in message
    assert "pretrained_path=FILE" in message


def test_pretrained_corrupt_cache_is_a_one_line_error(monkeypatch):
    def corrupt(*args, **kwargs):
        raise RuntimeError("invalid hash value (expected \"f37072fd\", got \"0000\")\nmore")
    monkeypatch.setattr(WeightsEnum, "get_state_dict", corrupt)
    with pytest.raises(LtlibError) as excinfo:
        create_backbone("resnet18", pretrained=True)
    message = one_line_error(excinfo)
    assert "resnet18-f37072fd.pth" in message and "delete" in message


@pytest.mark.parametrize("name,kwargs,weights", [
    ("resnet18", {}, "ResNet18_Weights.IMAGENET1K_V1"),
    ("resnext50_32x4d", {}, "ResNeXt50_32X4D_Weights.IMAGENET1K_V1"),
    ("vgg16", {}, "VGG16_BN_Weights.IMAGENET1K_V1"),
    ("vgg16", {"batch_norm": False}, "VGG16_Weights.IMAGENET1K_V1"),
    ("mobilenet_v2", {"small_input": True}, "MobileNet_V2_Weights.IMAGENET1K_V1"),
])
def test_pretrained_goes_through_torchvision_weights_api(monkeypatch, name, kwargs, weights):
    requested = []

    def fake_download(self, *args, **kwargs):
        requested.append(str(self))
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_download)
    with pytest.raises(LtlibError):
        create_backbone(name, pretrained=True, **kwargs)
    assert requested == [weights]


def test_pretrained_loads_the_downloaded_state_dict(monkeypatch):
    source = torchvision.models.resnet18()
    served = {key: value.clone() for key, value in source.state_dict().items()}
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *args, **kwargs: served)
    model = create_backbone("resnet18", pretrained=True)
    assert torch.equal(model.trunk.conv1.weight, served["conv1.weight"])
    assert torch.equal(model.last_block.bn2.running_var, served["layer4.1.bn2.running_var"])


@pytest.mark.parametrize("name,kwargs,expected", [
    ("resnet10", {}, "no downloadable pretrained weights"),
    ("resnet32", {}, "no downloadable pretrained weights"),
    ("resnet18", {"small_input": True}, "small_input=False"),
    ("mobilenet_v2", {"width_mult": 0.5}, "width_mult=1.0"),
    ("resnet50", {"in_chans": 1}, "in_chans=1"),
])
def test_pretrained_unavailable_is_a_clear_error(name, kwargs, expected):
    with pytest.raises(LtlibError) as excinfo:
        create_backbone(name, pretrained=True, **kwargs)
    message = one_line_error(excinfo)
    assert expected in message and f"'{name}'" in message


def trained_like(module: nn.Module) -> nn.Module:
    """Move a module's BN statistics off their initial values with a forward pass in train mode."""
    with torch.no_grad():
        module.train()(torch.randn(4, 3, 64, 64))
    return module.eval()


def test_pretrained_path_loads_a_torchvision_resnet18_state_dict(tmp_path):
    source = trained_like(torchvision.models.resnet18())
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = create_backbone("resnet18", pretrained_path=str(path)).eval()
    assert torch.equal(model.trunk.conv1.weight, source.conv1.weight)
    assert torch.equal(model.trunk.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
    assert torch.equal(model.last_block.conv2.weight, source.layer4[1].conv2.weight)
    source.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), source(x), atol=1e-5)


def test_pretrained_path_loads_torchvision_vgg16_bn_and_mobilenet_v2(tmp_path):
    vgg_source = nn.Module()  # torchvision's VGG key layout without its 100M-parameter classifier
    vgg_source.features = tv_vgg.make_layers(tv_vgg.cfgs["D"], batch_norm=True)
    vgg_source.classifier = nn.Linear(2, 2)
    trained_like(vgg_source.features)
    mobile_source = torchvision.models.mobilenet_v2()
    trained_like(mobile_source.features)
    x = torch.randn(2, 3, 64, 64)
    for name, source in [("vgg16", vgg_source), ("mobilenet_v2", mobile_source)]:
        path = tmp_path / f"{name}.pth"
        torch.save(source.state_dict(), path)
        model = create_backbone(name, pretrained_path=str(path)).eval()
        with torch.no_grad():
            expected = source.features(x).mean(dim=(2, 3))
            assert torch.allclose(model(x), expected, atol=1e-5), name


def test_pretrained_path_round_trips_an_ltlib_state_dict(tmp_path):
    source = create_backbone("resnet32", in_chans=1)
    path = tmp_path / "resnet32.pth"
    torch.save(source.state_dict(), path)
    model = create_backbone("resnet32", in_chans=1, pretrained_path=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_pretrained_path_errors_are_one_line(tmp_path):
    resnet34_file = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), resnet34_file)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    resnet18_file = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet18_file)

    cases = [
        ("resnet18", {"pretrained_path": str(resnet34_file)}, ["do not fit", "'resnet18'", "resnet34.pth"]),
        ("resnet18", {"pretrained_path": str(garbage)}, ["could not read", "garbage.pth"]),
        ("resnet18", {"pretrained_path": str(not_a_dict)}, ["list.pth", "not a state dict"]),
        ("resnet18", {"pretrained_path": str(tmp_path / "missing.pth")}, ["missing.pth", "does not exist"]),
        ("resnet18", {"pretrained_path": str(resnet18_file), "in_chans": 1}, ["trunk.conv1.weight", "shape"]),
        ("resnet18", {"pretrained_path": str(resnet18_file), "small_input": True}, ["trunk.conv1.weight"]),
        ("resnet50", {"pretrained_path": str(resnet18_file)}, ["do not fit", "'resnet50'"]),
    ]
    for name, kwargs, expected in cases:
        with pytest.raises(LtlibError) as excinfo:
            create_backbone(name, **kwargs)
        message = one_line_error(excinfo)
        assert all(part in message for part in expected), message

