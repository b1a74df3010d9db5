"""Recovery curves (prune, evaluate, masked fine-tuning with held-out evaluations) and the paper-table assembly."""
import math

import pytest
import torch

from ecoflap_utils import load_model, recovery, report
from ecoflap_utils.recovery import (PAPER_COLUMNS, curve_frame, end_frame, final_records, labelled, recovery_curves,
                                    upop_table)

KEYS = {"model", "method", "sparsity", "task", "metrics", "resources", "config"}


def _weights(a):
    return {k: v.detach().clone() for k, v in a.model.state_dict().items()}


@pytest.mark.parametrize("name,stacks", [("tiny-blip2-opt", ["qformer", "lm"]),
                                         ("tiny-blip2-t5", ["qformer", "text_decoder"])])
def test_curves_are_well_formed_and_keep_the_zeros(name, stacks):
    a = load_model(name)
    before = _weights(a)
    recs = recovery_curves(a, methods=["wanda", "ecoflap-zeroth"], sparsities=[0.5], steps=4, eval_every=2, lr=1e-3,
                           stacks=stacks, eval_limit=8, batch_size=4, calib_samples=8, first_stage_samples=8,
                           progress=False)
    # the model is put back after the curves
    assert all(torch.equal(v, _weights(a)[k]) for k, v in before.items())
    assert recs[0]["method"] == "dense"
    for r in recs:
        assert KEYS <= set(r) and all(math.isfinite(v) for v in r["metrics"].values())
        assert "vqa_accuracy" in r["metrics"]
    curves = [r for r in recs if r["method"] != "dense"]
    for m in ("wanda", "ecoflap-zeroth"):
        steps = [r["config"]["steps"] for r in curves if r["method"] == m]
        assert steps == [0, 2, 4]
    for r in curves:
        c = r["config"]
        assert c["stacks"] == stacks and c["trained"] == "+".join(stacks)
        assert c["finetuned"] == (c["steps"] > 0) and c["final"] == (c["steps"] in (0, 4))
        if c["finetuned"]:
            ft = r["resources"]["finetune"]
            assert ft["kept_zeros"] > 0 and ft["seconds_per_step"] > 0  # pruned LM weights were masked
            assert "vqa_accuracy" in r.get("intervals", {})
    # end points, labelled for report.compare
    ends = labelled(recs)
    assert [r["method"] for r in ends] == ["dense", "wanda · no FT", "wanda · FT", "ecoflap-zeroth · no FT",
                                           "ecoflap-zeroth · FT"]
    assert name in report.compare(ends, a="wanda · FT", b="wanda · no FT", sparsity=0.5)
    frame = curve_frame(recs)
    assert len(frame) == 6 and set(frame["steps"]) == {0, 2, 4}


def test_revived_zeros_fail_the_pattern_check(monkeypatch):
    """The zero-pattern assertion means something: dense fine-tuning (masks={}) trips it."""
    a = load_model("tiny-blip2-opt")
    real = recovery.finetune
    monkeypatch.setattr(recovery, "finetune", lambda *args, **kw: real(*args, masks={}, **kw))
    with pytest.raises(AssertionError, match="revived"):
        recovery_curves(a, methods=["wanda"], sparsities=[0.5], steps=3, eval_every=None, lr=1e-2,
                        stacks=["lm"], eval_limit=4, batch_size=4, calib_samples=8, include_dense=False,
                        progress=False)


def _rec(method, sparsity, acc, *, steps=0, final=True, iv=None, trained="qformer", seed=None):
    r = {"model": "toy-vlm", "method": method, "sparsity": sparsity, "task": "vqav2",
         "metrics": {"vqa_accuracy": acc}, "resources": {},
         "config": {} if method == "dense" else {"steps": steps, "finetuned": steps > 0, "final": final,
                                                 "trained": trained, "stacks": trained.split("+")}}
    if seed is not None:
        r["config"]["seed"] = seed
    if iv:
        r["intervals"] = {"vqa_accuracy": iv}
    return r


