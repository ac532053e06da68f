"""notebooks/analysis.ipynb runs top to bottom (nbclient, the venv's python) against a small job output, so it
cannot rot; the committed copy carries no outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import jobworld
import nbformat
import pytest

from ray_certseg import cli

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "analysis.ipynb"


def test_committed_notebook_is_clean_and_reads_its_output_parameter():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "RAY_CERTSEG_OUTPUT" in code[0].source and "outputs/demo" in code[0].source


@pytest.fixture(scope="module")
def output(tmp_path_factory, ray_session) -> Path:
    root = tmp_path_factory.mktemp("nbjob")
    cfg = jobworld.config(
        jobworld.write_dataset(root / "data", 3), jobworld.write_models(root / "models"), root / "out", n=40
    )
    tree = (
        root / "toy3.yaml"
    )  # the notebook's last section compares SegCertify with hierarchical certification
    tree.write_text("name: toy3\nclasses: [c0, c1, c2]\nlevels:\n  - {n0: [c0], n12: [c1, c2]}\n")
    cfg["dataset"]["hierarchy"] = str(tree)
    cfg["certify"]["procedures"] = [
        "segcertify",
        {"procedure": "hierarchical", "params": {"hierarchy": str(tree), "thresholds": [0.5, 0]}},
    ]
    assert (
        cli.main(
            [
                "run",
                "--config",
                str(jobworld.write_config(root / "job.yaml", cfg)),
                "--progress-interval",
                "0",
            ]
        )
        == 0
    )
    return root / "out"


@pytest.mark.slow
@pytest.mark.ray
def test_notebook_runs_top_to_bottom(output, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("RAY_CERTSEG_OUTPUT", str(output))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # "python3" runs `python -m ipykernel_launcher`; jupyter_client substitutes sys.executable for `python`
    NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"python: {sys.executable}" in text and f"output: {output}" in text
    assert "recertify at the run's grid == the reducer's metrics.parquet: identical" in text
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    # certified accuracy, per-sigma curves, per-class IoU, overlay strip, CIG / abstain vs radius (hierarchical)
    assert len(figures) == 5
    assert "hierarchical at thresholds [0.5, 0] vs SegCertify" in text
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("certified_accuracy" in t for t in tables)
    assert any("0.65" in t and "0.01" in t for t in tables)  # the re-certified rows sit next to the run's
