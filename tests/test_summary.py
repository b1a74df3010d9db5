"""The grid summary (runs.write_summary) on a synthetic grid shaped like `make run`'s: 01-like records (modules
pruned one at a time), 04-like ones (one-shot sweeps at three seeds) and 07-like ones (fine-tuning curves with
evaluations at steps 0, 15 and 30). Issue 18: the headline once showed 07's fine-tuned models under one-shot
labels and its figure averaged a curve's points into one rising point."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ecoflap_utils import runs
from ecoflap_utils.cli import main
from ecoflap_utils.errors import UserError

MODEL, TASK, METRIC = "mini-blip2", "vqav2", "vqa_accuracy"
R01, R04, R07 = "01_motivation/SPARSITIES=[0.3,0.5]", "04_prune_blip2/WANDA_SPARSITIES=[0.3,0.4]", \
    "07_recovery/SPARSITIES=[0.5]"
#: 04's one-shot points: (method, sparsity) -> accuracy at seeds 0, 1, 2
SWEEP = {("wanda", 0.3): (44.0, 46.0, 48.0), ("wanda", 0.4): (2.0, 4.0, 6.0),
         ("ecoflap-zeroth", 0.3): (47.0, 49.0, 51.0), ("ecoflap-zeroth", 0.4): (5.0, 8.0, 11.0),
         ("sparsegpt", 0.7): (35.0, 39.0, 43.0), ("ecoflap-zeroth-sparsegpt", 0.7): (38.0, 54.0, 91.0)}
#: 07's curves: method -> accuracy at steps 0, 15, 30 (seed 0)
CURVES = {"wanda": (0.0, 71.0, 78.0), "ecoflap-zeroth": (0.0, 61.0, 78.0)}


def rec(method, sparsity, value, *, task=TASK, half=10.0, **config):
    return {"model": MODEL, "method": method, "sparsity": sparsity, "task": task, "metrics": {METRIC: value},
            "intervals": {METRIC: [max(value - half, 0.0), min(value + half, 100.0)]},
            "resources": {"wall_s": 1.0}, "config": config}


def records_01(dense=40.0):
    out = [rec("dense", 0.0, dense)]
    for key, values in (("language", (35.0, 0.0)), ("vision", (38.0, 30.0))):
        out += [rec(f"wanda ({key} only)", s, v, pruned=key, calib_samples=32) for s, v in zip((0.3, 0.5), values)]
    out.append({"model": MODEL, "method": "wanda", "sparsity": 0.5, "task": "local_scores",
                "metrics": {"vision_median": 0.1, "language_median": 0.3}, "config": {}})
    return out


def records_04(dense=40.0):
    out = [rec("dense", 0.0, dense)]
    for (m, s), values in SWEEP.items():
        out += [rec(m, s, v, seed=k, seeds=[0, 1, 2], calib_samples=64) for k, v in enumerate(values)]
    return out


def records_07(dense=40.0):
    out = [rec("dense", 0.0, dense)]
    for m, values in CURVES.items():
        out += [rec(m, 0.5, v, seed=0, steps=k, finetuned=k > 0, final=k != 15, trained="qformer")
                for k, v in zip((0, 15, 30), values)]
    return out


def records_02():
    """Scores at sparsity 0 by sample count, one seed: no table by sparsity, and no reason to refuse the grid."""
    return [{"model": "mini-clip", "method": "zeroth vs first", "sparsity": 0.0, "task": "score_agreement",
             "metrics": {"spearman": rho}, "config": {"samples": n, "seed": 0}} for n, rho in ((8, 0.5), (32, 0.9))]


def write_grid(out: Path, runs_records: dict[str, list]) -> Path:
    """Complete run folders (results.json, then the marker) as the runner leaves them."""
    for name, records in runs_records.items():
        d = out / name
        d.mkdir(parents=True)
        (d / runs.RESULTS).write_text(json.dumps(records))
        (d / runs.COMPLETE).write_text("")
    return out


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = write_grid(tmp_path_factory.mktemp("grid") / "runs", {R01: records_01(), R04: records_04(),
                                                               R07: records_07(), "02_zeroth": records_02()})
    files, figures, headline = runs.write_summary(out)
    return out, figures, headline


def table(markdown: str, title: str) -> dict[str, dict[str, str]]:
    """The Markdown table under ``### title``: {row: {column: cell}}."""
    block = markdown.split(f"### {title}\n\n")[1].split("\n\n")[0]
    lines = [[c.strip() for c in ln.strip("|").split("|")] for ln in block.splitlines() if ln.startswith("|")]
    head, body = lines[0], lines[2:]
    return {r[0]: dict(zip(head[1:], r[1:])) for r in body}


