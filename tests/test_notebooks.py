"""The notebooks: committed clean, and every one runs end to end through papermill (tiny models)."""
import json
import math
from pathlib import Path

import nbformat
import pytest

from ecoflap_utils.runs import run_grid

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))
RANGES = {"acc1": (0, 100), "acc5": (0, 100), "mean_per_class_recall": (0, 100), "vqa_accuracy": (0, 100),
          "cider": (0, 1000), "bleu4": (0, 100), "perplexity": (1, 1e6), "spearman": (-1, 1),
          "min_sparsity": (0, 1), "max_sparsity": (0, 1)}


def test_there_are_six_numbered_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean_and_thin(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    for line in params[0].source.strip().splitlines():  # NAME: type = value  # help
        assert ":" in line.split("=")[0] and "#" in line, line
        assert "=" not in line.split("#", 1)[1], f"papermill cannot parse '=' in a help comment: {line}"
    assert "OUT_DIR" in params[0].source and "MODEL" in params[0].source
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    # every cell but the parameter list stays short: longer logic belongs in the package, with a test
    assert all(len(c.source.strip().splitlines()) <= 15 for c in code if c not in params)


def test_notebooks_are_what_tools_build_notebooks_writes(tmp_path):
    """The generator is the notebooks' source: a notebook edited by hand and not in the generator fails here."""
    import subprocess
    import sys

    subprocess.run([sys.executable, str(ROOT / "tools" / "build_notebooks.py"), str(tmp_path)], check=True,
                   capture_output=True)
    for path in NOTEBOOKS:
        assert path.read_text() == (tmp_path / path.name).read_text(), f"{path.name}: run tools/build_notebooks.py"


def check_results(path: Path) -> list[dict]:
    records = json.loads(path.read_text())
    records = records if isinstance(records, list) else [records]
    assert records
    for r in records:
        assert {"model", "method", "sparsity", "task", "metrics", "resources", "config"} <= set(r)
        for k, v in r["metrics"].items():
            assert math.isfinite(v), (k, v)
            if k in RANGES:
                lo, hi = RANGES[k]
                assert lo <= v <= hi, (k, v)
    return records


def test_every_notebook_runs_on_the_tiny_models(tmp_path):
    result = run_grid(ROOT / "grids" / "tiny.yaml", tmp_path / "runs", progress=False)
    assert not result.failed, result.failed
    stems = set()
    for res in (tmp_path / "runs").glob("*/*/results.json"):
        check_results(res)
        stems.add(res.parent.parent.name)
    assert stems == {p.stem for p in NOTEBOOKS}
    figures = list((tmp_path / "runs").glob("*/*/figures/*.png"))
    assert len(figures) >= 6
    assert (tmp_path / "runs" / "results.md").exists()
    # a second run resumes: nothing is executed again
    again = run_grid(ROOT / "grids" / "tiny.yaml", tmp_path / "runs", progress=False, summary=False)
    assert not again.executed and len(again.skipped) == len(result.runs)


WHOLE_MODEL = {"wanda", "sparsegpt", "ecoflap-zeroth", "ecoflap-first"}
HIGHER_IS_BETTER = {"acc1": True, "vqa_accuracy": True, "cider": True, "perplexity": False}


def test_smoke_grid_on_the_bundled_models(tmp_path):
    """grids/smoke.yaml: every notebook on the bundled models at minimal sizes; dense beats 0.7 sparsity."""
    result = run_grid(ROOT / "grids" / "smoke.yaml", tmp_path / "runs", progress=False, summary=False)
    assert not result.failed, result.failed
    compared = 0
    for res in (tmp_path / "runs").glob("*/*/results.json"):
        records = check_results(res)
        for d in [r for r in records if r["method"] == "dense"]:
            for r in records:
                # whole-model methods only (01's one-module-at-a-time runs may keep the dense score)
                if r["task"] != d["task"] or abs(r["sparsity"] - 0.7) > 1e-9 or r["method"] not in WHOLE_MODEL:
                    continue
                for metric, higher in HIGHER_IS_BETTER.items():
                    if metric in d["metrics"] and metric in r["metrics"]:
                        better = d["metrics"][metric] > r["metrics"][metric]
                        assert better == higher, (res, r["method"], metric)
                        compared += 1
    assert compared >= 3
