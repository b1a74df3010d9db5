"""report.py's headline tables and the sentences the notebooks' closing sections print, on hand-made records."""
import math

import pandas as pd
import pytest

from ecoflap_utils import report
from ecoflap_utils.errors import UserError
from ecoflap_utils.report import compare, describe, headline_markdown, headline_table, save_headline, trend


def rec(method, sparsity, value, *, model="mini-clip", task="zeroshot", metric="acc1", interval=None, **config):
    r = {"model": model, "method": method, "sparsity": sparsity, "task": task, "metrics": {metric: value, "acc5": 99.0},
         "resources": {"fine": {"wall_s": 1.0}}, "config": config}
    if interval is not None:
        r["intervals"] = {metric: list(interval)}
    return r


SWEEP = [rec("dense", 0.0, 97.6), rec("wanda", 0.5, 97.4), rec("wanda", 0.7, 82.4),
         rec("ecoflap-zeroth", 0.5, 97.8), rec("ecoflap-zeroth", 0.7, 92.2)]


def test_compare_says_how_much_of_the_loss_is_kept_and_names_the_model():
    s = compare(SWEEP, a="ecoflap-zeroth", b="wanda", sparsity=0.7)
    assert s.startswith("On mini-clip (zeroshot, acc1, higher is better) at sparsity 0.7:")
    assert "ecoflap-zeroth 92.2, wanda 82.4, dense 97.6." in s
    assert "ecoflap-zeroth keeps 9.8 of the 15.2 points wanda loses." in s
    assert s.endswith("No clear difference between ecoflap-zeroth and wanda: no item intervals were recorded; "
                      "the spread over seeds is not measured (one seed each).")


def test_compare_at_one_seed_never_claims_a_difference():
    """Item intervals apart are not enough: with one seed the spread over seeds is unknown (issue 18)."""
    apart = [rec("dense", 0.0, 97.6), rec("wanda", 0.7, 82.4, interval=(80.0, 85.0)),
             rec("ecoflap-zeroth", 0.7, 92.2, interval=(90.0, 94.0))]
    s = compare(apart, a="ecoflap-zeroth", b="wanda", sparsity=0.7)
    assert "ecoflap-zeroth 92.2 [90, 94], wanda 82.4 [80, 85]" in s
    assert s.endswith("No clear difference between ecoflap-zeroth and wanda: their 95 % item intervals do not "
                      "overlap; the spread over seeds is not measured (one seed each).")
    overlap = [rec("dense", 0.0, 97.6), rec("wanda", 0.7, 82.4, interval=(78.0, 88.0)),
               rec("ecoflap-zeroth", 0.7, 85.0, interval=(80.0, 90.0))]
    s = compare(overlap, a="ecoflap-zeroth", b="wanda", sparsity=0.7)
    assert "their 95 % item intervals overlap;" in s and " differ:" not in s
    one_sided = [rec("wanda", 0.7, 82.4, interval=(80.0, 85.0)), rec("ecoflap-zeroth", 0.7, 92.2)]
    assert "no item intervals were recorded" in compare(one_sided, a="ecoflap-zeroth", b="wanda", sparsity=0.7)


def test_compare_with_a_missing_method_or_sparsity_says_so():
    s = compare(SWEEP, a="ecoflap-first", b="wanda", sparsity=0.7)
    assert s == ("On mini-clip (zeroshot): no 'ecoflap-first' record with acc1 at sparsity 0.7, so ecoflap-first "
                 "and wanda are not compared there.")
    assert "no 'ecoflap-zeroth' and no 'wanda' record" in compare(SWEEP, a="ecoflap-zeroth", b="wanda", sparsity=0.6)
    assert compare([], a="x", b="y", sparsity=0.5) == "No records to compare."


