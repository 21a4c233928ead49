"""ltlib: long-tailed visual recognition on PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
