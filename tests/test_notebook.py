"""dpokit in a real Jupyter kernel (ipykernel, executed by nbclient): the Python API runs there, and progress
is one HTML block per phase, updated in place, never a line per update."""

import json

import pytest

pytestmark = pytest.mark.slow


def run_cell(code: str, folder) -> list[dict]:
    """The outputs of one notebook cell executed in a fresh python3 kernel (this interpreter)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    NotebookClient(
        notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(folder)}}
    ).execute()
    return notebook.cells[0].outputs


def test_training_in_a_notebook_shows_one_block_per_phase_updated_in_place(tmp_path, tiny_model_dir):
    settings = {
        "model.name": str(tiny_model_dir),
        "data.train": "builtin:demo",
        "data.limit": 24,
        "data.eval_fraction": 0.25,
        "train.max_steps": 3,
        "train.run_dir": str(tmp_path / "run"),
        "eval.every": 2,
    }
    outputs = run_cell(f"import dpokit\nrun = dpokit.train(**{json.dumps(settings)})\nprint(run)", tmp_path)
    blocks = [o["data"]["text/html"] for o in outputs if o["output_type"] == "display_data"]
    streams = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    assert "3 steps, completed all steps" in streams
    assert "step    1 loss" not in streams and "eval @ step" not in streams  # no line per update
    train = [b for b in blocks if "<b>train</b>" in b]
    evals = [b for b in blocks if "<b>evaluation</b>" in b]
    # one training block, drawn last with the final step and evaluation; one block per evaluation phase
    assert len(train) == 1 and 'value="3" max="3"' in train[0]
    assert "step    3 loss" in train[0] and "eval @ step 3" in train[0]
    assert len(evals) == 3 and all('value="6" max="6"' in b for b in evals)  # at start, step 2, step 3
