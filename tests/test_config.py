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

from ltlib.run import config_dir

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
    where = subprocess.run([sys.executable, "-c", "import ltlib.run as r; print(r.__file__); print(r.config_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in where), where
    proc = subprocess.run([sys.executable, "-m", "ltlib.run", "trainer.max_epochs=1", "backbone=resnet20",
                           "hydra.run.dir=run"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (elsewhere / "run" / "results.json").is_file()
