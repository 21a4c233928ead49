"""The notebooks execute top to bottom (nbclient) on the embedded digits, so they never rot.

One kernel runs them all, one after the other, in a fresh working directory: each notebook starts with
its namespace reset (``%reset -f``), so it only sees what it defines itself, while imported modules stay
loaded (saving the kernel start-up and the imports of every notebook). Runs that two notebooks make with
the same overrides are reused by the second, as they would be for a user.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import nbformat
import pytest
from jupyter_client import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbformat.v4 import new_code_cell
from tests.conftest import REPO

pytestmark = pytest.mark.slow

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
#: figures each notebook writes under outputs/notebooks/figures/<name>/
FIGURES = {
    "01_quickstart.ipynb": ("quickstart", ["accuracy_vs_count.png", "shot_accuracy.png"]),
    "02_bbn_cumulative_learning.ipynb": ("bbn", ["adaptors.png", "weight_norms.png"]),
    "03_fbl_feature_norms.ipynb": ("fbl", ["compare/feature_norms_epochs.png", "compare/feature_norms_test.png",
                                           "feature_norms_from_checkpoints.png"]),
    "04_two_head_clusters.ipynb": ("two_head", ["head_class_clusters.png", "weight_norms.png"]),
}


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> tuple[Path, dict[str, tuple[nbformat.NotebookNode, Exception | None]]]:
    workdir = tmp_path_factory.mktemp("notebooks")
    kernel = KernelManager(kernel_name="python3")
    kernel.start_kernel(cwd=str(workdir), env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    outcomes: dict[str, tuple[nbformat.NotebookNode, Exception | None]] = {}
    try:
        for path in NOTEBOOKS:
            notebook = copy.deepcopy(nbformat.read(path, as_version=4))
            notebook.cells.insert(0, new_code_cell("%reset -f"))
            client = NotebookClient(notebook, km=kernel, timeout=600, resources={"metadata": {"path": str(workdir)}})
            try:
                client.execute()
                outcomes[path.name] = (notebook, None)
            except CellExecutionError as exc:
                outcomes[path.name] = (notebook, exc)
    finally:
        kernel.shutdown_kernel(now=True)
    return workdir, outcomes


def test_every_notebook_is_covered():
    assert [p.name for p in NOTEBOOKS] == sorted(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_executes_and_draws_its_figures(executed, name):
    workdir, outcomes = executed
    notebook, error = outcomes[name]
    assert error is None, f"{name} failed:\n{str(error)[-3000:]}"
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert images, f"{name} displays no figure"
    folder, files = FIGURES[name]
    for file in files:
        assert (workdir / "outputs" / "notebooks" / "figures" / folder / file).stat().st_size > 1000


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_notebooks_carry_no_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
