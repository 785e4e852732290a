"""The quickstart notebook runs top to bottom (so it cannot rot) and shows its figures."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "AUROC" in text and "group_pooling='histogram'" in text and "test/pixel_auroc" in text
    assert "seven (file)" in text and "quantile 0.99" in text  # the folder, one-image and threshold sections
    assert "GPU available" not in text and "Tip" not in text, "Lightning's notices are configured away"
    assert not any("warn" in o.get("text", "").lower() for o in outputs if o.get("name") == "stderr")
    assert any("image/png" in o.get("data", {}) for o in outputs), "the figure must render inline"
    assert not any(o.get("output_type") == "error" for o in outputs)
