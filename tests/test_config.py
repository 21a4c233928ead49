"""Compose every config combination, and check the configs ship inside the wheel."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_method
from omegaconf import OmegaConf

from ltlib.config import config_dir

CONF = Path(config_dir())


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("data", group_options("data"))
@pytest.mark.parametrize("method", group_options("method"))
def test_every_method_and_data_composes(method, data):
    required = {"folder": ["data.root=/tmp/x"],
                "filelist": ["data.root=/tmp/x", "data.source.train_list=a.txt", "data.source.test_list=b.txt"],
                **{name: ["data.root=/tmp/x"] for name in ("imagenet_lt", "places_lt", "inat2017", "inat2018")}}
    cfg = compose_cfg(f"method={method}", f"data={data}", *required.get(data, []))
    for node in ("method", "data", "backbone", "trainer"):
        get_method(cfg[node]["_target_"])  # the target resolves to a real callable
    assert cfg.data.seed == cfg.seed
    OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)


def test_recipes_follow_the_data_and_overrides_win():
    digits = compose_cfg()
    assert digits.trainer.max_epochs == 30 and list(digits.optim.milestones) == [20, 25]
    cifar = compose_cfg("data=cifar100_lt")
    assert cifar.trainer.max_epochs == 200 and list(cifar.optim.milestones) == [120, 160]
    assert cifar.optim.decay_factor == 0.01 and cifar.data.batch_size == 128
    assert compose_cfg("data=cifar100_lt", "trainer.max_epochs=7").trainer.max_epochs == 7


# ------------------------------------------------------------------ the schedule has one owner: the optim group
# The papers' schedules, written from the papers and official codes quoted in conf/recipe/ and conf/optim/.
SGD = {"momentum": 0.9, "nesterov": False, "warmup_start_factor": 0.0, "warmup_per_step": True, "min_lr": 0.0}
# BBN section 5.2 (and the two-head paper's CIFAR / Tiny-ImageNet recipe): 200 epochs, lr 0.1, weight decay 2e-4,
# 5 linear warm-up epochs, lr x0.01 at epochs 120 and 160.
CIFAR = {**SGD, "lr": 0.1, "weight_decay": 2e-4, "warmup_epochs": 5, "schedule": "multistep",
         "milestones": [120, 160], "decay_factor": 0.01, "max_epochs": 200}
# BBN's iNaturalist steps for the large datasets: 90 epochs, lr 0.1, weight decay 1e-4, x0.1 at 60 and 80.
LARGE = {**SGD, "lr": 0.1, "weight_decay": 1e-4, "warmup_epochs": 5, "schedule": "multistep",
         "milestones": [60, 80], "decay_factor": 0.1, "max_epochs": 90}
# BBN's official iNaturalist configs: lr 0.05 (batch 128), weight decay 1e-4, Nesterov, no warm-up, x0.1 at 60, 80.
INAT = {**LARGE, "lr": 0.05, "nesterov": True, "warmup_epochs": 0}
# ltlib's short schedule for the embedded digits: 30 epochs, lr 0.05, 3 warm-up epochs, x0.1 at 20 and 25.
DIGITS = {**CIFAR, "lr": 0.05, "warmup_epochs": 3, "milestones": [20, 25], "decay_factor": 0.1, "max_epochs": 30}
DATA_SCHEDULES = {"digits_lt": DIGITS, "cifar10_lt": CIFAR, "cifar100_lt": CIFAR, "folder": CIFAR,
                  "tiny_imagenet_lt": CIFAR, "imagenet_lt": LARGE, "places_lt": LARGE, "filelist": LARGE,
                  "inat2017": INAT, "inat2018": INAT}
# optim=sgd_cosine as conf/optim/sgd_cosine.yaml states it (two-head ImageNet-LT: lr 0.2, weight decay 5e-4, cosine).
SGD_COSINE = {**SGD, "lr": 0.2, "weight_decay": 5e-4, "warmup_epochs": 5, "schedule": "cosine", "milestones": [],
              "decay_factor": 0.1}


def schedule_of(cfg) -> dict:
    return {**OmegaConf.to_container(cfg.optim, resolve=True), "max_epochs": cfg.trainer.max_epochs}


def test_data_schedules_cover_every_data_config():
    assert sorted(DATA_SCHEDULES) == group_options("data")


@pytest.mark.parametrize("data", group_options("data"))
def test_each_data_config_alone_trains_with_its_papers_schedule(data):
    cfg = compose_cfg(f"data={data}")
    assert schedule_of(cfg) == DATA_SCHEDULES[data]
    choices = cfg.hydra.runtime.choices
    assert choices["optim"] == choices["recipe@_global_"]  # the recipe selects the optim option of its name


@pytest.mark.parametrize("data", group_options("data"))
def test_a_schedule_chosen_on_the_command_line_is_the_schedule_that_runs(data):
    """optim=<name> replaces the whole optimiser (nothing later re-sets optim.*); the epochs stay the recipe's."""
    assert OmegaConf.to_container(OmegaConf.load(CONF / "optim" / "sgd_cosine.yaml")) == {
        k: v for k, v in SGD_COSINE.items() if k != "max_epochs"}
    cfg = compose_cfg(f"data={data}", "optim=sgd_cosine")
    assert schedule_of(cfg) == {**SGD_COSINE, "max_epochs": DATA_SCHEDULES[data]["max_epochs"]}
    assert cfg.optim.schedule == "cosine"
    assert compose_cfg(f"data={data}", "optim=sgd_cosine", "optim.lr=0.05").optim.lr == 0.05


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_preset_runs_a_schedule_chosen_on_the_command_line(experiment):
    preset = compose_cfg(f"experiment={experiment}")
    cfg = compose_cfg(f"experiment={experiment}", "optim=sgd_cosine")
    assert schedule_of(cfg) == {**SGD_COSINE, "max_epochs": preset.trainer.max_epochs}
    assert cfg.hydra.runtime.choices["data"] == preset.hydra.runtime.choices["data"]


