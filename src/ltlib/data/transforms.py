"""Image transforms (torchvision.transforms on PIL images) for each kind of data.

=====================  =================================================  ===============================
kind                   train                                              eval
=====================  =================================================  ===============================
cifar                  RandomCrop(size, padding=4), RandomHorizontalFlip  (none)
imagenet               RandomResizedCrop(size), RandomHorizontalFlip      Resize(size * 256 / 224),
                                                                          CenterCrop(size)
imagenet_color_jitter  as imagenet, then ColorJitter(brightness=          as imagenet
                       contrast=saturation=0.4)
digits                 RandomCrop(size, padding=1) (no flip: digits are   (none)
                       not mirror-symmetric)
none                   (none)                                             (none)
=====================  =================================================  ===============================

Every pipeline ends with ToTensor and Normalize(mean, std). Default sizes: cifar 32, imagenet 224,
digits 8. ``imagenet`` is the pipeline of BBN's iNaturalist code and FBL's code (whose ColorJitter line
is commented out); ``imagenet_color_jitter`` adds the colour jitter of Kang et al.'s decoupling code
("Decoupling representation and classifier", ICLR 2020).

Named normalisation statistics (:data:`NORMALIZATIONS`, ``data.normalization=NAME``) replace the
per-channel ``mean`` / ``std`` lists. All three official codes (BBN, FBL, LDAM-DRW) normalise
CIFAR-100 with CIFAR-10's statistics, so ``cifar100_lt`` defaults to ``cifar10``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T

from ltlib.errors import LtlibError, unknown_name

TRANSFORM_KINDS = ("cifar", "imagenet", "imagenet_color_jitter", "digits", "none")

#: name -> (mean, std). cifar10 / cifar100: the training sets' per-channel statistics as the official
#: CIFAR-LT codes write them (CIFAR-10's std is the one of the pytorch-cifar code they all copy);
#: imagenet: torchvision's; inat2018: as in Kang et al.'s iNaturalist code.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inat2018": ((0.466, 0.471, 0.380), (0.195, 0.194, 0.192)),
}


def normalization_stats(name: str) -> tuple[list[float], list[float]]:
    """``(mean, std)`` of the named normalisation (``data.normalization``); one-line error if unknown."""
    if name not in NORMALIZATIONS:
        raise unknown_name("normalization", name, NORMALIZATIONS)
    mean, std = NORMALIZATIONS[name]
    return list(mean), list(std)


def build_transforms(kind: str, train: bool, mean: Sequence[float], std: Sequence[float],
                     image_size: int | None = None) -> T.Compose:
    """The train (``train=True``) or evaluation pipeline of ``kind``, ending in ToTensor + Normalize."""
    if kind not in TRANSFORM_KINDS:
        raise unknown_name("augmentation", kind, TRANSFORM_KINDS)
    if image_size is not None and image_size < 1:
        raise LtlibError(f"image_size={image_size!r} is invalid; allowed: an integer >= 1 or null")
    if len(mean) != len(std) or not mean:
        raise LtlibError(f"mean {list(mean)} and std {list(std)} must have one value per channel")
    if any(s <= 0 for s in std):
        raise LtlibError(f"std={list(std)} is invalid; allowed: positive values")
    steps: list = []
    if kind == "cifar" and train:
        steps = [T.RandomCrop(image_size or 32, padding=4), T.RandomHorizontalFlip()]
    elif kind in ("imagenet", "imagenet_color_jitter"):
        size = image_size or 224
        if train:
            steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
            if kind == "imagenet_color_jitter":
                steps.append(T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4))
        else:
            steps = [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)]
    elif kind == "digits" and train:
        steps = [T.RandomCrop(image_size or 8, padding=1)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(list(mean), list(std))])