def test_compare_lower_is_better_worse_and_no_loss_cases():
    ppl = [rec("dense", 0.0, 17.3, task="perplexity", metric="perplexity"),
           rec("wanda", 0.7, 1125.0, task="perplexity", metric="perplexity"),
           rec("ecoflap-zeroth", 0.7, 409.0, task="perplexity", metric="perplexity"),
           rec("sparsegpt", 0.7, 1500.0, task="perplexity", metric="perplexity")]
    s = compare(ppl, a="ecoflap-zeroth", b="wanda", sparsity=0.7)
    assert "(perplexity, perplexity, lower is better)" in s and "keeps 716 of the 1108 points wanda loses" in s
    assert "sparsegpt loses 375 points more than wanda, which loses 1108." in compare(ppl, a="sparsegpt", b="wanda",
                                                                                      sparsity=0.7)
    no_loss = [rec("dense", 0.0, 97.6), rec("wanda", 0.5, 97.7), rec("ecoflap-zeroth", 0.5, 97.3)]
    assert "wanda loses nothing against dense; ecoflap-zeroth is 0.4 worse." in compare(
        no_loss, a="ecoflap-zeroth", b="wanda", sparsity=0.5)
    assert "ecoflap-zeroth keeps all 0.2 points wanda loses and ends 0.2 better than dense." in compare(
        SWEEP, a="ecoflap-zeroth", b="wanda", sparsity=0.5)
    tie = [rec("wanda", 0.5, 97.7), rec("ecoflap-zeroth", 0.5, 97.7)]
    assert "ecoflap-zeroth scores the same as wanda. No clear difference" in compare(tie, a="ecoflap-zeroth", b="wanda",
                                                                               sparsity=0.5)
    better_than_dense = [rec("dense", 0.0, 90.0), rec("wanda", 0.5, 80.0), rec("x", 0.5, 95.0)]
    assert "x keeps all 10 points wanda loses and ends 5 better than dense." in compare(
        better_than_dense, a="x", b="wanda", sparsity=0.5)


def test_compare_by_a_config_entry_and_per_model():
    agree = [rec("zeroth", 0.0, 0.85, task="score_agreement", metric="spearman", samples=8),
             rec("jvp", 0.0, 0.80, task="score_agreement", metric="spearman", samples=8),
             rec("zeroth", 0.0, 0.1, task="score_agreement", metric="spearman", samples=32)]
    s = compare(agree, a="zeroth", b="jvp", by="samples", at=8)
    assert s.startswith("On mini-clip (score_agreement, spearman, higher is better) at samples 8: zeroth 0.85, jvp 0.8.")
    assert "zeroth is 0.05 better than jvp." in s
    two = SWEEP + [rec("wanda", 0.7, 50.0, model="tiny-clip"), rec("ecoflap-zeroth", 0.7, 40.0, model="tiny-clip")]
    lines = compare(two, a="ecoflap-zeroth", b="wanda", sparsity=0.7).splitlines()
    assert [ln.split(" (")[0] for ln in lines] == ["On mini-clip", "On tiny-clip"]
    assert "ecoflap-zeroth is 10 worse than wanda." in lines[1]
    ds = [rec("wanda", 0.7, 80.0, dataset="a"), rec("wanda", 0.7, 70.0, dataset="b"),
          rec("sparsegpt", 0.7, 90.0, dataset="a"), rec("sparsegpt", 0.7, 60.0, dataset="b")]
    with pytest.raises(ValueError, match="where="):
        compare(ds, a="sparsegpt", b="wanda", sparsity=0.7)
    assert "On mini-clip (zeroshot, dataset b, acc1" in compare(ds, a="sparsegpt", b="wanda", sparsity=0.7,
                                                                 where={"dataset": "b"})


def test_trend_and_describe_name_the_model():
    assert trend(SWEEP, "wanda") == "On mini-clip (zeroshot), wanda's acc1: 97.4 at sparsity 0.5, 82.4 at sparsity 0.7."
    assert describe(SWEEP, "dense") == "On mini-clip (zeroshot at sparsity 0), dense: acc1 97.6, acc5 99."
    assert "no 'owl' record" in describe(SWEEP, "owl")


def test_headline_table_is_the_records_pivoted():
    t = headline_table(SWEEP)
    assert t.attrs == {"model": "mini-clip", "task": "zeroshot", "metric": "acc1"}
    assert list(t.index) == ["dense", "wanda", "ecoflap-zeroth"] and list(t.columns) == ["0", "0.5", "0.7"]
    for r in SWEEP:
        assert t.loc[r["method"], f"{r['sparsity']:g}"] == r["metrics"]["acc1"]
    assert math.isnan(t.loc["dense", "0.5"])
    assert list(headline_table(SWEEP, "acc5").loc["wanda"]) == [pytest.approx(float("nan"), nan_ok=True), 99.0, 99.0]


def test_headline_table_with_intervals_and_markdown_cells():
    recs = [rec("dense", 0.0, 97.6), rec("wanda", 0.7, 82.4, interval=(80.0, 85.0))]
    t = headline_table(recs)
    assert list(t.columns) == ["0", "0.7", "0.7 low", "0.7 high"]
    assert list(t.loc["wanda", ["0.7", "0.7 low", "0.7 high"]]) == [82.4, 80.0, 85.0]
    md = headline_markdown(recs)
    assert md.splitlines()[0] == "### mini-clip · zeroshot · acc1 by sparsity"
    assert "| wanda  |       | 82.40 [80.00, 85.00] |" in md