def test_headline_keeps_fine_tuned_models_apart_and_pools_seeds(summary):
    out, _, headline = summary
    assert (out / "results.md").read_text().startswith("## Headline\n\n" + headline)
    t = table(headline, f"{MODEL} · {TASK} · {METRIC} by sparsity")
    assert list(t) == ["dense", "ecoflap-zeroth", "ecoflap-zeroth-sparsegpt", "sparsegpt", "wanda",
                       "wanda (language only)", "wanda (vision only)", "ecoflap-zeroth · FT 30 steps",
                       "wanda · FT 30 steps"]  # one dense row: the three runs measured the same dense number
    assert list(t["dense"]) == ["0", "0.3", "0.4", "0.5", "0.7"]
    assert t["dense"]["0"] == "40.00 [30.00, 50.00]"
    # one-shot Wanda at 0.5 is 07's step-0 model (0 %), never its fine-tuned one (78 %)
    assert t["wanda"]["0.5"] == "0.00 [0.00, 10.00]" and t["ecoflap-zeroth"]["0.5"] == "0.00 [0.00, 10.00]"
    assert t["wanda · FT 30 steps"] == {"0": "", "0.3": "", "0.4": "", "0.5": "78.00 [68.00, 88.00]", "0.7": ""}
    # 04's three seeds: mean (min–max over seeds) [mean item interval]
    assert t["wanda"]["0.3"] == "46.00 (44.00–48.00 over 3 seeds) [36.00, 56.00]"
    # the mean of the seeds' bounds, clipped at 0: 0, 0, 1
    assert t["ecoflap-zeroth"]["0.4"] == "8.00 (5.00–11.00 over 3 seeds) [0.33, 18.00]"
    assert t["ecoflap-zeroth-sparsegpt"]["0.7"] == "61.00 (38.00–91.00 over 3 seeds) [51.00, 70.67]"  # 100 caps 101
    assert "15 steps" not in headline and "71.00" not in headline and "61.00 [" not in headline  # no curve point
    assert "local_scores" not in headline and "score_agreement" not in headline  # one sparsity: not a headline
    assert "over the seeds" in headline  # the note that says how to read a pooled cell


def test_results_csv_and_all_records_label_every_record(summary):
    out, _, _ = summary
    df = pd.read_csv(out / "results.csv")
    assert list(df.columns[:7]) == ["run", "model", "method", "sparsity", "task", "label", "seed"]
    curve = df[(df["run"] == R07) & (df["method"] == "wanda")].sort_values("config.steps")
    assert curve["label"].tolist() == ["wanda", "wanda · FT 15 steps (curve point)", "wanda · FT 30 steps"]
    assert curve[METRIC].tolist() == [0.0, 71.0, 78.0]
    assert sorted(df.loc[(df["run"] == R04) & (df["method"] == "wanda") & (df["sparsity"] == 0.3), "seed"]) == [0, 1, 2]
    full = (out / "results.md").read_text().split("## All records")[1]
    head = [c.strip() for c in full.strip().splitlines()[0].strip("|").split("|")]
    assert head[:6] == ["model", "task", "method", "label", "sparsity", "seed"]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in full.strip().splitlines()[2:]]
    point = [MODEL, TASK, "wanda", "wanda · FT 15 steps (curve point)", "0.5000", "0", "71.0000 [61.0000, 81.0000]"]
    assert point in [r[:7] for r in rows]  # every record is listed, the curve point as such


