"""Paper presets (``conf/experiment/``) run what produced each table's numbers: recipe, initialisation,
normalisation, augmentation and curriculum, checked against constants of the papers and official codes.

Each expected value below is written from the official code's text or the paper (quoted in the comment),
never read from ltlib's own configs.
"""

import math
import warnings

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torchvision import transforms as T

from ltlib.config import config_dir
from ltlib.methods.base import OptimConfig

# Per-channel statistics as written in the official BBN, FBL and LDAM-DRW CIFAR code (CIFAR-10's, used
# for CIFAR-100 too), and CIFAR-100's own training-set statistics.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
LARGE_ROOT = ["data.root=/nonexistent"]


@pytest.fixture(autouse=True)
def _hydra_config(restore_hydra_config):
    """Presets read ``hydra:runtime.choices`` (the table 1 recipe of each method): set it as a job has it."""


def compose_cfg(*overrides: str):
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def build_method(cfg, num_classes: int = 10, in_chans: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    backbone = instantiate(cfg.backbone, in_chans=in_chans)
    counts = [max(1, 500 // (c + 1)) for c in range(num_classes)]
    return instantiate(cfg.method)(backbone=backbone, num_classes=num_classes, class_counts=counts,
                                   optim=OmegaConf.to_container(cfg.optim, resolve=True))


def linear_weights(module: nn.Module) -> torch.Tensor:
    return torch.cat([m.weight.detach().flatten() for m in module.modules() if isinstance(m, nn.Linear)])


# ------------------------------------------------------------------------- classifier initialisation
KAIMING_STD_64 = math.sqrt(2.0 / 64)  # kaiming_normal_(w), fan_in 64, gain sqrt(2): LDAM-DRW's _weights_init
PYTORCH_BOUND_64 = 1.0 / math.sqrt(64)  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
PYTORCH_BOUND_128 = 1.0 / math.sqrt(128)  # BBN's official combiner: one fc over [f_c, f_r] (128 inputs)


@pytest.mark.parametrize("overrides", [
    ["experiment=fbl_cifar10_lt"], ["experiment=fbl_table2", "method=ce"],
    ["experiment=bbn_table1_baselines", "method=ce_drw"], ["experiment=bbn_table1_baselines", "method=ce_drs"],
    ["method=ce"],
])
def test_ldam_drw_and_fbl_code_rows_use_kaiming_normal_classifier_weights(overrides):
    cfg = compose_cfg(*overrides)
    stds = [linear_weights(build_method(cfg, seed=s).classifier).std() for s in range(4)]
    assert float(torch.stack(stds).mean()) == pytest.approx(KAIMING_STD_64, rel=0.05)


@pytest.mark.parametrize("overrides, bound", [
    (["experiment=bbn_table1_cifar10"], PYTORCH_BOUND_128),
    (["experiment=bbn_table1_baselines", "method=mixup"], PYTORCH_BOUND_64),
    (["experiment=bbn_table1_baselines", "method=manifold_mixup_two_samplers"], PYTORCH_BOUND_64),
])
def test_bbn_code_rows_keep_pytorch_default_classifier_weights(overrides, bound):
    weights = linear_weights(build_method(compose_cfg(*overrides)).classifier)
    assert float(weights.abs().max()) <= bound
    assert float(weights.std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)  # std of U(-b, b)


@pytest.mark.parametrize("method", ["ce", "focal", "cb_focal"])
def test_cui_code_rows_use_glorot_uniform_classifier_weights(method):
    # BBN table 1's CE, Focal and CB-Focal rows are Cui et al.'s (TensorFlow) numbers: a dense layer with
    # glorot_uniform weights, U(+-sqrt(6 / (fan_in + fan_out))), and zero bias (sigmoid forms: the prior).
    classifier = build_method(compose_cfg("experiment=bbn_table1_baselines", f"method={method}")).classifier
    bound = math.sqrt(6.0 / (64 + 10))
    weights = linear_weights(classifier)
    assert float(weights.abs().max()) <= bound
    assert float(weights.std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)
    expected_bias = 0.0 if method == "ce" else -math.log(10 - 1)
    assert torch.allclose(classifier.bias, torch.full_like(classifier.bias, expected_bias))


def test_classifier_weight_init_auto_is_pytorch_off_cifar_resnets():
    cfg = compose_cfg("method=ce", "backbone=resnet18")
    weights = linear_weights(build_method(cfg).classifier)
    assert float(weights.abs().max()) <= 1 / math.sqrt(512)


@pytest.mark.slow
def test_bad_classifier_weight_init_is_a_one_line_error_with_exit_status_2(tiny_run_args):
    from tests.conftest import run_cli

    proc = run_cli(*tiny_run_args, "method.classifier_weight_init=xavier")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "ltlib: error: unknown method.classifier_weight_init 'xavier'; available: auto, kaiming_normal, pytorch, "
        "xavier_uniform")


# ----------------------------------------------------------------------- BBN's ResNet-50 initialisation
def conv_std_ratio(backbone: nn.Module) -> tuple[float, float]:
    """(std, PyTorch default std 1/sqrt(3 fan_in)) of the 3x3 convs with as many inputs as outputs."""
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
             and m.in_channels == m.out_channels]
    std = float(torch.cat([c.weight.detach().flatten() for c in convs]).std())
    fan_in = convs[0].in_channels * 9
    assert all(c.in_channels * 9 == fan_in for c in convs[:3])
    return std, 1.0 / math.sqrt(3 * fan_in)


def test_bbn_inat_resnet50_keeps_pytorch_default_initialisation():
    torch.manual_seed(0)
    preset = instantiate(compose_cfg("experiment=bbn_inat", *LARGE_ROOT).backbone, in_chans=3)
    torch.manual_seed(0)
    plain = instantiate(compose_cfg("backbone=resnet50").backbone, in_chans=3)
    # The official BBN ResNet-50 has no init code; each layer class's own default then applies. Only the
    # convs of layer1 (64 channels) are compared, so fan_in is the same for all of them.
    preset_layer1, plain_layer1 = preset.trunk.layer1, plain.trunk.layer1
    std, pytorch_std = conv_std_ratio(preset_layer1)
    assert std == pytest.approx(pytorch_std, rel=0.05)
    # torchvision's scheme is Kaiming-normal fan_out: for these convs sqrt(6) = 2.45x larger
    assert conv_std_ratio(plain_layer1)[0] / std == pytest.approx(math.sqrt(6), rel=0.05)
    # BBN's re-balancing block is re-initialised with the same scheme
    copy_std, _ = conv_std_ratio(preset.copy_last_block())
    assert copy_std == pytest.approx(1.0 / math.sqrt(3 * 512 * 9), rel=0.05)


# --------------------------------------------------------------------------------- CIFAR-100 normalisation
def normalize_of(transform: T.Compose) -> T.Normalize:
    return [t for t in transform.transforms if isinstance(t, T.Normalize)][0]


CIFAR100_PRESETS = [["experiment=bbn_table1_cifar100"], ["experiment=fbl_cifar100_lt"],
                    ["experiment=two_head_table1_cifar100"], ["experiment=bbn_manners_cifar100"],
                    ["experiment=fbl_table2", "data=cifar100_lt"], ["experiment=bbn_table1_baselines", "data=cifar100_lt"],
                    ["data=cifar100_lt"]]


@pytest.mark.parametrize("overrides", CIFAR100_PRESETS)
def test_cifar100_is_normalised_with_cifar10_statistics_as_every_official_code(overrides):
    datamodule = instantiate(compose_cfg(*overrides).data)
    for transform in (datamodule.train_transform, datamodule.eval_transform):
        norm = normalize_of(transform)
        assert tuple(norm.mean) == pytest.approx(CIFAR10_MEAN) and tuple(norm.std) == pytest.approx(CIFAR10_STD)


def test_cifar100_own_statistics_are_a_named_option():
    datamodule = instantiate(compose_cfg("data=cifar100_lt", "data.normalization=cifar100").data)
    norm = normalize_of(datamodule.eval_transform)
    assert tuple(norm.mean) == pytest.approx(CIFAR100_MEAN) and tuple(norm.std) == pytest.approx(CIFAR100_STD)
    lists = instantiate(compose_cfg("data=cifar100_lt", "data.normalization=null", "data.mean=[0.5,0.5,0.5]",
                                    "data.std=[0.25,0.25,0.25]").data)
    assert tuple(normalize_of(lists.eval_transform).std) == pytest.approx((0.25,) * 3)


@pytest.mark.parametrize("overrides, message", [
    (["data.normalization=cifar1000"], "unknown normalization 'cifar1000'; available: cifar10, cifar100"),
    (["data.mean=[0.5,0.5,0.5]", "data.std=[0.2,0.2,0.2]"], "data.normalization='cifar10' and data.mean"),
    (["data.normalization=null", "data.mean=[0.5,0.5,0.5]"], "give both lists or neither"),
])
def test_bad_normalization_is_a_one_line_error(overrides, message):
    from ltlib.errors import find_user_error

    with pytest.raises(Exception) as caught:
        instantiate(compose_cfg("data=cifar100_lt", *overrides).data)
    error = find_user_error(caught.value)  # what ltlib.run prints as its one line (exit status 2)
    assert error is not None and message in str(error) and "\n" not in str(error)


# ----------------------------------------------------------------------------- ImageNet-style augmentation
@pytest.mark.parametrize("experiment", ["bbn_inat", "bbn_inat_2x", "fbl_table3_imagenet_lt", "fbl_table3_inat2018",
                                        "fbl_table3_places_lt"])
def test_large_dataset_presets_have_no_colour_jitter(experiment):
    # BBN's iNaturalist pipeline and FBL's (its ColorJitter line is commented out): crop, flip, tensor, normalise.
    datamodule = instantiate(compose_cfg(f"experiment={experiment}", *LARGE_ROOT).data)
    assert [type(t) for t in datamodule.train_transform.transforms] == [
        T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]


def test_colour_jitter_is_a_named_augmentation():
    datamodule = instantiate(compose_cfg("data=imagenet_lt", *LARGE_ROOT, "data.augmentation=imagenet_color_jitter").data)
    jitter = [t for t in datamodule.train_transform.transforms if isinstance(t, T.ColorJitter)]
    assert len(jitter) == 1 and jitter[0].brightness == (0.6, 1.4)  # ColorJitter(0.4): [1 - 0.4, 1 + 0.4]


# ------------------------------------------------------------------------- BBN iNaturalist schedules
def official_bbn_lrs(base_lr: float, milestones: list[int], max_epoch: int) -> list[float]:
    """The official BBN loop: a MultiStepLR over LR_STEP stepped at the start of every epoch 1..MAX_EPOCH."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    lrs = []
    for _ in range(1, max_epoch + 1):
        with warnings.catch_warnings():  # the official order: scheduler.step() before any optimizer.step()
            warnings.simplefilter("ignore")
            scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("experiment, lr_step, max_epoch", [("bbn_inat", [60, 80], 90),
                                                           ("bbn_inat_2x", [120, 160], 180)])
def test_bbn_inat_learning_rate_and_alpha_follow_the_official_configs(experiment, lr_step, max_epoch):
    cfg = compose_cfg(f"experiment={experiment}", *LARGE_ROOT)
    assert cfg.trainer.max_epochs == max_epoch and cfg.data.batch_size == 128
    optim = OptimConfig(**OmegaConf.to_container(cfg.optim, resolve=True))
    steps = 7
    ours = [optim.lr * optim.lr_factor(epoch * steps, steps, max_epoch) for epoch in range(max_epoch)]
    assert ours == pytest.approx(official_bbn_lrs(0.05, lr_step, max_epoch), rel=1e-9)
    # alpha = 1 - ((epoch - 1) / div_epoch) ** 2 with div_epoch = 100 * (MAX_EPOCH // 100 + 1) for 90 / 180
    from types import SimpleNamespace

    method = build_method(cfg)
    div_epoch = 100 * (max_epoch // 100 + 1)
    for epoch in (1, 2, max_epoch // 2, max_epoch):
        method._trainer = SimpleNamespace(current_epoch=epoch - 1, max_epochs=max_epoch, global_step=0,
                                          estimated_stepping_batches=1)
        assert method.current_alpha() == pytest.approx(1 - ((epoch - 1) / div_epoch) ** 2)


# ------------------------------------------------------------------------------- FBL's curriculum
@pytest.mark.parametrize("overrides", [["experiment=fbl_cifar10_lt"], ["experiment=fbl_cifar100_lt"],
                                       ["experiment=fbl_table2"], ["experiment=fbl_table4"],
                                       ["experiment=fbl_table3_imagenet_lt", *LARGE_ROOT],
                                       ["experiment=fbl_table3_inat2018", *LARGE_ROOT],
                                       ["experiment=fbl_table3_places_lt", *LARGE_ROOT]])
def test_fbl_presets_use_the_official_unclipped_progress(overrides):
    cfg = compose_cfg(*overrides)
    assert cfg.method.progress_mode == "official"
    from ltlib.losses import FeatureBalancedLoss

    epochs = cfg.trainer.max_epochs
    loss = FeatureBalancedLoss([100, 10], progress_mode=cfg.method.progress_mode)
    loss.set_progress(loss.official_progress(epochs - 1, epochs))
    # the official curriculum: (epoch / (epochs - 10)) ** 2, so 199 of 200 gives (199 / 190) ** 2
    assert loss.alpha == pytest.approx(((epochs - 1) / (epochs - 10)) ** 2)


def test_fbl_table4_other_curricula_use_epoch_over_epochs():
    cfg = compose_cfg("experiment=fbl_table4", "method.schedule=linear_increment")
    assert cfg.method.progress_mode == "standard"
    assert compose_cfg("method=fbl").method.progress_mode == "standard"  # the plain default: eq. 7's t / T
    assert compose_cfg("experiment=fbl_table2", "method.progress_mode=standard").method.progress_mode == "standard"


# ------------------------------------------------------------------------- the two-head model's decisions
@pytest.mark.parametrize("variant, mixup, weighted, from_epoch, channels", [
    ("ours", 0.0, False, None, "split_floor"),
    ("ours_fbh_projection", 0.0, False, None, "projection"),
    ("ours_full", 1.0, True, 120, "split_floor"),
    ("ours_full_from_start", 1.0, True, 0, "split_floor"),
])
def test_two_head_decisions_preset_ablates_each_open_decision(variant, mixup, weighted, from_epoch, channels):
    from types import SimpleNamespace

    cfg = compose_cfg("experiment=two_head_decisions", f"two_head_variant={variant}")
    assert cfg.trainer.max_epochs == 200 and list(cfg.optim.milestones) == [120, 160]  # the paper's CIFAR recipe
    model = build_method(cfg)
    assert model.prediction == "max_logit" and model.mixup_alpha == mixup
    # ResNet-32 on CIFAR-10: D = 64 channels, C = 10 classes, so 6 backbone channels per class (4 unused)
    assert model.fbh.channel_assignment == channels
    assert model.fbh.channels_per_class == (6 if channels == "split_floor" else math.ceil(64 / 10))
    assert (model.class_weights is not None) == weighted
    if weighted:  # deferred: DRW's rule, the first lr decay of the 200-epoch recipe (0-based epoch 120)
        model._trainer = SimpleNamespace(max_epochs=200, current_epoch=0)
        assert model.reweight_epoch == from_epoch