def test_headline_table_by_samples_by_metric_and_by_dataset():
    agree = [rec("zeroth", 0.0, 0.85, task="score_agreement", metric="spearman", samples=8),
             rec("zeroth", 0.0, 0.1, task="score_agreement", metric="spearman", samples=32)]
    t = headline_table(agree, columns="samples")
    assert t.attrs["metric"] == "spearman" and list(t.columns) == ["8", "32"]
    alloc = [{"model": "m", "method": "ecoflap", "sparsity": 0.6, "task": "allocation",
              "metrics": {"min_sparsity": 0.34, "max_sparsity": 0.66}, "config": {}}]
    t = headline_table(alloc, columns="metric")
    assert list(t.columns) == ["min_sparsity", "max_sparsity"] and t.loc["ecoflap", "max_sparsity"] == 0.66
    ds = [rec("wanda", 0.7, 80.0, dataset="a"), rec("wanda", 0.7, 70.0, dataset="b")]
    with pytest.raises(ValueError, match="rows="):
        headline_table(ds)
    t = headline_table(ds, rows=("dataset", "method"))
    assert t.loc["b · wanda", "0.7"] == 70.0
    two = SWEEP + [rec("wanda", 0.7, 50.0, model="tiny-clip")]
    assert headline_table(two).index.names == ["model", "task", "metric", "method"]


def test_headline_markdown_of_a_results_frame_labels_runs_that_measure_the_same_point():
    frame = pd.DataFrame([
        {"run": "a", "model": "m", "method": "dense", "sparsity": 0.0, "task": "t", "acc": 1.0},
        {"run": "a", "model": "m", "method": "wanda", "sparsity": 0.5, "task": "t", "acc": 0.5},
        {"run": "b", "model": "m", "method": "wanda", "sparsity": 0.5, "task": "t", "acc": 0.4},
        {"run": "b", "model": "m", "method": "wanda", "sparsity": 0.6, "task": "t", "acc": 0.3},
        {"run": "c", "model": "m", "method": "only-one", "sparsity": 0.0, "task": "u", "acc": 0.3}])
    md = headline_markdown(frame, min_columns=2)
    same_run = pd.concat([frame, frame.iloc[[3]].assign(acc=0.2)])  # one run, one method, one point, twice
    with pytest.raises(UserError, match=r"wanda \[b\] at sparsity 0.6 \(run b\): 2 different records, not all "
                                        r"with config.seed"):
        headline_markdown(same_run, min_columns=2)  # not "keep the last": that hid what was measured (issue 18)
    assert "| wanda [b] |      | 0.40 | 0.30 |" in headline_markdown(pd.concat([frame, frame.iloc[[3]]]),
                                                                     min_columns=2)  # a repeat counts once
    assert "### m · u" not in md  # a single sparsity: left out of the batch runner's headline
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines() if ln.startswith("|")]
    assert rows[0] == ["method", "0", "0.5", "0.6"]
    assert rows[2:] == [["dense", "1.00", "", ""], ["wanda [a]", "", "0.50", ""], ["wanda [b]", "", "0.40", "0.30"]]


def test_save_headline_writes_what_the_notebook_prints(tmp_path):
    md = save_headline(SWEEP, tmp_path)
    assert (tmp_path / "headline.md").read_text() == md + "\n"
    (tmp_path / "results.json").write_text(__import__("json").dumps(SWEEP))
    assert report.load_records(tmp_path) == SWEEP
    csv = pd.read_csv(tmp_path / "headline.csv", index_col=0)
    assert csv.loc["ecoflap-zeroth", "0.7"] == 92.2
    assert report.MAIN_METRIC["zeroshot"] == "acc1"


# ----------------------------------------------------------------------------- seeds and kinds (issue 18)
def seeds(method, sparsity, values, *, half=2.0, **kw):
    """Records of one method and sparsity from seeds 0, 1, ...: ``values[k]`` with the interval value ± half."""
    return [rec(method, sparsity, v, interval=(v - half, v + half), seed=k, **kw) for k, v in enumerate(values)]


