"""Image pools: indexable collections of raw images, and the sources that build them.

A source returns ``(train_pool, test_pool)``, or ``(train_pool, test_pool, val_pool)`` when the data
come with their own validation split (:func:`file_list_pools` with a ``val_list``: ImageNet-LT's
``ImageNet_LT_val.txt``, Places-LT's ``Places_LT_val.txt``). Pools stay cheap to index: CIFAR and the
digits live in memory as uint8 arrays, folders and file lists as paths that are decoded on
:meth:`ImagePool.load`.
"""

from __future__ import annotations

import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ltlib.errors import LtlibError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (errors stay one line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ImagePool(ABC):
    """Base class of image pools.

    Attributes:
        targets: int64 label of every image, in ``0 .. num_classes - 1``.
        class_names: one name per class, in label order.
        in_chans: 3 for RGB images, 1 for grayscale ("L") images.
        name: a phrase saying where the images come from ("the CIFAR-10 training set"), used in
            :attr:`ltlib.data.LongTailDataModule.split_info`.
    """

    def __init__(self, targets: Sequence[int] | np.ndarray, class_names: Sequence[str], *,
                 in_chans: int, name: str) -> None:
        self.targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        self.class_names = [str(n) for n in class_names]
        if in_chans not in (1, 3):
            raise LtlibError(f"in_chans={in_chans!r} is invalid; allowed: 1 (grayscale) or 3 (RGB)")
        self.in_chans = in_chans
        self.name = name
        if self.targets.size and (self.targets.min() < 0 or self.targets.max() >= len(self.class_names)):
            raise LtlibError(f"{name}: labels range over [{self.targets.min()}, {self.targets.max()}] but "
                             f"there are {len(self.class_names)} class names; allowed labels: "
                             f"0..{len(self.class_names) - 1}")

    @property
    def num_classes(self) -> int:
        """Number of classes (the length of :attr:`class_names`)."""
        return len(self.class_names)

    def class_counts(self) -> list[int]:
        """Images per class, in label order."""
        return np.bincount(self.targets, minlength=self.num_classes).tolist()

    def __len__(self) -> int:
        return int(self.targets.size)

    @abstractmethod
    def load(self, i: int) -> Image.Image:
        """Decode image ``i`` as a PIL image (mode "RGB" or "L")."""

    @abstractmethod
    def describe(self, i: int) -> str:
        """Say where image ``i`` comes from (a file path or a pool position), for messages."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} images, {self.num_classes} classes)"


class ArrayPool(ImagePool):
    """Images held in memory as one uint8 array: ``[N, H, W, 3]`` (RGB) or ``[N, H, W]`` (grayscale;
    ``[N, H, W, 1]`` is accepted too). ``describe(i)`` gives ``"<tag> #i"``."""

    def __init__(self, images: np.ndarray, targets: Sequence[int] | np.ndarray, class_names: Sequence[str],
                 *, name: str = "in-memory images", tag: str = "image") -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise LtlibError(f"{name}: images must be uint8, got {images.dtype}")
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise LtlibError(f"{name}: images have shape {images.shape}; allowed: [N, H, W, 3] or [N, H, W]")
        super().__init__(targets, class_names, in_chans=3 if images.ndim == 4 else 1, name=name)
        if len(images) != len(self.targets):
            raise LtlibError(f"{name}: {len(images)} images but {len(self.targets)} targets")
        self.images = images
        self.tag = tag

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    def describe(self, i: int) -> str:
        return f"{self.tag} #{i}"


class FilePool(ImagePool):
    """Images stored as files; decoded (and converted to RGB, or L when ``in_chans == 1``) on load.

    A file that is missing or cannot be decoded raises an :class:`LtlibError` naming its path.
    """

    def __init__(self, paths: Sequence[str | Path], targets: Sequence[int] | np.ndarray,
                 class_names: Sequence[str], *, name: str, in_chans: int = 3) -> None:
        super().__init__(targets, class_names, in_chans=in_chans, name=name)
        self.paths = [str(p) for p in paths]
        if len(self.paths) != len(self.targets):
            raise LtlibError(f"{name}: {len(self.paths)} paths but {len(self.targets)} targets")

    def load(self, i: int) -> Image.Image:
        path = self.paths[i]
        try:
            with Image.open(path) as img:
                return img.convert("RGB" if self.in_chans == 3 else "L")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise LtlibError(f"cannot read image {path}: {_first_line(exc)}") from exc

    def describe(self, i: int) -> str:
        return self.paths[i]


# ----------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision)


def cifar_pools(root: str, num_classes: int = 10, download: bool = False) -> tuple[ArrayPool, ArrayPool]:
    """CIFAR-10 or CIFAR-100 through torchvision, held in memory as uint8 ``[N, 32, 32, 3]`` arrays.

    Looks for ``cifar-10-batches-py/`` (``cifar-100-python/``) under ``root``; a downloaded archive
    ``cifar-10-python.tar.gz`` (``cifar-100-python.tar.gz``) there is checked and extracted without
    network access. With ``download=True`` a missing archive is fetched by torchvision.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    if num_classes not in (10, 100):
        raise LtlibError(f"num_classes={num_classes!r} is invalid for CIFAR; allowed: 10, 100")
    dataset_cls = CIFAR10 if num_classes == 10 else CIFAR100
    title = f"CIFAR-{num_classes}"
    archive = os.path.join(root, dataset_cls.filename)
    fetch = download or os.path.isfile(archive)
    help_text = (f"put {dataset_cls.filename} or {dataset_cls.base_folder}/ under {root}, or run with "
                 "data.source.download=true where the network allows")
    try:
        train = dataset_cls(root, train=True, download=fetch)
        test = dataset_cls(root, train=False, download=False)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise LtlibError(f"{title} not found (or corrupted) under {root}; {help_text}") from exc
    except (OSError, tarfile.TarError) as exc:  # network failure while downloading, unreadable archive
        raise LtlibError(f"{title} could not be downloaded or read under {root} ({_first_line(exc)}); "
                         f"{help_text}") from exc
    names = list(train.classes)
    return (ArrayPool(train.data, train.targets, names, name=f"the {title} training set", tag=f"{title} train"),
            ArrayPool(test.data, test.targets, names, name=f"the official {title} test set",
                      tag=f"{title} test"))


# ----------------------------------------------------------------------------------------------------
# Image folders: root/train/<class>/*.jpg, root/test/<class>/*.jpg


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_split(split_dir: Path) -> tuple[list[str], list[str], list[int]]:
    """Class names (sorted), file paths (sorted within a class) and labels of one split folder."""
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes:
        raise LtlibError(f"no class folders under {split_dir}; expected {split_dir}/<class>/<image files>")
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        files = sorted(entry.name for entry in os.scandir(split_dir / cls)
                       if entry.is_file() and _is_image_file(entry.name))
        if not files:
            raise LtlibError(f"empty class {cls!r} under {split_dir}: no image files "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        paths.extend(str(split_dir / cls / f) for f in files)
        labels.extend([label] * len(files))
    return classes, paths, labels


def image_folder_pools(root: str) -> tuple[FilePool, FilePool]:
    """Pools from ``root/train/<class>/*`` and ``root/test/<class>/*``.

    Image files are those ending in .jpg, .jpeg, .png, .bmp or .webp (any case). Classes are sorted
    by folder name (their label order) and files by name within a class; the test split must hold
    the same classes as the training split. Images are decoded only when loaded.
    """
    base = Path(root)
    if not base.is_dir():
        raise LtlibError(f"image folder root {root} does not exist; expected {root}/train/<class>/<images> "
                         f"and {root}/test/<class>/<images>")
    splits = {}
    for split in ("train", "test"):
        split_dir = base / split
        if not split_dir.is_dir():
            raise LtlibError(f"missing {split} folder {split_dir}; expected {root}/{split}/<class>/<images>")
        splits[split] = _scan_split(split_dir)
    train_classes, test_classes = splits["train"][0], splits["test"][0]
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise LtlibError(f"train and test classes differ under {root}: only in train {only_train}, "
                         f"only in test {only_test}")
    pools = tuple(FilePool(paths, labels, classes, name=f"the image folder {base / split}")
                  for split, (classes, paths, labels) in splits.items())
    return pools[0], pools[1]


# ----------------------------------------------------------------------------------------------------
# File lists (ImageNet-LT, Places-LT, iNaturalist): "relative/path.jpg label" per line


def _resolve_list(root: str, list_file: str) -> Path:
    """A list file as given, or else relative to ``root``."""
    for candidate in (Path(list_file), Path(root) / list_file):
        if candidate.is_file():
            return candidate
    raise LtlibError(f"file list {list_file} not found (looked as given and under {root})")


def _read_list(list_path: Path) -> list[tuple[str, int, int]]:
    """``(relative path, label, line number)`` of every non-blank line of a list file."""
    entries = []
    with open(list_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise LtlibError(f"{list_path}:{lineno}: malformed line {text!r}; expected "
                                 "'relative/path.jpg <integer label>'")
            entries.append((parts[0], int(parts[1]), lineno))
    if not entries:
        raise LtlibError(f"file list {list_path} holds no entries; expected lines 'relative/path.jpg label'")
    return entries


def file_list_pools(root: str, train_list: str, test_list: str, class_names: Sequence[str] | None = None,
                    val_list: str | None = None) -> tuple[FilePool, FilePool] | tuple[FilePool, FilePool, FilePool]:
    """Pools from list files in the ImageNet-LT / Places-LT / iNaturalist format.

    Each line is ``relative/path.jpg label`` (path relative to ``root``, integer label); blank lines are
    skipped. A list file is looked up as given, then under ``root``. With ``C`` classes
    (``len(class_names)``, or the largest label + 1 over all lists), labels must lie in ``0..C-1``
    and every class needs a training image. Class names default to ``class_<k>``. The image files
    themselves are only opened on load.

    Returns ``(train_pool, test_pool)``; with ``val_list`` (the dataset's own validation list, e.g.
    ``ImageNet_LT_val.txt``) ``(train_pool, test_pool, val_pool)``, and the data module validates on
    that list instead of holding images out of the training list. ``val_list=None`` (or ``""``): none.
    """
    named = [("train", train_list), ("test", test_list)] + ([("val", val_list)] if val_list else [])
    lists = {split: _resolve_list(root, lf) for split, lf in named}
    entries = {split: _read_list(path) for split, path in lists.items()}
    if class_names is None:
        num_classes = 1 + max(label for split in entries.values() for _, label, _ in split)
        names = [f"class_{k}" for k in range(num_classes)]
    else:
        names = [str(n) for n in class_names]
        num_classes = len(names)
        for split, split_entries in entries.items():
            for _, label, lineno in split_entries:
                if label >= num_classes:
                    raise LtlibError(f"{lists[split]}:{lineno}: label {label} is out of range; allowed: "
                                     f"0..{num_classes - 1} ({num_classes} class names given)")
    train_counts = np.bincount([label for _, label, _ in entries["train"]], minlength=num_classes)
    missing = np.flatnonzero(train_counts == 0)
    if missing.size:
        raise LtlibError(f"{lists['train']}: class {missing[0]} ({names[missing[0]]}) has no training images; "
                         f"every label 0..{num_classes - 1} needs at least one")
    pools = tuple(
        FilePool([os.path.join(root, rel) for rel, _, _ in entries[split]],
                 [label for _, label, _ in entries[split]], names, name=f"the images listed in {lists[split]}")
        for split in lists)
    return (pools[0], pools[1], pools[2]) if val_list else (pools[0], pools[1])


# ----------------------------------------------------------------------------------------------------
# iNaturalist 2017 / 2018: the official COCO-style JSON annotations


def _read_json_annotations(path: Path) -> dict:
    """An iNaturalist annotation file: a JSON object with ``images``, ``annotations`` and ``categories``."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise LtlibError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise LtlibError(f"cannot read {path}: {_first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise LtlibError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise LtlibError(f"{path}: missing the {key!r} list; expected the iNaturalist (COCO-style) format "
                             "with 'images', 'annotations' and 'categories'")
    return data


def _field(path: Path, kind: str, position: int, record: object, key: str, types: type | tuple[type, ...]) -> object:
    """``record[key]`` of the ``position``-th entry of a JSON list, checked to be of ``types``."""
    value = record.get(key) if isinstance(record, dict) else None
    if isinstance(value, bool) or not isinstance(value, types):
        raise LtlibError(f"{path}: {kind} #{position} has no valid {key!r} ({record!r:.120})")
    return value


def _json_split(path: Path, root: str, label_of: dict[int, int]) -> tuple[list[str], list[int]]:
    """Image paths (under ``root``) and labels of one annotation file, in the order of its images."""
    data = _read_json_annotations(path)
    files: dict[int, str] = {}
    for i, image in enumerate(data["images"]):
        image_id = _field(path, "image", i, image, "id", int)
        if image_id in files:
            raise LtlibError(f"{path}: image id {image_id} appears twice in 'images'")
        files[image_id] = _field(path, "image", i, image, "file_name", str)
    category_of: dict[int, int] = {}
    for i, annotation in enumerate(data["annotations"]):
        image_id = _field(path, "annotation", i, annotation, "image_id", int)
        category_id = _field(path, "annotation", i, annotation, "category_id", int)
        if image_id not in files:
            raise LtlibError(f"{path}: annotation #{i} refers to image id {image_id}, which is not in 'images'")
        if category_id not in label_of:
            raise LtlibError(f"{path}: annotation #{i} has category_id {category_id}, which is not a category of the "
                             "training annotations")
        if image_id in category_of:
            raise LtlibError(f"{path}: image id {image_id} has more than one annotation; expected exactly one label "
                             "per image")
        category_of[image_id] = category_id
    unlabelled = [image_id for image_id in files if image_id not in category_of]
    if unlabelled:
        raise LtlibError(f"{path}: {len(unlabelled)} image(s) without an annotation (e.g. image id {unlabelled[0]}, "
                         f"{files[unlabelled[0]]}); a test-set file without labels cannot be used")
    if not files:
        raise LtlibError(f"{path}: no images")
    ids = list(files)
    return [os.path.join(root, files[i]) for i in ids], [label_of[category_of[i]] for i in ids]


def inaturalist_pools(root: str, train_json: str, val_json: str) -> tuple[FilePool, FilePool]:
    """iNaturalist 2017 / 2018 pools from the official annotation files (``train2018.json`` and
    ``val2018.json``, or ``train2017.json`` and ``val2017.json``).

    The files follow the COCO layout: ``images`` (``id``, ``file_name`` relative to ``root``, e.g.
    ``train_val2018/Plantae/7477/<hash>.jpg``), ``annotations`` (``image_id``, ``category_id``; exactly one
    per image) and ``categories`` (``id``, ``name``). Labels number the training file's categories in
    the order of their ids (the official ids 0..C-1 are kept as they are); class names are the
    categories' ``name``. The validation file is the test pool, as in the long-tail literature. A JSON file
    is looked up as given, then under ``root``; images are only opened on load.
    """
    files = {}
    for split, name in (("train", train_json), ("val", val_json)):
        candidates = (Path(name), Path(root) / name)
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise LtlibError(f"iNaturalist annotation file {name} not found (looked as given and under {root})")
        files[split] = found[0]
    categories = _read_json_annotations(files["train"])["categories"]
    names_by_id: dict[int, str] = {}
    for i, category in enumerate(categories):
        category_id = _field(files["train"], "category", i, category, "id", int)
        if category_id in names_by_id:
            raise LtlibError(f"{files['train']}: category id {category_id} appears twice in 'categories'")
        names_by_id[category_id] = str(category.get("name", category_id))
    if not names_by_id:
        raise LtlibError(f"{files['train']}: no categories")
    ordered = sorted(names_by_id)
    label_of = {category_id: label for label, category_id in enumerate(ordered)}
    names = [names_by_id[category_id] for category_id in ordered]
    train_paths, train_labels = _json_split(files["train"], root, label_of)
    counts = np.bincount(train_labels, minlength=len(names))
    if (counts == 0).any():
        empty = int(np.flatnonzero(counts == 0)[0])
        raise LtlibError(f"{files['train']}: category id {ordered[empty]} ({names[empty]}) has no training images; "
                         "every category needs at least one")
    val_paths, val_labels = _json_split(files["val"], root, label_of)
    return (FilePool(train_paths, train_labels, names, name=f"the images annotated in {files['train']}"),
            FilePool(val_paths, val_labels, names, name=f"the images annotated in {files['val']}"))


# ----------------------------------------------------------------------------------------------------
# scikit-learn digits (8x8 grayscale, bundled: no download)


def digits_pools(test_per_class: int = 50, seed: int = 0) -> tuple[ArrayPool, ArrayPool]:
    """scikit-learn's bundled handwritten digits (1,797 images, 8x8, 10 classes) as grayscale pools.

    Pixel values 0..16 are scaled to uint8 0..255. A balanced test split of ``test_per_class`` images
    per class is drawn first (``np.random.RandomState(seed)``, classes in label order); the rest is the
    training pool. Both keep the dataset's original order.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    targets = np.asarray(digits.target, dtype=np.int64)
    smallest = int(np.bincount(targets).min())
    if int(test_per_class) != test_per_class or not 1 <= test_per_class < smallest:
        raise LtlibError(f"test_per_class={test_per_class!r} is invalid for the digits; allowed: an integer "
                         f"in 1..{smallest - 1}")
    images = np.rint(np.asarray(digits.images) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    rng = np.random.RandomState(seed)
    is_test = np.zeros(targets.size, dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(targets == c)
        is_test[rng.permutation(idx)[:test_per_class]] = True
    names = [str(c) for c in range(10)]
    train = ArrayPool(images[~is_test], targets[~is_test], names, name="the scikit-learn digits training split",
                      tag="digits train")
    test = ArrayPool(images[is_test], targets[is_test], names,
                     name=f"the scikit-learn digits test split ({test_per_class}/class)", tag="digits test")
    return train, test
