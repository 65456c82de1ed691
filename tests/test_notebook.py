"""notebooks/compare_freezing_strategies.ipynb runs top to bottom (nbclient), with fewer steps."""

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "compare_freezing_strategies.ipynb"


def test_notebook_is_what_the_generator_writes():
    import runpy

    cells = runpy.run_path(str(ROOT / "scripts" / "make_notebook.py"))["CELLS"]
    shipped = nbformat.read(NOTEBOOK, as_version=4).cells
    assert [c.source for c in shipped] == [c.source for c in cells]


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    quick = {"sft.logging_steps": 1, "eval.max_rows": 6, "eval.compare_base": True,
             "eval.retention_file": None, "data.max_train_rows": 64}
    # injected after the settings cell, as papermill does
    nb.cells.insert(params + 1, nbformat.v4.new_code_cell(
        f'VARIANTS = ["full", "esft"]\nSEEDS = [1]\nSTEPS = 2\nEVAL_STEPS = 2\nOUTPUT_DIR = "{tmp_path / "out"}"\n'
        f"EXTRA = {quick!r}"))
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # score, loss curves, drift, one run's expert load
    table = next(o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
    # one seed: each run starts a process (about 12 s here); seeds and spreads are test_compare's
    assert "| full |" in table and "| esft |" in table and "One seed per variant." in table
    assert (tmp_path / "out" / "esft" / "seed-1" / "compare_run.json").is_file()