def series(ax) -> dict[str, tuple[list, list, str]]:
    """The legend series of an axes: label -> (x, y, linestyle), read from its Line2D objects."""
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata()), ln.get_linestyle())
            for ln in ax.get_lines() if not ln.get_label().startswith("_")}


def test_summary_figure_draws_each_kind_of_model_as_its_own_series(summary):
    out, figures, _ = summary
    assert sorted(p.name for p in figures) == [f"{MODEL}_{TASK}_{METRIC}.png"]  # local_scores: one sparsity
    assert (out / "figures" / f"{MODEL}_{TASK}_{METRIC}.png").read_bytes()[:4] == b"\x89PNG"
    df = runs.collect_results(out)
    ax = runs.summary_figure(df, MODEL, TASK, METRIC).axes[0]
    s = series(ax)
    assert list(s) == ["ecoflap-zeroth", "ecoflap-zeroth-sparsegpt", "sparsegpt", "wanda", "wanda (language only)",
                       "wanda (vision only)", "ecoflap-zeroth · FT 30 steps", "wanda · FT 30 steps", "dense"]
    # one-shot Wanda: the dense start, 04's means over seeds, 07's step-0 model; a curve that falls
    assert s["wanda"] == ([0.0, 0.3, 0.4, 0.5], [40.0, 46.0, 4.0, 0.0], "-")
    assert s["ecoflap-zeroth"][:2] == ([0.0, 0.3, 0.4, 0.5], [40.0, 49.0, 8.0, 0.0])
    # measured at one sparsity: a marker without a line, not left out
    assert s["sparsegpt"] == ([0.7], [39.0], "None")
    assert s["ecoflap-zeroth-sparsegpt"] == ([0.7], [61.0], "None")
    assert s["wanda · FT 30 steps"] == ([0.5], [78.0], "None")
    assert s["dense"] == ([0.0], [40.0], "None")
    # no point averages different records: 07's 0, 71 and 78 never meet in one point
    ys = [y for _, yy, _ in s.values() for y in yy]
    assert not any(math.isclose(y, np.mean([0.0, 71.0, 78.0])) for y in ys) and 71.0 not in ys
    # the spread over seeds: a bar from min to max at each pooled point
    bars = {c.get_gid(): [tuple(map(tuple, seg)) for seg in c.get_segments()] for c in ax.collections
            if str(c.get_gid()).startswith("seeds:")}
    assert bars["seeds:wanda"] == [((0.3, 44.0), (0.3, 48.0)), ((0.4, 2.0), (0.4, 6.0))]
    assert bars["seeds:ecoflap-zeroth-sparsegpt"] == [((0.7, 38.0), (0.7, 91.0))]
    assert "seeds:wanda · FT 30 steps" not in bars  # one seed: no bar


def test_dense_numbers_that_differ_are_one_row_per_run(tmp_path):
    out = write_grid(tmp_path / "runs", {R01: records_01(), R04: records_04(), R07: records_07(dense=41.0)})
    _, _, headline = runs.write_summary(out)
    t = table(headline, f"{MODEL} · {TASK} · {METRIC} by sparsity")
    assert t[f"dense [{R01}, {R04}]"]["0"] == "40.00 [30.00, 50.00]"
    assert t[f"dense [{R07}]"]["0"] == "41.00 [31.00, 51.00]"
    assert "dense" not in t
    ax = runs.summary_figure(runs.collect_results(out), MODEL, TASK, METRIC).axes[0]
    s = series(ax)
    assert s[f"dense [{R01}, {R04}]"][:2] == ([0.0], [40.0]) and s[f"dense [{R07}]"][:2] == ([0.0], [41.0])
    assert s["wanda"][:2] == ([0.3, 0.4, 0.5], [46.0, 4.0, 0.0])  # no single dense number to start from


