"""The example notebooks in experiments/notebooks: stored without outputs, and each runs top to bottom.

Each notebook is executed in a fresh Python kernel (nbclient, the `test` extra) with its figures
directed to a temporary folder through ``JAXPREF_NOTEBOOK_OUT``; any cell error fails the test.
"""

from __future__ import annotations

import os
import pathlib
import time

import pytest

ROOT = pathlib.Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "experiments" / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 300  # per cell; each notebook takes seconds


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    for index, cell in enumerate(code_cells):
        assert cell.outputs == [], f"{path.name}: code cell {index} has stored outputs; clear them"
        assert cell.execution_count is None, f"{path.name}: code cell {index} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    out_dir = tmp_path / "figures"
    monkeypatch.setenv("JAXPREF_NOTEBOOK_OUT", str(out_dir))
    # The repository on the kernel's path, as for pytest: notebooks may import the (uninstalled) experiments.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        # The kernel's working directory: a scratch folder, so a notebook cannot write into the repo.
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")

    pngs = sorted(out_dir.glob("*.png"))
    assert pngs, f"{path.name} saved no PNG into $JAXPREF_NOTEBOOK_OUT"
    assert all(png.stat().st_size > 1000 for png in pngs)
    shown = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert shown, f"{path.name} showed no figure inline"
