"""The large-dataset presets train on the papers' full training lists: every image of the training list is
trained on (no validation hold-out), validation comes from the dataset's own validation list where it has
one (ImageNet-LT, Places-LT) and there is none for iNaturalist (its validation set is the test set).

Counts are taken from the list files with ``collections.Counter``, independently of ltlib. Under the old
behaviour (``data=filelist`` without ``val_fraction``: 10% of each class held out of the training list) a
class of 5 trains on 4 images and a class of 2 on 1, so every count check here fails.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from ltlib.config import config_dir
from ltlib.data.check import check_data
from ltlib.errors import LtlibError

TRAIN_COUNTS = (5, 2, 5, 2)  # classes of 5 and of 2 training images
VAL_PER_CLASS = 2
TEST_PER_CLASS = 1


def _jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(path, "JPEG")


def _write_list(path: Path, entries: list[tuple[str, int]]) -> None:
    path.write_text("".join(f"{rel} {label}\n" for rel, label in entries))


def _list_tree(root: Path, prefix: str, train_dir: str, test_dir: str, val: bool = True) -> Path:
    """``<prefix>_train.txt``, ``_val.txt`` (images from the training folders, as in the OLTR release) and
    ``_test.txt`` under ``root``, with the images they name."""
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for label, count in enumerate(TRAIN_COUNTS):
        for i in range(count):
            splits["train"].append((f"{train_dir}/c{label}/{i:04d}.jpg", label))
        for i in range(VAL_PER_CLASS if val else 0):
            splits["val"].append((f"{train_dir}/c{label}/{900 + i:04d}.jpg", label))
        for i in range(TEST_PER_CLASS):
            splits["test"].append((f"{test_dir}/c{label}_{i:04d}.jpg", label))
    for s, (split, entries) in enumerate(splits.items()):
        for k, (rel, _) in enumerate(entries):
            _jpeg(root / rel, seed=1000 * s + k)
        if entries:
            _write_list(root / f"{prefix}_{split}.txt", entries)
    return root


def imagenet_lt(root: Path) -> Path:
    return _list_tree(root, "ImageNet_LT", "train", "val")


def places_lt(root: Path) -> Path:
    return _list_tree(root, "Places_LT", "data_256/a", "val_256")


def inaturalist(root: Path, year: int) -> Path:
    """train<year>.json / val<year>.json with classes of 5 and 2 training images (official layout)."""
    folder = "train_val2018" if year == 2018 else "train_val_images"
    categories = [{"id": c, "name": f"species {c}"} for c in range(len(TRAIN_COUNTS))]
    for split, counts in (("train", TRAIN_COUNTS), ("val", (3,) * len(TRAIN_COUNTS))):
        images, annotations = [], []
        for c, count in enumerate(counts):
            for _ in range(count):
                image_id = len(images) + (0 if split == "train" else 10_000)
                name = f"{folder}/Plantae/{c}/{split}_{image_id}.jpg"
                _jpeg(root / name, seed=image_id)
                images.append({"id": image_id, "file_name": name})
                annotations.append({"id": image_id, "image_id": image_id, "category_id": c})
        (root / f"{split}{year}.json").write_text(json.dumps(
            {"images": images, "annotations": annotations, "categories": categories}))
    return root


def list_counts(path: Path) -> tuple[list[int], set[str]]:
    """Images per label and the image paths of a list file, read without ltlib."""
    lines = [line.rsplit(maxsplit=1) for line in path.read_text().splitlines() if line.strip()]
    counts = Counter(int(label) for _, label in lines)
    return [counts[c] for c in range(max(counts) + 1)], {rel for rel, _ in lines}


def json_counts(path: Path) -> list[int]:
    counts = Counter(a["category_id"] for a in json.loads(path.read_text())["annotations"])
    return [counts[c] for c in sorted(counts)]


def setup_datamodule(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "data.image_size=16", "data.num_workers=0",
                                                   "++data.pin_memory=false"])
    module = instantiate(cfg.data)
    module.setup("fit")
    return cfg, module


def relative_paths(pool, indices, root: Path) -> set[str]:
    return {str(Path(pool.paths[int(i)]).relative_to(root)) for i in indices}


LIST_PRESETS = [
    ("fbl_table3_imagenet_lt", imagenet_lt, "ImageNet_LT"),
    ("two_head_table3_imagenet_lt", imagenet_lt, "ImageNet_LT"),
    ("two_head_full_table3_imagenet_lt", imagenet_lt, "ImageNet_LT"),
    ("fbl_table3_places_lt", places_lt, "Places_LT"),
]


@pytest.mark.parametrize("experiment,make_tree,prefix", LIST_PRESETS)
def test_list_presets_train_on_the_whole_train_list_and_validate_on_the_val_list(tmp_path, experiment,
                                                                                  make_tree, prefix):
    root = make_tree(tmp_path / "data")
    cfg, module = setup_datamodule(f"experiment={experiment}", f"data.root={root}")
    assert cfg.data.val_fraction == 0 and cfg.data.source.val_list == f"{prefix}_val.txt"
    train_counts, train_paths = list_counts(root / f"{prefix}_train.txt")
    val_counts, val_paths = list_counts(root / f"{prefix}_val.txt")
    test_counts, _ = list_counts(root / f"{prefix}_test.txt")
    assert train_counts == [5, 2, 5, 2] and val_counts == [2, 2, 2, 2]  # the fixture itself

    info = module.split_info
    assert module.class_counts == train_counts and info["train"]["class_counts"] == train_counts
    assert info["train"]["size"] == sum(train_counts) and "held out" not in info["train"]["source"]
    assert relative_paths(module.train_dataset.pool, module.train_indices, root) == train_paths
    assert info["val"]["size"] == sum(val_counts) and info["val"]["class_counts"] == val_counts
    assert str(root / f"{prefix}_val.txt") in info["val"]["source"]
    assert relative_paths(module.val_pool, module.val_indices, root) == val_paths
    assert len(module.val_dataset) == sum(val_counts) and module.val_dataset.pool is module.val_pool
    assert not val_paths & train_paths
    assert info["test"]["class_counts"] == test_counts
    # the validation loader reads the list's images
    images, targets = next(iter(module.val_dataloader()))
    assert tuple(images.shape[1:]) == (3, 16, 16) and sorted(targets.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("experiment,data", [("bbn_inat", None), ("bbn_inat", "inat2017"), ("bbn_inat_2x", None),
                                             ("fbl_table3_inat2018", None)])
def test_inaturalist_presets_train_on_every_training_image_without_validation(tmp_path, experiment, data):
    year = 2017 if data == "inat2017" else 2018
    root = inaturalist(tmp_path / "inat", year)
    cfg, module = setup_datamodule(f"experiment={experiment}", *([f"data={data}"] if data else []),
                                   f"data.root={root}")
    assert cfg.data.name == f"inat{year}"
    train_counts = json_counts(root / f"train{year}.json")
    assert train_counts == [5, 2, 5, 2]
    info = module.split_info
    assert module.class_counts == train_counts and info["train"]["size"] == sum(train_counts)
    assert info["val"]["size"] == 0 and info["val"]["class_counts"] == [0] * 4 and info["val"]["source"] == "none"
    # the official validation file is the test set, never validation
    assert info["test"]["class_counts"] == json_counts(root / f"val{year}.json")
    assert f"val{year}.json" in info["test"]["source"]


def test_filelist_uses_the_whole_train_list_by_default(tmp_path):
    """The old default (no val_fraction in data=filelist: 10% of each class held out) fails here."""
    root = imagenet_lt(tmp_path / "data")
    common = ["data=filelist", f"data.root={root}", "data.source.train_list=ImageNet_LT_train.txt",
              "data.source.test_list=ImageNet_LT_test.txt"]
    train_counts, _ = list_counts(root / "ImageNet_LT_train.txt")
    _, module = setup_datamodule(*common)
    assert module.class_counts == train_counts and module.split_info["val"]["size"] == 0
    # a validation list of one's own
    _, module = setup_datamodule(*common, "data.source.val_list=ImageNet_LT_val.txt")
    assert module.class_counts == train_counts
    assert module.split_info["val"]["class_counts"] == list_counts(root / "ImageNet_LT_val.txt")[0]
    # or a hold-out of the training list, as asked
    _, module = setup_datamodule(*common, "data.val_fraction=0.5")
    assert module.class_counts == [3, 1, 3, 1] and module.split_info["val"]["class_counts"] == [2, 1, 2, 1]


def test_val_list_and_hold_out_exclude_each_other(tmp_path):
    root = imagenet_lt(tmp_path / "data")
    for option in ("data.val_fraction=0.1", "data.val_per_class=1"):
        with pytest.raises(LtlibError, match=r"holds validation images out of the training pool, but the source has "
                                             r"its own validation split .*data.source.val_list=null") as caught:
            setup_datamodule("data=imagenet_lt", f"data.root={root}", option)
        assert "\n" not in str(caught.value)
    # no validation split at all: val_per_class=0, or no list
    for option in ("data.val_per_class=0", "data.source.val_list=null"):
        _, module = setup_datamodule("data=imagenet_lt", f"data.root={root}", option)
        assert module.split_info["val"]["size"] == 0 and module.class_counts == [5, 2, 5, 2]
    # the val list's labels are checked like the others
    (root / "ImageNet_LT_val.txt").write_text("train/c0/0900.jpg 7\n")
    with pytest.raises(LtlibError, match=r"ImageNet_LT_val.txt:1: label 7 is out of range"):
        setup_datamodule("data=imagenet_lt", f"data.root={root}", "+data.source.class_names=[a,b,c,d]")


def test_check_reads_the_val_list_images(tmp_path):
    root = imagenet_lt(tmp_path / "data")
    (root / "train/c1/0901.jpg").unlink()  # an image of the validation list only
    report = check_data(["data=imagenet_lt", f"data.root={root}"], workers=2)
    assert report.counts == {"train": 14, "val": 8, "test": 4}
    assert [(p.split, Path(p.path).relative_to(root).as_posix(), p.kind) for p in report.problems] == [
        ("val", "train/c1/0901.jpg", "missing")]


@pytest.mark.slow
def test_cli_run_on_imagenet_lt_records_the_val_list_split(tmp_path):
    from tests.conftest import run_cli

    root = imagenet_lt(tmp_path / "data")
    run_dir = tmp_path / "run"
    proc = run_cli("experiment=two_head_table3_imagenet_lt", "method=ce", f"data.root={root}", "backbone=resnet20",
                   "trainer.max_epochs=1", "optim.warmup_epochs=0", "data.image_size=16", "data.batch_size=4",
                   "data.num_workers=0", "data.pin_memory=false", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    splits = results["splits"]
    assert splits["train"]["class_counts"] == list_counts(root / "ImageNet_LT_train.txt")[0]
    assert splits["val"]["size"] == 8 and splits["val"]["class_counts"] == [2, 2, 2, 2]
    assert str(root / "ImageNet_LT_val.txt") in splits["val"]["source"]
    assert splits["test"]["size"] == 4
    assert results["metrics"]["val"]["num_samples"] == 8
    assert results["selected_on"].endswith("on the validation split") and results["checkpoint"] == "checkpoints/best.ckpt"


@pytest.mark.slow
def test_cli_run_without_validation_split_evaluates_the_last_epoch(tmp_path):
    """iNaturalist has no validation split: with the default monitor and eval_checkpoint=best the run
    evaluates the last checkpoint on the test set and says so in results.json."""
    from tests.conftest import run_cli

    root = inaturalist(tmp_path / "inat", 2018)
    run_dir = tmp_path / "run"
    proc = run_cli("experiment=bbn_inat", f"data.root={root}", "backbone=resnet10", "trainer.max_epochs=1",
                   "data.image_size=16", "data.batch_size=4", "data.num_workers=0", "data.pin_memory=false",
                   "eval_checkpoint=best", "monitor=val/mean_class_acc", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["splits"]["val"]["size"] == 0 and results["splits"]["train"]["class_counts"] == [5, 2, 5, 2]
    assert results["selected_on"] == "last epoch (no validation split)" and set(results["metrics"]) == {"test"}
    assert results["checkpoint"] == "checkpoints/last.ckpt" and not (run_dir / "checkpoints" / "best.ckpt").exists()
    assert results["metrics"]["test"]["num_samples"] == 12
