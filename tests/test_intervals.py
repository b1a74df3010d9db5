"""95 % bootstrap intervals (intervals.py), the per-item scores behind them, and how records, tables and
figures carry them. The evaluators' own intervals are checked in test_evaluate.py, the sweep's records in
test_experiments.py."""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure

from ecoflap_utils import intervals as I
from ecoflap_utils import metrics as M
from ecoflap_utils import plots, runs
from ecoflap_utils.evaluate import (caption_item_scores, clean_intervals, item_interval, results_record,
                                    retrieval_interval, retrieval_item_recalls, score_captions, score_vqa,
                                    vqa_item_scores)
from ecoflap_utils.experiments import record
from ecoflap_utils.records import interval_bounds, records_frame


def _percentile(sorted_stats, q):
    """Linear-interpolation percentile written out (numpy's default method)."""
    pos = q / 100 * (len(sorted_stats) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_stats) - 1)
    return sorted_stats[lo] + (pos - lo) * (sorted_stats[hi] - sorted_stats[lo])


def _loop_bootstrap(n, stat_of_rows, n_boot, seed, level=0.95):
    """The documented draws (row b of default_rng(seed).integers(0, n, (n_boot, n))), one resample at a time."""
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    stats = sorted(stat_of_rows([int(j) for j in row]) for row in draws)
    tail = 100 * (1 - level) / 2
    return _percentile(stats, tail), _percentile(stats, 100 - tail)


# ------------------------------------------------------------------------------------------- bootstrap_ci
def test_bootstrap_ci_equals_a_loop_over_the_same_draws():
    values = np.random.default_rng(5).normal(3.0, 2.0, size=37)
    got = I.bootstrap_ci(values, n_boot=300, seed=7)
    want = _loop_bootstrap(37, lambda row: sum(values[j] for j in row) / len(row), 300, 7)
    assert got == pytest.approx(want, rel=1e-12)
    assert I.bootstrap_ci(values, n_boot=300, seed=7, level=0.8) == pytest.approx(
        _loop_bootstrap(37, lambda row: sum(values[j] for j in row) / len(row), 300, 7, level=0.8), rel=1e-12)
    # a statistic without axis= is applied row by row, with the same draws
    med = I.bootstrap_ci(values, statistic=lambda r: float(np.median(r)), n_boot=300, seed=7)
    assert med == pytest.approx(_loop_bootstrap(37, lambda row: float(np.median(values[row])), 300, 7))
    assert I.bootstrap_ci(values, statistic=np.median, n_boot=300, seed=7) == pytest.approx(med)


def test_bootstrap_ci_is_seeded_and_blocks_do_not_change_it(monkeypatch):
    values = np.random.default_rng(0).random(500)
    a = I.bootstrap_ci(values)
    assert a == I.bootstrap_ci(values)  # seed 0 by default: identical
    assert a != I.bootstrap_ci(values, seed=1)
    monkeypatch.setattr(I, "_BLOCK_CELLS", 1234)  # a few rows per block
    assert I.bootstrap_ci(values) == pytest.approx(a, rel=1e-12)


def test_bootstrap_ci_known_cases():
    assert I.bootstrap_ci([70.0] * 50) == (70.0, 70.0)  # all equal: zero width
    assert I.bootstrap_ci([4.0]) == (4.0, 4.0)
    # a Bernoulli sample: the interval holds the mean and is close to the normal approximation
    rng = np.random.default_rng(3)
    x = 100.0 * (rng.random(4000) < 0.3)
    lo, hi = I.bootstrap_ci(x, n_boot=2000)
    p = x.mean() / 100
    half = 100 * I.proportion_halfwidth(p, x.size)
    assert lo < x.mean() < hi
    assert lo == pytest.approx(x.mean() - half, abs=0.3) and hi == pytest.approx(x.mean() + half, abs=0.3)
    assert 100 * I.proportion_halfwidth(0.5, 100) == pytest.approx(9.80, abs=0.01)
    assert 100 * I.proportion_halfwidth(0.5, 1000) == pytest.approx(3.10, abs=0.01)


def test_bootstrap_is_fast():
    x = np.random.default_rng(0).random(1000)
    I.bootstrap_ci(x)
    t = time.perf_counter()
    I.bootstrap_ci(x)
    assert time.perf_counter() - t < 0.5  # typically 10-30 ms


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="empty"):
        I.bootstrap_ci([])
    with pytest.raises(ValueError, match="NaN"):
        I.bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        I.bootstrap_ci([1.0, 2.0], level=95)
    with pytest.raises(ValueError, match="n_boot"):
        I.bootstrap_ci([1.0, 2.0], n_boot=0)
    with pytest.raises(ValueError, match="one of each"):
        I.ratio_bootstrap_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive"):
        I.ratio_bootstrap_ci([1.0, 2.0], [1.0, 0.0])


