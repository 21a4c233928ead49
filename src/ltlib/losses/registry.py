"""The loss registry: ``register_loss``, ``create_loss``, ``list_losses`` and ``loss_options``.

Modelled on timm's ``register_model`` / ``create_model`` / ``list_models``, with the conventions of
:mod:`ltlib.backbones.registry`. A registered loss is a :class:`~ltlib.losses.base.LongTailLoss`
subclass; its constructor's keyword arguments are the loss's options, and a constructor that takes
``class_counts`` gets the training counts from :func:`create_loss`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import Tensor

from ltlib.errors import LtlibError
from ltlib.losses.base import LongTailLoss
from ltlib.registry import Registry

LossT = TypeVar("LossT", bound=type[LongTailLoss])

_LOSSES: Registry[type[LongTailLoss]] = Registry("loss", base=LongTailLoss)


def register_loss(name: str) -> Callable[[LossT], LossT]:
    """Class decorator adding a :class:`LongTailLoss` subclass to the registry under ``name``.

    Registering a different class under a taken name raises ValueError (re-registering the same
    class, e.g. after a module reload, replaces it).
    """
    return _LOSSES.register(name)


def list_losses(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered losses, optionally filtered by an fnmatch ``pattern``
    (e.g. ``"*focal"``; case-sensitive)."""
    return _LOSSES.names(pattern)


def loss_options(name: str) -> list[str]:
    """The options (constructor keywords, ``class_counts`` aside) of the loss registered as ``name``, in
    constructor order; an unknown name raises LtlibError listing the registered ones.

    >>> loss_options("ldam")
    ['max_margin', 'scale', 'weight', 'reduction']
    """
    return list(_LOSSES.options(name, exclude=("class_counts",)))


def create_loss(name: str, class_counts: Sequence[int] | Tensor | None = None, **kwargs: Any) -> LongTailLoss:
    """Build the loss registered as ``name``.

    Args:
        name: a name from :func:`list_losses`.
        class_counts: training images per class; passed only to losses whose constructor takes it
            (required by those that need it, ignored by the others).
        **kwargs: options of that loss, e.g. ``gamma=1.0``, ``reduction="batch_mean"``.

    Raises:
        LtlibError: unknown name, unknown or ill-typed option, missing ``class_counts`` or a bad value.
    """
    _LOSSES.check_options(name, kwargs, exclude=("class_counts",))
    counts = _LOSSES.options(name).get("class_counts")
    fixed: dict[str, Any] = {}
    if counts is not None:
        if class_counts is not None:
            fixed["class_counts"] = class_counts
        elif counts.default is inspect.Parameter.empty:
            raise LtlibError(f"loss {name!r} needs class_counts (training images per class); got None")
    return _LOSSES.build(name, kwargs, **fixed)
