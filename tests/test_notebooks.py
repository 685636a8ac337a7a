"""Every notebook executes on tiny settings, so none can rot."""

import pathlib

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks")
                   .glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch, steps=12):
  monkeypatch.setenv("TEQUILA_NOTEBOOK_STEPS", str(steps))
  monkeypatch.setenv("TEQUILA_NOTEBOOK_DIR", str(tmp_path / "runs"))
  monkeypatch.setenv("XLA_FLAGS", "")  # one device, like Colab's CPU
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}
                          ).execute()
  assert (tmp_path / "runs" / "analysis" / "fractions.png").exists()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert any("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.slow
def test_notebook_real_model_setting(tmp_path, monkeypatch):
  """The SmolLM2-135M setting (sized for a Colab GPU) runs a few steps on
  the CPU, with a learned-scale method beside AbsMean."""
  monkeypatch.setenv("TEQUILA_NOTEBOOK_SETTING", "smollm2")
  monkeypatch.setenv("TEQUILA_NOTEBOOK_METHODS", "absmean,seq")
  monkeypatch.setenv("TEQUILA_NOTEBOOK_DOCS", "6")
  test_notebook_runs(NOTEBOOKS[0], tmp_path, monkeypatch, steps=4)
  assert (tmp_path / "runs" / "seq").is_dir()
