"""python/examples/quickstart.ipynb, run top to bottom against the test server.

It trains a second LoRA, so it runs only with FERROTUNE_TEST_NOTEBOOK=1 (`make test` and `make test-notebook` set it).
"""

from __future__ import annotations

import os
import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"

pytestmark = pytest.mark.skipif(
    not os.environ.get("FERROTUNE_TEST_NOTEBOOK"),
    reason="trains a second LoRA: set FERROTUNE_TEST_NOTEBOOK=1 (make test-notebook)",
)


def test_quickstart_runs_top_to_bottom(server, client, models_dir, monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("FERROTUNE_URL", server.url)
    monkeypatch.setenv("FERROTUNE_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("FERROTUNE_USERNAME", "notebook")
    monkeypatch.setenv("FERROTUNE_PASSWORD", "notebook-password")
    monkeypatch.delenv("FERROTUNE_API_KEY", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
    assert "adapter: 3 plus 4 is 7." in text, text
    assert "completed" in text
