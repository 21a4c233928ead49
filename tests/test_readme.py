"""README stays true: its Python example runs, and CI runs its test command."""

import re
import shlex
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



DOCUMENTS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").rglob("*.md"))]


def documented_run_commands() -> list[tuple[str, str]]:
    """(document, command) for every ``python -m ltlib.run ...`` line of the docs' shell blocks."""
    found = []
    for doc in DOCUMENTS:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if "python -m ltlib.run" in line and not line.startswith("#"):
                    found.append((doc.name, line[line.index("python -m ltlib.run"):].split("&&")[0]))
    return found


def test_every_documented_run_command_composes():
    """The overrides of each command in README, BENCHMARKS and docs/ compose into a config (a sweep: the first
    value of each list), so no documented command has a stale key, a placeholder or an unknown option."""
    from ltlib.config import compose

    commands = documented_run_commands()
    assert len(commands) >= 40 and sum(doc == "README.md" for doc, _ in commands) >= 10
    for doc, command in commands:
        overrides = [word for word in shlex.split(command)[3:] if word != "-m"]
        overrides = [re.sub(r"=([^\[,]+),.*$", r"=\1", word) for word in overrides]  # a=x,y -> a=x
        cfg = compose(overrides, hydra_node=True)
        assert cfg.method._target_.startswith("ltlib.methods"), (doc, command)