def test_upop_table_on_hand_made_records():
    recs = [_rec("dense", 0.0, 98.0, iv=[96.0, 99.5]),
            _rec("wanda", 0.5, 0.0), _rec("wanda", 0.5, 50.0, steps=20, final=False), _rec("wanda", 0.5, 90.0, steps=40),
            _rec("ecoflap-zeroth", 0.5, 2.0), _rec("ecoflap-zeroth", 0.5, 93.0, steps=40, iv=[90.0, 95.0]),
            _rec("ecoflap-zeroth", 0.5, 95.0, steps=40, trained="qformer+lm"),
            _rec("wanda", 0.7, 0.0)]
    t = upop_table(recs, trained="qformer")
    assert list(t.columns) == ["source", *PAPER_COLUMNS]
    paper = t.loc["(a) paper"]
    assert paper.loc["UPop (w/ fine-tuning)", "source"] == "reported, not run"
    assert paper.loc["ECoFLaP (w/ fine-tuning)", "VQA test-dev"] == "76.7"
    assert paper.loc["Full model", "COCO CIDEr/SPICE"] == "133.3/23.8"
    ours = t.loc["(b) this run"]
    assert ours.loc["Full model (dense)", "VQA test-dev"] == "98.0 [96.0, 99.5]"
    assert ours.loc["Wanda (w/o fine-tuning)", "VQA test-dev"] == "0.0"
    assert ours.loc["Wanda (w/ fine-tuning)", "VQA test-dev"] == "90.0"  # the curve's end, not step 20
    assert ours.loc["ECoFLaP (w/ fine-tuning)", "VQA test-dev"] == "93.0 [90.0, 95.0]"  # the Q-Former-only curve
    assert "toy-vlm" in ours.loc["ECoFLaP (w/ fine-tuning)", "source"]
    # a method that was not run says so
    missing = upop_table([_rec("dense", 0.0, 98.0)]).loc["(b) this run"]
    assert missing.loc["ECoFLaP (w/ fine-tuning)", "VQA test-dev"] == "not run"
    assert len(final_records(recs, finetuned=True)) == 4  # dense and the three curve ends


def test_upop_table_pools_the_seeds_of_a_point():
    recs = [_rec("dense", 0.0, 98.0), *[_rec("wanda", 0.5, v, steps=30, seed=k, iv=[v - 4, v + 2])
                                        for k, v in enumerate([80.0, 84.0, 86.0])]]
    ours = upop_table(recs).loc["(b) this run"]
    assert ours.loc["Wanda (w/ fine-tuning)", "VQA test-dev"] == "83.3 (80.0–86.0 over 3 seeds) [79.3, 85.3]"
    assert "min–max over seeds" in ours.loc["Wanda (w/ fine-tuning)", "source"]


def test_seeds_measure_every_end_point_and_the_first_seed_s_curve():
    """recovery_curves(seeds=...): the dense model once; each seed prunes and fine-tunes its own curve (its
    calibration and its batches); every curve is evaluated at step 0 and at its end, the first seed's also in
    between; end_frame and report.compare pool the end points over the seeds."""
    a = load_model("tiny-blip2-opt")
    recs = recovery_curves(a, methods=["wanda", "ecoflap-zeroth"], sparsities=[0.5], steps=2, eval_every=1, lr=1e-3,
                           seeds=[0, 1], eval_limit=8, batch_size=4, calib_samples=8, first_stage_samples=8,
                           progress=False)
    assert [r["method"] for r in recs].count("dense") == 1 and recs[0]["method"] == "dense"
    assert [(r["method"], r["config"]["seed"], r["config"]["steps"]) for r in recs[1:]] == [
        ("wanda", 0, 0), ("wanda", 0, 1), ("wanda", 0, 2), ("ecoflap-zeroth", 0, 0), ("ecoflap-zeroth", 0, 1),
        ("ecoflap-zeroth", 0, 2), ("wanda", 1, 0), ("wanda", 1, 2), ("ecoflap-zeroth", 1, 0), ("ecoflap-zeroth", 1, 2)]
    assert all(r["config"]["seeds"] == [0, 1] for r in recs[1:])
    ft = {r["config"]["seed"]: r["resources"]["finetune"] for r in recs if r["method"] == "wanda" and r["config"]["steps"] == 2}
    assert ft[0]["initial_loss"] != ft[1]["initial_loss"]  # each seed fine-tuned on its own batches
    ends = end_frame(recs)
    assert list(ends["steps"]) == [0, 2, 0, 2] and list(ends["seeds"]) == [2, 2, 2, 2]
    values = [r["metrics"]["vqa_accuracy"] for r in recs if r["method"] == "wanda" and r["config"]["steps"] == 2]
    row = ends[(ends["method"] == "wanda") & (ends["steps"] == 2)].iloc[0]
    assert row["vqa_accuracy"] == pytest.approx(sum(values) / 2) and row["s/step"] > 0
    assert [row["seed min"], row["seed max"]] == [min(values), max(values)]
    assert list(curve_frame(recs).query("method == 'wanda'")["seeds"]) == [2, 1, 2]  # step 1: the first seed only
    text = report.compare(labelled(recs), a="ecoflap-zeroth · FT", b="wanda · FT", sparsity=0.5)
    assert "over 2 seeds" in text and "tiny-blip2-opt" in text


