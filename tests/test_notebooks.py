"""The Colab notebooks run headless on CPU: any failing cell fails the test."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from xla_flags import flags_with_devices

COLAB = Path(__file__).resolve().parent.parent / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))


def test_notebooks_are_present():
    assert {path.name for path in NOTEBOOKS} == {"quickstart.ipynb", "routing_explorer.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    # Small settings for CI; the notebooks read these and default to their full size.
    monkeypatch.setenv("MOE_JAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("MOE_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("XLA_FLAGS", flags_with_devices(None))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": COLAB}}
    )
    client.execute()  # raises CellExecutionError at the first failing cell
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors, errors
