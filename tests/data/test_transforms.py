"""Transform pipelines per kind of data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from ltlib.data import build_transforms
from ltlib.errors import LtlibError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def kinds_of(pipeline: T.Compose) -> list[type]:
    return [type(step) for step in pipeline.transforms]


def test_cifar_pipelines() -> None:
    train = build_transforms("cifar", True, MEAN, STD)
    assert kinds_of(train) == [T.RandomCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert train.transforms[0].size == (32, 32) and train.transforms[0].padding == 4
    assert kinds_of(build_transforms("cifar", False, MEAN, STD)) == [T.ToTensor, T.Normalize]
    image = Image.fromarray(np.full((32, 32, 3), 255, dtype=np.uint8))
    out = build_transforms("cifar", False, MEAN, STD)(image)
    assert out.shape == (3, 32, 32) and torch.allclose(out, torch.full_like(out, 2.0))  # (1 - 0.5) / 0.25


def test_imagenet_pipelines() -> None:
    # BBN's iNaturalist and FBL's pipelines: no colour jitter (FBL's line is commented out)
    train = build_transforms("imagenet", True, MEAN, STD, image_size=112)
    assert kinds_of(train) == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert train.transforms[0].size == (112, 112)
    jittered = build_transforms("imagenet_color_jitter", True, MEAN, STD, image_size=112)
    assert kinds_of(jittered)[:3] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ColorJitter]
    jitter = jittered.transforms[2]
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4) and jitter.hue is None
    assert kinds_of(build_transforms("imagenet_color_jitter", False, MEAN, STD)) == kinds_of(
        build_transforms("imagenet", False, MEAN, STD))
    test = build_transforms("imagenet", False, MEAN, STD)
    assert test.transforms[0].size == 256 and test.transforms[1].size == (224, 224)
    image = Image.fromarray(np.zeros((300, 400, 3), dtype=np.uint8))
    assert test(image).shape == (3, 224, 224)
    assert train(image).shape == (3, 112, 112)


def test_digits_and_none_pipelines() -> None:
    train = build_transforms("digits", True, (0.5,), (0.5,))
    assert kinds_of(train) == [T.RandomCrop, T.ToTensor, T.Normalize]  # no flip: digits are not symmetric
    assert train.transforms[0].padding == 1
    digit = Image.fromarray(np.zeros((8, 8), dtype=np.uint8))
    assert train(digit).shape == (1, 8, 8)
    assert kinds_of(build_transforms("digits", False, (0.5,), (0.5,))) == [T.ToTensor, T.Normalize]
    assert kinds_of(build_transforms("none", True, MEAN, STD)) == [T.ToTensor, T.Normalize]


def test_bad_transform_options() -> None:
    with pytest.raises(LtlibError, match="unknown augmentation 'randaugment'; available: cifar, digits, imagenet, imagenet_color_jitter, none"):
        build_transforms("randaugment", True, MEAN, STD)
    with pytest.raises(LtlibError, match="one value per channel"):
        build_transforms("cifar", True, MEAN, (0.2,))
    with pytest.raises(LtlibError, match="std=.* positive"):
        build_transforms("cifar", True, (0.5,), (0.0,))
    with pytest.raises(LtlibError, match="image_size=0"):
        build_transforms("imagenet", True, MEAN, STD, image_size=0)
