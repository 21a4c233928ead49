"""Image pools: in-memory arrays, image folders, file lists, the digits and CIFAR through torchvision."""

from __future__ import annotations

import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets.cifar as tv_cifar
from PIL import Image

from ltlib.data import ArrayPool, cifar_pools, digits_pools, file_list_pools, image_folder_pools
from ltlib.errors import LtlibError


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------
# ArrayPool


def test_array_pool_rgb_and_grayscale() -> None:
    rgb = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    pool = ArrayPool(rgb, [1, 0], ["a", "b"], tag="toy")
    assert len(pool) == 2 and pool.in_chans == 3 and pool.class_counts() == [1, 1]
    assert pool.targets.dtype == np.int64
    image = pool.load(1)
    assert image.mode == "RGB" and image.size == (4, 4)
    np.testing.assert_array_equal(np.asarray(image), rgb[1])
    assert pool.describe(1) == "toy #1"

    gray = ArrayPool(np.full((3, 5, 5, 1), 7, dtype=np.uint8), [0, 0, 2], ["a", "b", "c"])
    assert gray.in_chans == 1 and gray.class_counts() == [2, 0, 1]
    assert gray.load(2).mode == "L" and np.asarray(gray.load(2)).max() == 7


def test_array_pool_rejects_bad_arrays() -> None:
    with pytest.raises(LtlibError, match="uint8"):
        ArrayPool(np.zeros((2, 4, 4, 3), dtype=np.float32), [0, 1], ["a", "b"])
    with pytest.raises(LtlibError, match="shape"):
        ArrayPool(np.zeros((2, 4, 4, 2), dtype=np.uint8), [0, 1], ["a", "b"])
    with pytest.raises(LtlibError, match="2 images but 3 targets"):
        ArrayPool(np.zeros((2, 4, 4), dtype=np.uint8), [0, 1, 1], ["a", "b"])
    with pytest.raises(LtlibError, match="allowed labels: 0..1"):
        ArrayPool(np.zeros((2, 4, 4), dtype=np.uint8), [0, 2], ["a", "b"])


# ---------------------------------------------------------------------------------------------------
# Image folders