def test_compare_pools_seeds_and_a_gap_inside_their_spread_is_no_clear_difference():
    # item intervals apart ([89.5, 90.5] against [79.5, 80.5]) but the seeds overlap: 75-100 against 60-100
    inside = [rec("dense", 0.0, 97.6)] + seeds("ecoflap-zeroth", 0.7, [75.0, 95.0, 100.0], half=0.5) + seeds(
        "wanda", 0.7, [60.0, 80.0, 100.0], half=0.5)
    s = compare(inside, a="ecoflap-zeroth", b="wanda", sparsity=0.7)
    assert "ecoflap-zeroth 90 (75–100 over 3 seeds) [89.5, 90.5], wanda 80 (60–100 over 3 seeds) [79.5, 80.5]" in s
    assert "ecoflap-zeroth keeps 10 of the 17.6 points wanda loses." in s  # means over seeds
    assert s.endswith("No clear difference between ecoflap-zeroth and wanda: their 95 % item intervals do not "
                      "overlap; their ranges over seeds (3 and 3 seeds) overlap.")
    # outside both: every seed of one beats every seed of the other, and the mean item intervals are apart
    outside = seeds("ecoflap-zeroth", 0.7, [90.0, 92.0, 94.0]) + seeds("wanda", 0.7, [80.0, 81.0, 82.0])
    s = compare(outside, a="ecoflap-zeroth", b="wanda", sparsity=0.7)
    assert "ecoflap-zeroth 92 (90–94 over 3 seeds) [90, 94], wanda 81 (80–82 over 3 seeds) [79, 83]" in s
    assert s.endswith("ecoflap-zeroth and wanda differ: neither their 95 % item intervals nor their ranges over "
                      "seeds (3 and 3 seeds) overlap.")
    # seeds apart but the item intervals overlap: no clear difference either
    wide = seeds("ecoflap-zeroth", 0.7, [90.0, 92.0, 94.0], half=12.0) + seeds("wanda", 0.7, [80.0, 81.0, 82.0])
    assert "their 95 % item intervals overlap; their ranges over seeds (3 and 3 seeds) do not overlap." in compare(
        wide, a="ecoflap-zeroth", b="wanda", sparsity=0.7)
    # one side at one seed: not measured for that side
    single = seeds("ecoflap-zeroth", 0.7, [90.0, 92.0, 94.0]) + seeds("wanda", 0.7, [81.0])
    assert "the spread over seeds is not measured (one seed for wanda)." in compare(
        single, a="ecoflap-zeroth", b="wanda", sparsity=0.7)


def test_compare_never_pools_fine_tuned_with_one_shot_records_nor_two_of_one_seed():
    curve = [rec("wanda", 0.5, v, seed=0, steps=k, finetuned=k > 0, final=k != 15)
             for k, v in ((0, 0.0), (15, 71.0), (30, 78.0))]
    others = [rec("ecoflap-zeroth", 0.5, v, seed=0, steps=k, finetuned=k > 0, final=k != 15)
              for k, v in ((0, 1.0), (15, 61.0), (30, 76.0))]
    with pytest.raises(UserError, match=r"wanda at sparsity 0.5 mixes wanda, wanda · FT 15 steps \(curve point\), "
                                        r"wanda · FT 30 steps: pass where="):
        compare(curve + others, a="wanda", b="ecoflap-zeroth", sparsity=0.5)
    s = compare(curve + others, a="ecoflap-zeroth", b="wanda", sparsity=0.5, where={"steps": 30})
    assert "ecoflap-zeroth 76, wanda 78." in s
    assert "ecoflap-zeroth 1, wanda 0." in compare(curve + others, a="ecoflap-zeroth", b="wanda", sparsity=0.5,
                                                    where={"finetuned": False})
    twice = [rec("wanda", 0.5, 40.0, seed=1), rec("wanda", 0.5, 42.0, seed=1), rec("x", 0.5, 41.0, seed=1)]
    with pytest.raises(UserError, match="same seed 1: pass where="):
        compare(twice, a="x", b="wanda", sparsity=0.5)