# --------------------------------------------------------------------------------------- ratio / perplexity
def test_perplexity_interval_equals_a_loop_over_windows():
    rng = np.random.default_rng(2)
    tokens = rng.integers(20, 64, size=25).astype(float)
    nll = tokens * rng.uniform(1.5, 3.5, size=25)
    got = I.perplexity_ci(nll, tokens, n_boot=400, seed=3)
    want = _loop_bootstrap(25, lambda row: math.exp(sum(nll[j] for j in row) / sum(tokens[j] for j in row)), 400, 3)
    assert got == pytest.approx(want, rel=1e-12)
    assert got[0] < math.exp(nll.sum() / tokens.sum()) < got[1]
    plain = I.ratio_bootstrap_ci(nll, tokens, n_boot=400, seed=3)  # no transform: the mean NLL per token
    # equal up to the linear interpolation between neighbouring resamples (exp is not linear)
    assert got == pytest.approx((math.exp(plain[0]), math.exp(plain[1])), rel=1e-6)


# --------------------------------------------------------------------------------------- comparing
def test_overlap_differs_and_reading_records():
    assert I.intervals_overlap([1, 3], [2, 4]) and I.intervals_overlap([1, 2], [2, 4])  # touching overlaps
    assert not I.intervals_overlap([1, 2], [2.5, 4]) and not I.intervals_overlap((5, 6), (1, 2))
    a = {"metrics": {"acc1": 70.0}, "intervals": {"acc1": [66.0, 74.0]}}
    b = {"metrics": {"acc1": 60.0}, "intervals": {"acc1": [55.0, 65.0]}}
    c = {"metrics": {"acc1": 68.0}, "intervals": {"acc1": [62.0, 72.0]}}
    assert I.differs(a, b, "acc1") and not I.differs(a, c, "acc1")
    assert not I.differs(a, {"metrics": {"acc1": 10.0}}, "acc1")  # no interval: no claim
    assert I.interval_of(a, "acc1") == (66.0, 74.0) and I.interval_of(a, "acc5") is None
    assert I.interval_of({"acc1.ci_low": 1.0, "acc1.ci_high": 2.0}, "acc1") == (1.0, 2.0)
    assert I.format_interval(71.2, [68.4, 74.0]) == "71.20 [68.40, 74.00]"
    assert I.format_interval(71.2, None) == "71.20"
    with pytest.raises(ValueError):
        I.intervals_overlap([1, 2], "x")


# --------------------------------------------------------------------------------------- per-item scores
def test_item_scores_average_to_the_headline_metrics():
    preds = ["two", "yes", "a dog", "7", "blue"]
    answers = [["2"] * 10, ["yes"] * 3 + ["no"] * 7, ["dog"] * 2 + ["cat"] * 8, ["seven"] * 10, ["blue"] * 10]
    items = vqa_item_scores(preds, answers)
    assert items.tolist() == pytest.approx([100 * M.vqa_score(p, a) for p, a in zip(preds, answers)])
    assert items.mean() == pytest.approx(score_vqa(preds, answers))
    em = vqa_item_scores(["The cat", "dog"], ["cat", "cat"], metric="exact_match")
    assert em.tolist() == [100.0, 0.0] and em.mean() == pytest.approx(score_vqa(["The cat", "dog"], ["cat", "cat"],
                                                                                  metric="exact_match"))
    caps = ["a man riding a horse", "two dogs in snow", "a red car", "nothing here"]
    refs = [["a man rides a horse", "a person on a horse"], ["two dogs play in the snow"], ["a red car parked"],
            ["a bowl of fruit"]]
    per = caption_item_scores(caps, refs)
    assert per.mean() == pytest.approx(score_captions(caps, refs)["cider"])  # corpus CIDEr-D = mean of per image
    iv = item_interval(per, score_captions(caps, refs)["cider"], "cider")
    assert iv["cider"][0] <= per.mean() <= iv["cider"][1]
    assert item_interval([50.0], 50.0, "acc1") == {}  # one item: no interval
    with pytest.warns(RuntimeWarning, match="no interval for acc1"):
        assert item_interval([0.0, 100.0], 20.0, "acc1") == {}  # not the headline's items: none


def test_retrieval_item_recalls_reproduce_mean_recall_with_ties():
    rng = np.random.default_rng(4)
    n_img, per = 12, 3
    sim = np.round(rng.normal(size=(n_img, n_img * per)), 1)  # rounded: many ties
    txt2img = [i for i in range(n_img) for _ in range(per)]
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    ref = M.retrieval_recall(sim, txt2img, img2txt)
    i2t, t2i = retrieval_item_recalls(sim, txt2img, img2txt)
    assert i2t.mean() == pytest.approx(ref["i2t_mean"]) and t2i.mean() == pytest.approx(ref["t2i_mean"])
    iv = retrieval_interval(sim, txt2img, img2txt, ref["mean_recall"])["mean_recall"]
    assert iv[0] <= ref["mean_recall"] <= iv[1] and iv[0] < iv[1]
    # images resampled with their captions, written out as a loop
    t2i_by_img = [[t2i[t] for t in img2txt[i]] for i in range(n_img)]

    def stat(row):
        caps = [v for j in row for v in t2i_by_img[j]]
        return (sum(i2t[j] for j in row) / len(row) + sum(caps) / len(caps)) / 2

    assert iv == pytest.approx(list(_loop_bootstrap(n_img, stat, I.N_BOOT, I.SEED)), rel=1e-12)