def test_a_method_measured_by_two_runs_at_one_point_is_a_row_per_run(tmp_path):
    other = [rec("wanda", 0.3, v, seed=k, calib_samples=128) for k, v in enumerate((50.0, 52.0, 54.0))]
    out = write_grid(tmp_path / "runs", {R04: records_04(), "04_prune_blip2/more": other})
    t = table(runs.write_summary(out)[2], f"{MODEL} · {TASK} · {METRIC} by sparsity")
    assert t[f"wanda [{R04}]"]["0.3"].startswith("46.00 (44.00–48.00 over 3 seeds)")
    assert t["wanda [04_prune_blip2/more]"]["0.3"].startswith("52.00 (50.00–54.00 over 3 seeds)")
    # a run that repeats one of 04's seeds exactly: still its own row, and 04's row keeps its three seeds
    again = [rec("wanda", 0.3, 44.0, seed=0, calib_samples=64)]
    out = write_grid(tmp_path / "again", {R04: records_04(), "04_prune_blip2/seed0": again})
    t = table(runs.write_summary(out)[2], f"{MODEL} · {TASK} · {METRIC} by sparsity")
    assert t[f"wanda [{R04}]"]["0.3"].startswith("46.00 (44.00–48.00 over 3 seeds)")
    assert t[f"wanda [{R04}]"]["0.4"].startswith("4.00 (2.00–6.00 over 3 seeds)")
    assert t["wanda [04_prune_blip2/seed0]"] == {"0": "", "0.3": "44.00 [34.00, 54.00]", "0.4": "", "0.7": ""}


@pytest.mark.parametrize("bad, match", [
    ([rec("wanda", 0.3, 44.0, seed=0), rec("wanda", 0.3, 47.0, seed=0)],
     r"wanda at sparsity 0.3 \(run bad/run\): different records with the same seed 0"),
    ([rec("wanda", 0.3, 44.0, seed=0, seeds=[])],
     r"config.seeds is \[\]: give a non-empty list of distinct integer seeds"),
    ([rec("wanda", 0.3, 44.0, seed="one")], r"config.seed is 'one', not an integer"),
    ([rec("wanda", 0.3, 44.0, steps=30, finetuned=False)], r"config.finetuned is False but config.steps is 30"),
    ([rec("dense", 0.0, 40.0, eval={"scoring": "rank"}), rec("wanda", 0.3, 44.0, eval={"scoring": "generate"})],
     r"vqa_accuracy is measured differently"),
])
def test_a_grid_mixing_incompatible_records_is_a_one_line_error_before_anything_is_written(tmp_path, bad, match):
    out = write_grid(tmp_path / "runs", {R01: records_01(), "bad/run": bad})
    with pytest.raises(UserError, match=match) as e:
        runs.write_summary(out)
    assert "\n" not in str(e.value) and "bad/run" in str(e.value)
    assert not (out / "results.md").exists() and not (out / "figures").exists()


def test_the_cli_exits_with_code_2_on_an_incompatible_grid(tmp_path, capsys):
    """The runner's summary refuses the grid with one line on stderr and exit code 2 (the run itself was done)."""
    toy = Path(__file__).parent / "fixtures" / "toy_results.ipynb"
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"notebook: {toy}\ngrid: {{sparsity: [0.2]}}\n")
    out = tmp_path / "out"
    done = out / "toy_results" / "sparsity=0.2"
    write_grid(out, {"toy_results/sparsity=0.2": [rec("wanda", 0.2, 1.0, seed=0, seeds=[])]})
    (done / runs.STAMP).write_text("{}")
    assert main(["runs", str(grid), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "run toy_results/sparsity=0.2: config.seeds is []: give a non-empty list" in err
