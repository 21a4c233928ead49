"""README stays true: its Python example runs, and CI runs its test command."""

import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_opens_with_install_run_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert first_block[0].startswith("pip install -e '.[dev]' && python -m ltlib.run")
    test_command = first_block[1].split("#")[0].strip()
    assert test_command == "python -m pytest -q"
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_readme_plain_pytorch_example_trains():
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
    assert namespace["classifier"].weight.grad is not None