# --------------------------------------------------------------------------------------- records
def test_records_carry_intervals_only_when_there_are_some():
    rec = record("m", "wanda", 0.5, "zeroshot", {"acc1": 70.0}, intervals={"acc1": (66.0, 74.0)})
    assert list(rec) == ["model", "method", "sparsity", "task", "metrics", "intervals", "resources", "config"]
    assert rec["intervals"] == {"acc1": [66.0, 74.0]}
    assert "intervals" not in record("m", "wanda", 0.5, "zeroshot", {"acc1": 70.0})
    assert "intervals" not in record("m", "wanda", 0.5, "zeroshot", {"acc1": 70.0}, intervals={})
    res = {"vqa_accuracy": 40.0, "n": 100, "intervals": {"vqa_accuracy": [31.0, 49.5]}, "predictions": []}
    assert results_record("m", "dense", 0.0, "vqav2", res)["intervals"] == {"vqa_accuracy": [31.0, 49.5]}
    assert clean_intervals({"a": [1, 2], "b": "x", "c": [float("nan"), 1]}) == {"a": [1.0, 2.0]}
    json.dumps(rec)  # plain JSON
    with pytest.raises(Exception, match=r"intervals\.acc1 must be \[low, high\]"):
        runs.check_results({**rec, "intervals": {"acc1": [1.0]}})
    assert runs.check_results(rec)[0]["intervals"] == {"acc1": [66.0, 74.0]}


def _records():
    vals = {"wanda": (80.0, 70.0, 50.0), "sparsegpt": (82.0, 75.0, 60.0)}
    recs = [record("toy", "dense", 0.0, "zeroshot", {"acc1": 90.0, "acc5": 99.0},
                   intervals={"acc1": [86.0, 93.5]})]
    for m, vs in vals.items():
        for s, v in zip((0.5, 0.6, 0.7), vs):
            recs.append(record("toy", m, s, "zeroshot", {"acc1": v, "acc5": v + 10},
                               intervals={"acc1": [v - 4.0, v + 3.0]}))
    return recs


def test_frame_tables_and_summary_show_the_intervals(tmp_path):
    recs = _records()
    df = records_frame(recs, runs=[f"r{i}" for i in range(len(recs))])
    assert json.loads(df.loc[1, "intervals.acc1"]) == [76.0, 83.0]
    low, high = interval_bounds(df, "acc1")
    assert low.tolist()[:2] == [86.0, 76.0] and high.tolist()[:2] == [93.5, 83.0]
    assert interval_bounds(df, "acc5") is None
    assert runs.metric_columns(df) == ["acc1", "acc5"]  # the interval column is not a metric
    files, figures, headline = runs.write_summary(tmp_path, runs.sort_results(df))
    text = (tmp_path / "results.md").read_text()
    assert "90.00 [86.00, 93.50]" in headline and "80.00 [76.00, 83.00]" in headline
    full = text.split("## All records")[1]
    assert "80.0000 [76.0000, 83.0000]" in full and "| 90.0000 [86.0000, 93.5000]" in full
    assert [p.name for p in figures] == ["toy_zeroshot_acc1.png", "toy_zeroshot_acc5.png"]
    csv = pd.read_csv(tmp_path / "results.csv")
    assert json.loads(csv.loc[csv["method"] == "dense", "intervals.acc1"].iloc[0]) == [86.0, 93.5]


def _fig():
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def test_metric_vs_sparsity_draws_error_bars_from_intervals():
    recs = _records()
    fig, ax = _fig()
    plots.metric_vs_sparsity(ax, recs, "acc1")
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 3  # one per method, one for the dense star
    wanda = bars[0].lines[2][0].get_segments()
    assert [(s[0][0], s[0][1], s[1][1]) for s in wanda] == [(0.5, 76.0, 83.0), (0.6, 66.0, 73.0), (0.7, 46.0, 53.0)]
    dense = bars[2].lines[2][0].get_segments()
    assert [(s[0][0], s[0][1], s[1][1]) for s in dense] == [(0.0, 86.0, 93.5)]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["wanda", "sparsegpt", "dense"]
    assert list(ax.get_lines()[0].get_ydata()) == [90.0, 80.0, 70.0, 50.0]  # the lines come first
    # no intervals: no bars
    fig, ax = _fig()
    plots.metric_vs_sparsity(ax, recs, "acc5")
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