def test_a_preset_optim_option_wins_over_the_data_recipe_and_a_recipe_brings_its_epochs():
    # BBN's official CIFAR code with CIFAR-100-LT (the preset's documented data override)
    official = compose_cfg("experiment=bbn_cifar_official", "data=cifar100_lt")
    assert schedule_of(official) == {**CIFAR, "nesterov": True, "warmup_start_factor": 1 / 3,
                                     "warmup_per_step": False, "milestones": [119, 159]}
    # FBL's presets keep FBL's recipe over the data's (fbl_table2 sweeps data=cifar100_lt)
    fbl = schedule_of(compose_cfg("experiment=fbl_table2", "data=cifar100_lt"))
    assert fbl == {**CIFAR, "warmup_per_step": False, "milestones": [160, 180]}
    # recipe@_global_=<name> switches the epochs and the default optimiser together; optim= still wins
    large = compose_cfg("data=imagenet_lt", "recipe@_global_=fbl_large")
    assert large.trainer.max_epochs == 180 and large.optim.lr == 0.2 and list(large.optim.milestones) == [120, 160]
    cosine = compose_cfg("data=imagenet_lt", "recipe@_global_=fbl_large", "optim=sgd_cosine")
    assert cosine.trainer.max_epochs == 180 and schedule_of(cosine) == {**SGD_COSINE, "max_epochs": 180}


def test_only_the_optim_group_sets_optim_keys_and_data_configs_do_not_restate_their_base():
    """One owner per key: no recipe, data config or preset writes optim.* (they select an optim option), and no
    data config restates a key of conf/data_common.yaml."""
    for group in ("recipe", "data", "experiment"):
        for path in sorted((CONF / group).glob("*.yaml")):
            assert "optim" not in OmegaConf.load(path), path.name
    common = set(OmegaConf.load(CONF / "data_common.yaml"))
    for path in sorted((CONF / "data").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        assert not common & set(cfg), (path.name, sorted(common & set(cfg)))
        assert "/data_common@_here_" in cfg.defaults, path.name
    assert "data_common" not in group_options("data")


@pytest.mark.parametrize("experiment,data", [
    ("bbn_inat", "inat2018"), ("bbn_inat_2x", "inat2018"), ("fbl_table3_imagenet_lt", "imagenet_lt"),
    ("fbl_table3_inat2018", "inat2018"), ("fbl_table3_places_lt", "places_lt"),
    ("two_head_table3_imagenet_lt", "imagenet_lt"), ("two_head_full_table3_imagenet_lt", "imagenet_lt")])
def test_large_dataset_presets_use_the_dataset_config_and_its_full_training_list(experiment, data):
    """Only the image root is left to give; no training image is held out for validation, which comes from
    the dataset's own validation list (ImageNet-LT, Places-LT) or does not exist (iNaturalist)."""
    cfg = compose_cfg(f"experiment={experiment}", "data.root=/tmp/x")
    assert cfg.hydra.runtime.choices["data"] == data and cfg.data.name == data
    OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)
    assert cfg.data.val_fraction == 0 and cfg.data.val_per_class is None and cfg.data.imbalance_ratio is None
    val_list = {"imagenet_lt": "ImageNet_LT_val.txt", "places_lt": "Places_LT_val.txt"}.get(data)
    assert cfg.data.source.get("val_list") == val_list


def test_filelist_holds_nothing_out_unless_asked():
    cfg = compose_cfg("data=filelist")
    assert cfg.data.val_fraction == 0 and cfg.data.source.val_list is None


@pytest.mark.parametrize("backbone", group_options("backbone"))
def test_every_backbone_config_names_a_registered_backbone(backbone):
    from ltlib.backbones import list_backbones

    assert compose_cfg(f"backbone={backbone}").backbone.name in list_backbones()


def test_configs_are_packaged_in_the_wheel(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(repo), "--no-deps", "-q", "-w", str(tmp_path)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("ltlib-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(repo / "conf").as_posix() for p in (repo / "conf").rglob("*.yaml")}
    assert {f"ltlib/conf/{name}" for name in shipped} <= names
    assert "ltlib/run.py" in names
    # The installed wheel runs from anywhere: configs come from inside the package, not the checkout.
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}
    where = subprocess.run([sys.executable, "-c", "import ltlib.run as r, ltlib.config as c; print(r.__file__); print(c.config_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in where), where
    proc = subprocess.run([sys.executable, "-m", "ltlib.run", "trainer.max_epochs=1", "backbone=resnet20",
                           "hydra.run.dir=run"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (elsewhere / "run" / "results.json").is_file()
