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


def test_there_are_seven_numbered_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"]


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


def test_every_notebook_has_its_jupytext_pair():
    ipynb = {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}
    py = {p.stem for p in (ROOT / "notebooks").glob("*.py")}
    assert ipynb == py, f"unpaired: {sorted(ipynb ^ py)}: run .venv/bin/jupytext --sync notebooks/*.ipynb"
    config = (ROOT / "notebooks" / "jupytext.toml").read_text()
    assert 'formats = "ipynb,py:percent"' in config


def _cells(nb) -> list[tuple[str, str, bool]]:
    return [(c.cell_type, c.source.strip(), "parameters" in c.metadata.get("tags", [])) for c in nb.cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_and_its_py_pair_are_in_sync(path):
    """The percent-format .py read with jupytext is the committed .ipynb: same cells, same sources, same tag."""
    import jupytext

    text = jupytext.read(path.with_suffix(".py"), fmt="py:percent")
    nb = nbformat.read(path, as_version=4)
    assert _cells(text) == _cells(nb), f"{path.name} and its .py differ: run .venv/bin/jupytext --sync notebooks/*.ipynb"


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


def test_closing_table_of_a_tiny_run_is_its_results_json(tmp_path):
    """Notebook 05 on tiny-clip: the headline table it printed and saved is its own results.json, and every
    sentence it printed about measured values names the model that ran, not the bundled default."""
    import pandas as pd

    grid = {"notebook": str(ROOT / "notebooks" / "05_prune_clip.ipynb"),
            "parameters": {"MODEL": "tiny-clip", "CALIB_SAMPLES": 8, "FIRST_STAGE_SAMPLES": 8, "EVAL_LIMIT": 16},
            "grid": {"SPARSITIES": [[0.5, 0.7]]}}
    result = run_grid(grid, tmp_path / "runs", progress=False, summary=False)
    assert not result.failed, result.failed
    (run_dir,) = [r.run_dir for r in result.runs]
    records = check_results(run_dir / "results.json")
    table = pd.read_csv(run_dir / "headline.csv", index_col=0)
    assert list(table.index) == list(dict.fromkeys(r["method"] for r in records))
    for r in records:
        col = f"{r['sparsity']:g}"
        assert table.loc[r["method"], col] == pytest.approx(r["metrics"]["acc1"], rel=1e-12)
        if "acc1" in r.get("intervals", {}):  # 95 % intervals, where the records carry them
            assert list(table.loc[r["method"], [f"{col} low", f"{col} high"]]) == pytest.approx(r["intervals"]["acc1"])
    values = table[[c for c in table.columns if not c.endswith((" low", " high"))]]
    assert int(values.notna().sum().sum()) == len(records)  # nothing in the table that is not in results.json
    printed = "".join(o.get("text", "") for o in nbformat.read(run_dir / "05_prune_clip.ipynb", as_version=4).cells[-1].outputs)
    md = (run_dir / "headline.md").read_text().strip()
    assert md.startswith("### tiny-clip · zeroshot · acc1 by sparsity") and md in printed
    sentences = printed.replace(md, "").strip().splitlines()
    assert len(sentences) == 3 * 2  # sparsegpt, ecoflap-zeroth, ecoflap-first against wanda at 0.5 and 0.7
    assert all(s.startswith("On tiny-clip (zeroshot, acc1, higher is better) at sparsity 0.") for s in sentences)
    assert "mini-clip" not in printed.replace(md, "")


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