@pytest.mark.parametrize("config, match", [
    ({"seed": "a"}, r"config.seed is 'a', not an integer"),
    ({"seed": 1.5}, r"config.seed is 1.5, not an integer"),
    ({"seed": True}, r"config.seed is True, not an integer"),
    ({"seed": 0, "seeds": []}, r"config.seeds is \[\]: give a non-empty list of distinct integer seeds"),
    ({"seed": 0, "seeds": [0, "x"]}, r"config.seeds holds 'x', not an integer: give a non-empty list"),
    ({"seed": 0, "seeds": [0, 0]}, r"config.seeds is \[0, 0\], which repeats a seed"),
    ({"seed": 3, "seeds": [0, 1, 2]}, r"config.seed 3 is not in config.seeds \[0, 1, 2\]"),
    ({"finetuned": True, "steps": 0}, r"config.finetuned is True but config.steps is 0"),
    ({"steps": -1}, r"config.steps is -1"),
    ({"final": "yes"}, r"config.final is 'yes', not true or false"),
])
def test_bad_seed_and_kind_fields_are_one_line_user_errors(config, match):
    bad = [rec("dense", 0.0, 97.6), rec("wanda", 0.5, 90.0, **config)]
    with pytest.raises(UserError, match=match) as e:
        headline_table(bad)
    assert "\n" not in str(e.value) and "record 1 ('wanda')" in str(e.value)


@pytest.mark.parametrize("seeds, match", [([], r"SEEDS is \[\]"), ((0, 1.5), r"SEEDS holds 1.5"),
                                          ("0,1", r"SEEDS is '0,1'"), ([0, True], r"SEEDS holds True"),
                                          ([2, 2], r"repeats a seed")])
def test_check_seeds_refuses_what_is_not_a_list_of_distinct_integers(seeds, match):
    from ecoflap_utils.records import check_seeds

    with pytest.raises(UserError, match=match):
        check_seeds(seeds)
    assert check_seeds([2, 0, 1.0]) == [2, 0, 1]


def test_headline_table_shows_the_mean_and_range_over_seeds_beside_the_item_interval():
    recs = [rec("dense", 0.0, 97.6)] + seeds("wanda", 0.7, [80.0, 82.0, 84.0]) + [rec("sparsegpt", 0.7, 90.0)]
    t = headline_table(recs)
    assert list(t.columns) == ["0", "0.7", "0.7 low", "0.7 high", "0.7 seed min", "0.7 seed max", "0.7 seeds"]
    assert list(t.loc["wanda"]) == [pytest.approx(float("nan"), nan_ok=True), 82.0, 80.0, 84.0, 80.0, 84.0, 3]
    assert t.loc["sparsegpt", "0.7 seeds"] == 1 and t.loc["sparsegpt", "0.7 seed min"] == 90.0
    md = headline_markdown(recs)
    assert "| wanda     |       | 82.00 (80.00–84.00 over 3 seeds) [80.00, 84.00] |" in md
    assert md.endswith(report.SEEDS_NOTE)
    assert trend(recs, "wanda") == ("On mini-clip (zeroshot), wanda's acc1: 82 (80–84 over 3 seeds) [80, 84] at "
                                    "sparsity 0.7.")


def test_fine_tuned_records_are_their_own_rows_and_curve_points_are_left_out():
    curve = [rec("wanda", 0.5, v, seed=0, steps=k, finetuned=k > 0, final=k != 15)
             for k, v in ((0, 0.0), (15, 71.0), (30, 78.0))]
    recs = [rec("dense", 0.0, 40.0), rec("wanda", 0.3, 46.0, seed=0)] + curve
    t = headline_table(recs, rows=("label",))
    assert list(t.index) == ["dense", "wanda", "wanda · FT 30 steps"] and t.index.name == "method"
    assert list(t.loc["wanda", ["0.3", "0.5"]]) == [46.0, 0.0]
    assert math.isnan(t.loc["wanda · FT 30 steps", "0.3"]) and t.loc["wanda · FT 30 steps", "0.5"] == 78.0
    with pytest.raises(UserError, match=r"wanda at sparsity 0.5 mixes wanda, wanda · FT 30 steps: .*rows="):
        headline_table(recs)  # rows=("method",) cannot tell them apart: refused, not one of them kept


def test_records_measuring_a_metric_differently_are_refused():
    recs = [rec("dense", 0.0, 97.6, eval={"num_beams": 1, "scoring": "generate"}),
            rec("wanda", 0.5, 90.0, eval={"num_beams": 1, "scoring": "rank"})]
    with pytest.raises(UserError, match=r"mini-clip · zeroshot: acc1 is measured differently by the record 0 "
                                        r"\('dense'\) .* and the record 1 \('wanda'\)"):
        headline_table(recs)
    same = [recs[0], rec("wanda", 0.5, 90.0, eval={"num_beams": 1, "scoring": "generate"}), rec("x", 0.5, 80.0)]
    assert list(headline_table(same).index) == ["dense", "wanda", "x"]  # no eval entry: taken to agree
