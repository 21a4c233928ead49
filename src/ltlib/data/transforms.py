"""Image transforms (torchvision.transforms on PIL images) for each kind of data.

=========  ===========================================================  ===============================
kind       train                                                        eval
=========  ===========================================================  ===============================
cifar      RandomCrop(size, padding=4), RandomHorizontalFlip            (none)
imagenet   RandomResizedCrop(size), RandomHorizontalFlip, ColorJitter   Resize(size * 256 / 224),
           (brightness=contrast=saturation=0.4)                         CenterCrop(size)
digits     RandomCrop(size, padding=1) (no flip: digits are not         (none)
           mirror-symmetric)
none       (none)                                                       (none)
=========  ===========================================================  ===============================

Every pipeline ends with ToTensor and Normalize(mean, std). Default sizes: cifar 32, imagenet 224,
digits 8. The ImageNet colour jitter is the one of the ImageNet-LT / iNaturalist code of Kang et al.
("Decoupling representation and classifier", ICLR 2020) that BBN-era methods share.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T

from ltlib.errors import LtlibError, unknown_name

TRANSFORM_KINDS = ("cifar", "imagenet", "digits", "none")


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
    elif kind == "imagenet":
        size = image_size or 224
        if train:
            steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
                     T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)]
        else:
            steps = [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)]
    elif kind == "digits" and train:
        steps = [T.RandomCrop(image_size or 8, padding=1)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(list(mean), list(std))])
