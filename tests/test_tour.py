"""docs/tour.ipynb, executed from its first cell on a fresh kernel (nbclient): the suite fails if
any cell raises, and the displays it promises (charts, the run's report) are there."""

import os
import sys

import pytest
from conftest import ROOT

nbclient = pytest.importorskip("nbclient", reason="the test extra installs nbclient")
nbformat = pytest.importorskip("nbformat", reason="the test extra installs nbformat")
pytest.importorskip("ipykernel", reason="the test extra installs ipykernel")

TOUR = ROOT / "docs" / "tour.ipynb"


def test_the_tour_runs_on_a_fresh_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_TOUR_OUT", str(tmp_path))  # the run folder, instead of a temp one
    # the kernel imports this checkout's minigpt, with the Python running the tests
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT),
                                                                    os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PATH", os.pathsep.join([os.path.dirname(sys.executable),
                                                os.environ.get("PATH", "")]))
    nb = nbformat.read(TOUR, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        cell.outputs, cell.execution_count = [], None  # what is checked below comes from this run
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(TOUR.parent)}})
    client.execute()  # a cell that raises fails here, naming the cell and its traceback
    assert all(cell.execution_count for cell in code)
    pages = [o["data"]["text/html"] for cell in code for o in cell.outputs
             if "text/html" in o.get("data", {})]
    assert len(pages) >= 4 and all("<svg" in page for page in pages)  # run, costs, energy, scale
    text = "".join(o.get("text", "") for cell in code for o in cell.outputs)
    assert "per decode step" in text and "at GPT-3 scale" in text
    assert (tmp_path / "tiny" / "report.html").is_file()