def save_image(path: Path, color: tuple[int, int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (6, 6), color)
    (image.convert(mode) if mode != "RGB" else image).save(path)


@pytest.fixture
def folder_tree(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    save_image(root / "train" / "zebra" / "b.png", (0, 0, 200))
    save_image(root / "train" / "zebra" / "a.JPG", (200, 0, 0))
    save_image(root / "train" / "zebra" / "c.jpeg", (0, 200, 0), mode="L")
    (root / "train" / "zebra" / "notes.txt").write_text("not an image")
    save_image(root / "train" / "ant" / "x.bmp", (10, 20, 30))
    save_image(root / "test" / "ant" / "t.webp", (1, 2, 3))
    save_image(root / "test" / "zebra" / "t.png", (4, 5, 6))
    return root


def test_image_folder_layout_order_and_loading(folder_tree: Path) -> None:
    train, test = image_folder_pools(str(folder_tree))
    assert train.class_names == ["ant", "zebra"] and test.class_names == ["ant", "zebra"]
    assert [Path(train.describe(i)).name for i in range(len(train))] == ["x.bmp", "a.JPG", "b.png", "c.jpeg"]
    np.testing.assert_array_equal(train.targets, [0, 1, 1, 1])
    assert test.class_counts() == [1, 1] and train.in_chans == 3
    assert train.describe(2) == str(folder_tree / "train" / "zebra" / "b.png")
    png = train.load(2)
    assert png.mode == "RGB" and png.size == (6, 6) and png.getpixel((0, 0)) == (0, 0, 200)
    assert train.load(3).mode == "RGB"  # a grayscale file is converted


def test_image_folder_errors(folder_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(LtlibError) as info:
        image_folder_pools(str(tmp_path / "nowhere"))
    assert "nowhere does not exist" in one_line_error(info)

    no_train = tmp_path / "no_train"
    save_image(no_train / "test" / "a" / "x.png", (0, 0, 0))
    with pytest.raises(LtlibError) as info:
        image_folder_pools(str(no_train))
    assert "missing train folder" in one_line_error(info)

    (folder_tree / "train" / "empty").mkdir()
    (folder_tree / "train" / "empty" / "readme.md").write_text("no images here")
    with pytest.raises(LtlibError) as info:
        image_folder_pools(str(folder_tree))
    assert "empty class 'empty' under" in one_line_error(info)
    (folder_tree / "train" / "empty" / "readme.md").unlink()
    (folder_tree / "train" / "empty").rmdir()

    save_image(folder_tree / "test" / "yak" / "y.png", (0, 0, 0))
    with pytest.raises(LtlibError) as info:
        image_folder_pools(str(folder_tree))
    assert "only in test ['yak']" in one_line_error(info)


def test_unreadable_image_raises_on_load_naming_the_file(folder_tree: Path) -> None:
    garbage = folder_tree / "train" / "ant" / "y.jpg"
    garbage.write_bytes(b"this is not a jpeg at all")
    train, _ = image_folder_pools(str(folder_tree))  # listing does not decode
    index = [train.describe(i) for i in range(len(train))].index(str(garbage))
    with pytest.raises(LtlibError) as info:
        train.load(index)
    assert f"cannot read image {garbage}" in one_line_error(info)


# ---------------------------------------------------------------------------------------------------
# File lists


@pytest.fixture
def list_root(tmp_path: Path) -> Path:
    save_image(tmp_path / "imgs" / "a.jpg", (255, 0, 0))
    save_image(tmp_path / "imgs" / "b.jpg", (0, 255, 0))
    save_image(tmp_path / "imgs" / "c.jpg", (0, 0, 255))
    (tmp_path / "train.txt").write_text("imgs/a.jpg 0\n\nimgs/b.jpg 2\nimgs/c.jpg 1\n   \n")
    (tmp_path / "test.txt").write_text("imgs/c.jpg 1\nimgs/a.jpg 0\n")
    return tmp_path


def test_file_list_pools(list_root: Path) -> None:
    train, test = file_list_pools(str(list_root), str(list_root / "train.txt"), "test.txt")  # 2nd: under root
    assert train.class_names == ["class_0", "class_1", "class_2"]
    np.testing.assert_array_equal(train.targets, [0, 2, 1])
    np.testing.assert_array_equal(test.targets, [1, 0])
    assert train.describe(1) == os.path.join(str(list_root), "imgs/b.jpg")
    assert train.load(1).getpixel((2, 2))[1] > 200  # the green image
    named, _ = file_list_pools(str(list_root), "train.txt", "test.txt", class_names=["x", "y", "z"])
    assert named.class_names == ["x", "y", "z"]


def test_file_list_errors(list_root: Path) -> None:
    (list_root / "bad.txt").write_text("imgs/a.jpg 0\nimgs/b.jpg\n")
    with pytest.raises(LtlibError) as info:
        file_list_pools(str(list_root), "bad.txt", "test.txt")
    message = one_line_error(info)
    assert "bad.txt:2" in message and "'imgs/b.jpg'" in message

    (list_root / "bad2.txt").write_text("imgs/a.jpg zero\n")
    with pytest.raises(LtlibError, match=r"bad2.txt:1: malformed line 'imgs/a.jpg zero'"):
        file_list_pools(str(list_root), "bad2.txt", "test.txt")

    with pytest.raises(LtlibError, match="file list missing.txt not found"):
        file_list_pools(str(list_root), "missing.txt", "test.txt")

    (list_root / "gap.txt").write_text("imgs/a.jpg 0\nimgs/b.jpg 2\n")
    with pytest.raises(LtlibError, match="class 1 .* has no training images"):
        file_list_pools(str(list_root), "gap.txt", "test.txt")

    with pytest.raises(LtlibError, match="label 2 is out of range"):
        file_list_pools(str(list_root), "train.txt", "test.txt", class_names=["x", "y"])


# ---------------------------------------------------------------------------------------------------
# Digits


def test_digits_pools_balanced_test_split() -> None:
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target)
    train, test = digits_pools(test_per_class=30, seed=1)
    assert test.class_counts() == [30] * 10
    assert train.class_counts() == (full - 30).tolist()
    assert train.in_chans == 1 and train.class_names == [str(c) for c in range(10)]
    assert train.images.dtype == np.uint8 and train.images.max() == 255 and train.images.min() == 0
    image = train.load(0)
    assert image.mode == "L" and image.size == (8, 8)
    again, _ = digits_pools(test_per_class=30, seed=1)
    np.testing.assert_array_equal(again.images, train.images)
    other, _ = digits_pools(test_per_class=30, seed=2)
    assert not np.array_equal(other.images, train.images)
    with pytest.raises(LtlibError, match="test_per_class=0"):
        digits_pools(test_per_class=0)


# ---------------------------------------------------------------------------------------------------
# CIFAR through torchvision (no network: files made here, downloads made to fail)


def test_cifar_missing_files_offline(tmp_path: Path) -> None:
    with pytest.raises(LtlibError) as info:
        cifar_pools(str(tmp_path), num_classes=10, download=False)
    message = one_line_error(info)
    assert "CIFAR-10 not found" in message and str(tmp_path) in message
    assert "cifar-10-python.tar.gz or cifar-10-batches-py/" in message and "data.source.download=true" in message


def test_cifar_failed_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(LtlibError) as info:
        cifar_pools(str(tmp_path), num_classes=100, download=True)
    message = one_line_error(info)
    assert "CIFAR-100 could not be downloaded" in message and "cifar-100-python.tar.gz" in message


def test_cifar_rejects_other_class_counts(tmp_path: Path) -> None:
    with pytest.raises(LtlibError, match="num_classes=20 is invalid for CIFAR; allowed: 10, 100"):
        cifar_pools(str(tmp_path), num_classes=20)


def write_fake_cifar(root: Path, num_classes: int, per_file: int) -> dict[str, np.ndarray]:
    """CIFAR batch files in torchvision's format (checksums are bypassed by the test)."""
    rng = np.random.default_rng(num_classes)
    folder = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    files = ([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"] if num_classes == 10 else ["train", "test"])
    label_key = "labels" if num_classes == 10 else "fine_labels"
    written = {}
    for name in files:
        data = rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, num_classes, per_file).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f)
        written[name] = data
        written[name + "_labels"] = np.array(labels)
    meta_name, meta_key = ("batches.meta", "label_names") if num_classes == 10 else ("meta", "fine_label_names")
    with open(folder / meta_name, "wb") as f:
        pickle.dump({meta_key: [f"name{c}" for c in range(num_classes)]}, f)
    return written


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_pools_wrap_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_classes: int) -> None:
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    written = write_fake_cifar(tmp_path, num_classes, per_file=6)
    train, test = cifar_pools(str(tmp_path), num_classes=num_classes)
    first, test_name = ("data_batch_1", "test_batch") if num_classes == 10 else ("train", "test")
    train_files = 5 if num_classes == 10 else 1
    assert len(train) == 6 * train_files and len(test) == 6
    assert train.class_names == [f"name{c}" for c in range(num_classes)] and train.in_chans == 3
    np.testing.assert_array_equal(train.targets[:6], written[first + "_labels"])
    np.testing.assert_array_equal(test.targets, written[test_name + "_labels"])
    chw = written[first][0].reshape(3, 32, 32)
    np.testing.assert_array_equal(np.asarray(train.load(0)), chw.transpose(1, 2, 0))
    assert train.describe(3) == f"CIFAR-{num_classes} train #3"
    assert test.name == f"the official CIFAR-{num_classes} test set"
