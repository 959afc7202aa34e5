"""The chapter notebook (docs/chapter4.ipynb) runs top to bottom on this install.

It is executed by a real Jupyter kernel (nbclient, ipykernel) with the
interpreter running the tests, offline, on the embedded MNIST subset, so an
API change that breaks a cell fails here rather than in a reader's browser.
The notebook is kept in git without outputs; this test checks that too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "chapter4.ipynb"

# One cell may compile Numba's training kernels cold (~10-15 s on two cores);
# the whole notebook runs in well under a minute.
CELL_TIMEOUT_S = 300


def test_notebook_is_stored_without_outputs():
    document = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    for index, cell in enumerate(document["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"cell {index} has stored outputs: clear them"
            assert cell["execution_count"] is None, f"cell {index} has an execution count"


@pytest.mark.slow
@pytest.mark.filterwarnings(
    # jupyter_core's notice about its directories, raised while nbclient starts the kernel
    "ignore:Jupyter is migrating its paths:DeprecationWarning"
)
def test_notebook_runs_top_to_bottom():
    pytest.importorskip("matplotlib", reason="the notebook's figures need fastgrad[plot]")
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error

    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells)
    outputs = [output for cell in code_cells for output in cell.outputs]
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(figures) >= 5, f"expected the chapter's figures, got {len(figures)}"
    text = "".join(output.get("text", "") for output in outputs)
    assert "failed: ['W1', 'b1']" in text  # the hand-written model's bug is found
