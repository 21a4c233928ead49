"""ImageNet-LT, Places-LT and iNaturalist 2017/2018 from their official split files, on small fake trees in
the same layouts: the data configs, the JSON loader, one-line errors and the ``ltlib.check`` command."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from ltlib.check import main as check_main
from ltlib.config import config_dir
from ltlib.data.check import check_data
from ltlib.data.pools import inaturalist_pools
from ltlib.errors import LtlibError


def _jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.RandomState(seed).randint(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def imagenet_lt_tree(root: Path, train_counts=(5, 3, 1), test_per_class: int = 2, val_per_class: int = 2) -> Path:
    """ImageNet-LT layout: train/<wnid>/<wnid>_<n>.JPEG, val/<wnid>/ILSVRC2012_val_<n>.JPEG and the three
    official lists ("relative/path label" per line) under root; the validation list's images are other
    images of the ImageNet training folders."""
    wnids = [f"n0{1440764 + k}" for k in range(len(train_counts))]
    train_lines, val_lines, test_lines = [], [], []
    for label, (wnid, count) in enumerate(zip(wnids, train_counts, strict=True)):
        for i in range(count):
            rel = f"train/{wnid}/{wnid}_{i}.JPEG"
            _jpeg(root / rel, seed=100 * label + i)
            train_lines.append(f"{rel} {label}")
        for i in range(val_per_class):
            rel = f"train/{wnid}/{wnid}_{1000 + i}.JPEG"
            _jpeg(root / rel, seed=5_000 + 100 * label + i)
            val_lines.append(f"{rel} {label}")
        for i in range(test_per_class):
            rel = f"val/{wnid}/ILSVRC2012_val_{label * test_per_class + i:08d}.JPEG"
            _jpeg(root / rel, seed=10_000 + 100 * label + i)
            test_lines.append(f"{rel} {label}")
    (root / "ImageNet_LT_train.txt").write_text("\n".join(train_lines) + "\n")
    (root / "ImageNet_LT_val.txt").write_text("\n".join(val_lines) + "\n")
    (root / "ImageNet_LT_test.txt").write_text("\n".join(test_lines) + "\n")
    return root


def places_lt_tree(root: Path) -> Path:
    """Places-LT layout: data_256/<letter>/<scene>/<n>.jpg, val_256/Places365_val_<n>.jpg, the three lists
    (one validation image per class, from data_256)."""
    scenes = ["a/airfield", "b/bakery/shop", "c/canyon"]
    train_lines, val_lines, test_lines = [], [], []
    for label, (scene, count) in enumerate(zip(scenes, (4, 2, 1), strict=True)):
        for i in range(count):
            rel = f"data_256/{scene}/{i + 1:08d}.jpg"
            _jpeg(root / rel, seed=label * 10 + i)
            train_lines.append(f"{rel} {label}")
        rel = f"data_256/{scene}/{900:08d}.jpg"
        _jpeg(root / rel, seed=700 + label)
        val_lines.append(f"{rel} {label}")
        rel = f"val_256/Places365_val_{label + 1:08d}.jpg"
        _jpeg(root / rel, seed=500 + label)
        test_lines.append(f"{rel} {label}")
    (root / "Places_LT_train.txt").write_text("\n".join(train_lines) + "\n")
    (root / "Places_LT_val.txt").write_text("\n".join(val_lines) + "\n")
    (root / "Places_LT_test.txt").write_text("\n".join(test_lines) + "\n")
    return root


def inat_tree(root: Path, year: int = 2018, category_ids=(2, 0, 1), train_counts=(1, 4, 2)) -> Path:
    """The official iNaturalist layout: images under train_val<year>/<supercategory>/<category>/ and
    COCO-style train<year>.json / val<year>.json (categories listed out of id order on purpose)."""
    folder = "train_val2018" if year == 2018 else "train_val_images"
    categories = [{"id": cid, "name": f"species {cid}", "supercategory": "Plantae"} for cid in category_ids]
    for split, counts in (("train", train_counts), ("val", (1,) * len(category_ids))):
        images, annotations = [], []
        for cid, count in zip(category_ids, counts, strict=True):
            for _ in range(count):
                image_id = len(images) + (0 if split == "train" else 1000)
                file_name = f"{folder}/Plantae/{cid}/{split}_{image_id}.jpg"
                _jpeg(root / file_name, seed=image_id)
                images.append({"id": image_id, "file_name": file_name, "width": 12, "height": 10})
                annotations.append({"id": image_id, "image_id": image_id, "category_id": cid})
        payload = {"info": {"year": year}, "images": images, "annotations": annotations, "categories": categories}
        (root / f"{split}{year}.json").write_text(json.dumps(payload))
    return root


def datamodule(*overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        config = compose("config", overrides=[*overrides, "data.image_size=16", "data.num_workers=0"])
    module = instantiate(config.data)
    module.setup("fit")
    return module


# ------------------------------------------------------------------------------------------------------
# The data configs on the official layouts


def test_imagenet_lt_config_reads_the_official_lists(tmp_path):
    root = imagenet_lt_tree(tmp_path / "imagenet")
    module = datamodule("data=imagenet_lt", f"data.root={root}")
    info = module.split_info
    assert module.class_counts == [5, 3, 1] and module.num_classes == 3
    assert (info["train"]["size"], info["val"]["size"], info["test"]["size"]) == (9, 6, 6)
    assert info["val"]["class_counts"] == [2, 2, 2] and str(root / "ImageNet_LT_val.txt") in info["val"]["source"]
    assert module.val_dataset.pool.paths[0] == os.path.join(str(root), "train/n01440764/n01440764_1000.JPEG")
    assert module.train_dataset.pool.paths[0] == os.path.join(str(root), "train/n01440764/n01440764_0.JPEG")
    images, targets = next(iter(module.train_dataloader()))
    assert tuple(images.shape[1:]) == (3, 16, 16) and targets.dtype.is_floating_point is False


def test_places_lt_config_reads_the_official_lists(tmp_path):
    root = places_lt_tree(tmp_path / "places")
    module = datamodule("data=places_lt", f"data.root={root}")
    assert module.class_counts == [4, 2, 1]
    assert module.split_info["test"]["size"] == 3 and module.split_info["val"]["class_counts"] == [1, 1, 1]
    assert module.test_dataset.pool.paths[1].endswith("val_256/Places365_val_00000002.jpg")


@pytest.mark.parametrize("year", [2017, 2018])
def test_inaturalist_configs_read_the_official_json(tmp_path, year):
    root = inat_tree(tmp_path / f"inat{year}", year=year, category_ids=(7, 3, 5), train_counts=(1, 4, 2))
    module = datamodule(f"data=inat{year}", f"data.root={root}")
    # labels number the categories in id order: 3 -> 0, 5 -> 1, 7 -> 2
    assert module.class_names == ["species 3", "species 5", "species 7"]
    assert module.class_counts == [4, 2, 1]
    assert module.split_info["val"]["size"] == 0 and module.split_info["test"]["size"] == 3
    folder = "train_val2018" if year == 2018 else "train_val_images"
    assert all(f"/{folder}/Plantae/" in p for p in module.train_dataset.pool.paths)
    images, _ = module.test_dataset[0]
    assert tuple(images.shape) == (3, 16, 16)


def test_inaturalist_official_ids_are_the_labels(tmp_path):
    root = inat_tree(tmp_path, category_ids=(2, 0, 1), train_counts=(1, 4, 2))
    train, test = inaturalist_pools(str(root), "train2018.json", str(root / "val2018.json"))
    for pool in (train, test):
        labels_by_folder = {int(Path(p).parent.name): int(t) for p, t in zip(pool.paths, pool.targets, strict=True)}
        assert labels_by_folder == {0: 0, 1: 1, 2: 2}
    assert train.class_counts() == [4, 2, 1]


# ------------------------------------------------------------------------------------------------------
# One-line errors


def _mutate(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


JSON_FAULTS = {
    "not JSON": (lambda p: p.write_text('{"images": [}'), r"train2018.json: not valid JSON \(line 1, column 13"),
    "no annotations": (lambda p: _mutate(p, lambda d: d.pop("annotations")), r"missing the 'annotations' list"),
    "unknown image": (lambda p: _mutate(p, lambda d: d["annotations"][0].update(image_id=999)),
                      r"annotation #0 refers to image id 999, which is not in 'images'"),
    "unknown category": (lambda p: _mutate(p, lambda d: d["annotations"][1].update(category_id=42)),
                         r"annotation #1 has category_id 42, which is not a category"),
    "two labels": (lambda p: _mutate(p, lambda d: d["annotations"].append(dict(d["annotations"][0]))),
                   r"image id 0 has more than one annotation"),
    "unlabelled image": (lambda p: _mutate(p, lambda d: d["annotations"].pop()),
                         r"1 image\(s\) without an annotation \(e.g. image id 6"),
    "duplicate image": (lambda p: _mutate(p, lambda d: d["images"].append(dict(d["images"][0]))),
                        r"image id 0 appears twice"),
    "empty category": (lambda p: _mutate(p, lambda d: d["categories"].append({"id": 9, "name": "rare"})),
                       r"category id 9 \(rare\) has no training images"),
    "bad file name": (lambda p: _mutate(p, lambda d: d["images"][2].update(file_name=None)),
                      r"image #2 has no valid 'file_name'"),
}


@pytest.mark.parametrize("fault", sorted(JSON_FAULTS))
def test_broken_inaturalist_json_is_a_one_line_error(tmp_path, fault):
    root = inat_tree(tmp_path)
    corrupt, expected = JSON_FAULTS[fault]
    corrupt(root / "train2018.json")
    with pytest.raises(LtlibError, match=expected) as caught:
        inaturalist_pools(str(root), "train2018.json", "val2018.json")
    assert "\n" not in str(caught.value)


def test_missing_annotation_file_is_a_one_line_error(tmp_path):
    root = inat_tree(tmp_path)
    (root / "val2018.json").unlink()
    with pytest.raises(LtlibError, match=r"annotation file val2018.json not found \(looked as given and under"):
        inaturalist_pools(str(root), "train2018.json", "val2018.json")


def test_missing_and_corrupt_images_fail_with_their_path(tmp_path):
    root = imagenet_lt_tree(tmp_path)
    missing = root / "train/n01440765/n01440765_0.JPEG"
    missing.unlink()
    corrupt = root / "val/n01440764/ILSVRC2012_val_00000000.JPEG"
    corrupt.write_bytes(b"not a JPEG at all")
    module = datamodule("data=imagenet_lt", f"data.root={root}")
    position = module.train_dataset.pool.paths.index(str(missing))
    with pytest.raises(LtlibError, match=rf"cannot read image {missing}: .*No such file") as caught:
        module.train_dataset.pool.load(position)
    assert "\n" not in str(caught.value)
    with pytest.raises(LtlibError, match=rf"cannot read image {corrupt}: cannot identify image file"):
        module.test_dataset[0]


# ------------------------------------------------------------------------------------------------------
# python -m ltlib.check


def test_check_reports_missing_unreadable_and_truncated_files(tmp_path):
    root = inat_tree(tmp_path, train_counts=(1, 4, 2))
    paths = {p.name: p for p in root.rglob("*.jpg")}
    (paths.pop("train_0.jpg")).unlink()
    paths.pop("train_1.jpg").write_bytes(b"\x00" * 64)
    buffer = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    paths.pop("val_1000.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])  # truncated

    report = check_data(["data=inat2018", f"data.root={root}"], workers=2)
    found = {(p.split, Path(p.path).name, p.kind) for p in report.problems}
    assert found == {("train", "train_0.jpg", "missing"), ("train", "train_1.jpg", "unreadable"),
                     ("test", "val_1000.jpg", "unreadable")}
    assert report.counts == {"train": 7, "val": 0, "test": 3} and not report.ok
    # --quick reads headers only: the truncated file passes, the others do not.
    quick = check_data(["data=inat2018", f"data.root={root}"], quick=True, workers=2)
    assert {Path(p.path).name for p in quick.problems} == {"train_0.jpg", "train_1.jpg"}

    lines = report.lines(show=2)
    assert lines[1].split() == ["train", "7", "images", "1", "missing,", "1", "unreadable"]
    assert lines[-2] == "  ... and 1 more"
    assert lines[-1].startswith("ltlib.check: 3 of 10 image files cannot be used (1 missing, 2 unreadable)")


def test_check_command_exit_status_and_one_line_errors(tmp_path, capsys):
    root = imagenet_lt_tree(tmp_path / "imagenet")
    assert check_main(["data=imagenet_lt", f"data.root={root}", "--workers=2"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("ltlib.check: all 21 image files can be read")

    lines = (root / "ImageNet_LT_train.txt").read_text().splitlines()
    lines[2] = "train/n01440764/n01440764_2.JPEG three"
    (root / "ImageNet_LT_train.txt").write_text("\n".join(lines) + "\n")
    for args, expected in (
        (["data=imagenet_lt", f"data.root={root}"], "ImageNet_LT_train.txt:3: malformed line"),
        (["data=imagenet_lt"], "data.root is missing (???)"),
        (["data=imagenet_lt", f"data.root={tmp_path / 'nowhere'}"], "file list ImageNet_LT_train.txt not found"),
        (["data=imagenet_l"], "Could not find 'data/imagenet_l'"),
    ):
        assert check_main(args) == 2
        errors = capsys.readouterr().err.splitlines()
        assert len(errors) == 1 and errors[0].startswith("ltlib.check: error:") and expected in errors[0], errors


def test_check_command_exits_1_on_bad_files(tmp_path, capsys):
    root = places_lt_tree(tmp_path / "places")
    (root / "val_256/Places365_val_00000002.jpg").unlink()
    assert check_main(["data=places_lt", f"data.root={root}"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"ltlib.check: data places_lt, root {root}"
    assert out[3].split() == ["test", "3", "images", "1", "missing,", "0", "unreadable"]
    assert "val_256/Places365_val_00000002.jpg (test): no such file" in out[4]
    assert out[-1].startswith("ltlib.check: 1 of 13 image files cannot be used (1 missing, 0 unreadable)")
