"""Every lesson runs as a notebook: jupytext turns the `# %%` cells into one, nbclient runs it top to bottom
in a kernel started at the repository root, as a learner's Jupyter or VS Code would.

A cell inserted after the constants block edits constants the way a learner would (OUT goes to a temporary
folder; lesson 02 skips its timing); lessons 03 to 06 run with the tiny settings of their own tests, in the
slow suite."""

import json

import pytest
from conftest import REPO

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def run_notebook(script: str, edits: str, timeout: int = 600):
    notebook = jupytext.read(REPO / script)
    at = next(i for i, cell in enumerate(notebook.cells) if "# --- end constants" in cell.source)
    notebook.cells.insert(at + 1, nbformat.v4.new_code_cell(edits))
    client = nbclient.NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    return notebook


def outputs(cell) -> list[str]:
    """What a cell shows: 'stream', 'text/plain', 'image/png', ..."""
    kinds = []
    for output in cell.get("outputs", []):
        kinds += ["stream"] if output["output_type"] == "stream" else list(output.get("data", {}))
    return kinds


def check_notebook(notebook, out, lesson: str, figures: int, every_cell_shows: bool = True):
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    edits = next(i for i, cell in enumerate(code) if "# --- end constants" in cell.source) + 1
    if every_cell_shows:  # each cell ends in something visible, not only in definitions (the edit cell aside)
        silent = [cell.source.splitlines()[0] for i, cell in enumerate(code) if i != edits and not outputs(cell)]
        assert not silent, f"cells that show nothing: {silent}"
    shown = sum(outputs(cell).count("image/png") for cell in code)
    assert shown >= figures  # every figure is shown inline (lesson 05 also draws its diagrams in their cell)...
    assert len(list(out.glob("*.png"))) == figures  # ...and still saved
    assert json.loads((out / "results.json").read_text())["lesson"] == lesson


def test_lesson01_runs_as_a_notebook(tmp_path):
    out = tmp_path / "01_basic_residual_block"
    notebook = run_notebook("01_basic_residual_block.py", f"OUT = {str(out)!r}\nSWEEP_REPEATS = 1")
    check_notebook(notebook, out, "01_basic_residual_block", figures=1)


def test_lesson02_runs_as_a_notebook(tmp_path):
    out = tmp_path / "02_resnet_implementation"
    notebook = run_notebook("02_resnet_implementation.py", f"OUT = {str(out)!r}\nMEASURE_LATENCY = False")
    check_notebook(notebook, out, "02_resnet_implementation", figures=1)


SLOW = {
    "03_training_comparison.py": (
        "DATASET = 'synthetic'\nDEPTHS = (8, 14)\nITERATIONS = 6\nBATCH_SIZE = 16\nTRAIN_SIZE = 256\nVAL_SIZE = 64\n"
        "BN_RECALIBRATION_BATCHES = 2\nGRAD_CHECKPOINTS = 2\nSMOOTHING = 2",
        2,
    ),
    "04_residual_variants.py": (
        "DATASET = 'synthetic'\nTRAIN_SIZE = 256\nVAL_SIZE = 64\nTEST_SIZE = 64\nTRAIN_STEPS = 2\nBATCH_SIZE = 8\n"
        "WARMUP_STEPS = 1\nBN_RECALIBRATION_BATCHES = 1\nDEEP_DEPTH = 20",
        None,
    ),
    "05_visualization.py": (
        "DATASET = 'synthetic'\nTRAIN_SIZE = 256\nVAL_SIZE = 32\nGRADIENT_DEPTHS = (8,)\nGRADIENT_BATCH = 8\n"
        "LANDSCAPE_DEPTH = 8\nTRAIN_STEPS = 3\nBATCH_SIZE = 16\nWARMUP_STEPS = 1\nBN_RECALIBRATION_BATCHES = 1\n"
        "GRID_POINTS = 5\nLOSS_IMAGES = 32\nDIRECTION_PAIRS = 2",
        4,
    ),
    "06_practical_example.py": (
        "DATASET = 'synthetic'\nMODEL = 'resnet20'\nTRAIN_SIZE = 256\nVAL_SIZE = 64\nTEST_SIZE = 64\nEPOCHS = 1\n"
        "BATCH_SIZE = 32\nNUM_MISTAKES = 4",
        None,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SLOW))
def test_lessons_03_to_06_run_as_notebooks(script, tmp_path):
    edits, figures = SLOW[script]
    out = tmp_path / script[:-3]
    notebook = run_notebook(script, f"OUT = {str(out)!r}\n{edits}")
    figures = figures if figures is not None else len(list(out.glob("*.png")))
    check_notebook(notebook, out, script[:-3], figures)