def _point(seed, steps, value, *, final=True, method="wanda"):
    return {"model": "m", "method": method, "sparsity": 0.5, "task": "vqav2", "metrics": {"vqa_accuracy": value},
            "intervals": {"vqa_accuracy": [value - 2.0, value + 2.0]},
            "config": {"seed": seed, "steps": steps, "finetuned": steps > 0, "final": final, "trained": "qformer"}}


def test_curve_frame_pools_seeds_like_the_headline_and_refuses_a_repeated_seed():
    """Hand-made records: each point of a curve is the mean of its seeds, min-max over them and the mean item
    interval (records.points' pooling); a step measured by one seed stays one seed; two different records of one
    point at the same seed are an error, never counted as a second seed."""
    from ecoflap_utils.errors import UserError

    recs = [_point(0, 0, 0.0), _point(0, 10, 50.0, final=False), _point(0, 20, 80.0), _point(1, 0, 2.0),
            _point(1, 20, 90.0), _point(0, 0, 1.0, method="ecoflap-zeroth"), _point(0, 20, 70.0, method="ecoflap-zeroth")]
    frame = curve_frame(recs)
    got = [(r["method"], r["steps"], r["vqa_accuracy"], r["seed min"], r["seed max"], r["seeds"], r["low"], r["high"])
           for r in frame.to_dict("records")]
    assert got == [("wanda", 0, 1.0, 0.0, 2.0, 2, -1.0, 3.0), ("wanda", 10, 50.0, 50.0, 50.0, 1, 48.0, 52.0),
                   ("wanda", 20, 85.0, 80.0, 90.0, 2, 83.0, 87.0), ("ecoflap-zeroth", 0, 1.0, 1.0, 1.0, 1, -1.0, 3.0),
                   ("ecoflap-zeroth", 20, 70.0, 70.0, 70.0, 1, 68.0, 72.0)]
    assert set(frame["trained"]) == {"qformer"} and set(frame["sparsity"]) == {0.5}
    with pytest.raises(UserError, match="same seed"):
        curve_frame(recs + [_point(1, 20, 70.0)])


def test_curve_frame_keeps_int_and_float_sparsities_and_one_model():
    """A curve at sparsity 0 (an int, as YAML gives it) beside one at 0.5 (pandas makes the column float): each
    keeps its own value; records of two models are refused rather than pooled."""
    from ecoflap_utils.errors import UserError

    recs = [_point(0, 0, 10.0), _point(0, 15, 80.0)]
    recs += [{**r, "sparsity": 0} for r in (_point(0, 0, 90.0), _point(0, 15, 95.0))]
    frame = curve_frame(recs)
    assert list(zip(frame["sparsity"], frame["steps"], frame["vqa_accuracy"])) == [(0.5, 0, 10.0), (0.5, 15, 80.0),
                                                                                (0, 0, 90.0), (0, 15, 95.0)]
    with pytest.raises(UserError, match="one model"):
        curve_frame(recs + [{**_point(1, 15, 70.0), "model": "other"}])
