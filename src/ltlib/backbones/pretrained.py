"""Reading pretrained state dicts: torchvision's ImageNet downloads and local files.

Both helpers turn every failure into a one-line :class:`~ltlib.errors.LtlibError`; the download one
tells an offline user which file to place in torch's checkpoint cache.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor
from torchvision.models import WeightsEnum

from ltlib.errors import LtlibError


def checkpoints_dir() -> str:
    """The folder where torchvision's weights API caches downloads (``<torch hub dir>/checkpoints``)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def download_state_dict(weights: WeightsEnum, arch: str) -> dict[str, Tensor]:
    """Fetch ``weights`` through torchvision's weights API (cached, hash-checked) for backbone ``arch``."""
    filename = os.path.basename(urlparse(weights.url).path)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except OSError as exc:
        raise LtlibError(
            f"could not download {weights} for backbone {arch!r} ({_first_line(exc)}); put the file "
            f"{filename} (from {weights.url}) in {checkpoints_dir()} or pass pretrained_path=FILE"
        ) from exc
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        cached = os.path.join(checkpoints_dir(), filename)
        raise LtlibError(
            f"could not load {weights} for backbone {arch!r} from {cached} ({_first_line(exc)}); "
            "delete the file to download it again or pass pretrained_path=FILE"
        ) from exc


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Load a state dict saved with ``torch.save(model.state_dict(), path)`` onto the CPU."""
    file = Path(path)
    if not file.is_file():
        raise LtlibError(f"pretrained_path={str(path)!r} does not exist or is not a file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (pickle, zip, runtime) for a bad file
        raise LtlibError(f"could not read pretrained_path={str(path)!r} as a state dict "
                         f"({type(exc).__name__}: {_first_line(exc)})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise LtlibError(f"pretrained_path={str(path)!r} holds a {type(state).__name__}, not a state dict "
                         "of tensors; save one with torch.save(model.state_dict(), FILE)")
    return dict(state)


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (error messages stay on one line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
