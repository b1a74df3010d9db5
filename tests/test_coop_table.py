"""experiments.coop_table: the rebuttal's CLIP table (datasets x methods x sparsities x seeds) on tiny-clip, with two
datasets written in CoOp's layout: one pruning per dataset on its own train split, the dense model evaluated once
per dataset, one record per cell, and a second call that resumes where an interrupted one stopped."""
import json

import numpy as np
import pytest
from PIL import Image

from ecoflap_utils import evaluate as evaluate_module
from ecoflap_utils import experiments as ex
from ecoflap_utils.data import coop
from ecoflap_utils.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(limit=6, calib_samples=8, first_stage_samples=8, progress=False)


def _layout(root, folder, name, classes, seed, train=12):
    """A CoOp-layout folder: images/<class>/<k>.png and split_zhou_<name>.json (``train``, 1 val, 3 test per class)."""
    rng = np.random.RandomState(seed)
    rows = {"train": [], "val": [], "test": []}
    for label, c in enumerate(classes):
        for split, n in (("train", train), ("val", 1), ("test", 3)):
            for k in range(n):
                rel = f"{c}/{split}_{k}.png"
                (root / folder / "images" / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.randint(0, 255, (10, 12, 3)).astype("uint8")).save(root / folder / "images" / rel)
                rows[split].append((rel, label, c))
    coop.write_split_file(root / folder, name, rows)
    return f"coop:{root / folder}"


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"oxford_pets": _layout(root, "oxford_pets", "OxfordPets", ["abyssinian", "pug"], 0, train=64),
            "shapes": _layout(root, "shapes", "Shapes", ["circle", "square", "star_shape"], 1)}


def _counting(monkeypatch):
    """Count the real evaluations and coarse-stage passes (the functions still run)."""
    calls = {"eval": [], "scores": 0}
    real_eval, real_scores = evaluate_module.evaluate, ex.estimate_scores

    def eval_spy(adapter, task=None, data=None, **kw):
        calls["eval"].append(str(data))
        return real_eval(adapter, task, data, **kw)

    def scores_spy(*a, **kw):
        calls["scores"] += 1
        return real_scores(*a, **kw)

    monkeypatch.setattr(evaluate_module, "evaluate", eval_spy)
    monkeypatch.setattr(ex, "estimate_scores", scores_spy)
    return calls


def _json(x):
    return json.loads(json.dumps(x, default=str))


def test_table_cells_dense_once_and_resume_after_an_interruption(clip, sets, tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    cells = tmp_path / "cells"
    kw = dict(methods=["wanda", "ecoflap-zeroth"], sparsities=[0.5], out_dir=str(cells), **SMALL)

    class Stop(Exception):
        pass

    done = []

    def stop_after_four(rec):
        done.append(rec)
        if len(done) == 4:
            raise Stop

    with pytest.raises(Stop):  # interrupted after four cells: pets' dense, seed 0 (wanda, ecoflap), seed 1 wanda
        ex.coop_table(clip, sets, seeds=[0, 1], on_cell=stop_after_four, **kw)
    pets = ("oxford_pets", "dense", 0.0, None), ("oxford_pets", "wanda", 0.5, 0), \
        ("oxford_pets", "ecoflap-zeroth", 0.5, 0), ("oxford_pets", "wanda", 0.5, 1)
    assert [(r["config"]["dataset"], r["method"], r["config"].get("seed")) for r in done] == \
        [(d, m, s) for d, m, _, s in pets]
    assert calls["scores"] == 1

    run = ex.coop_table(clip, sets, seeds=[0, 1], **kw)
    assert run.reused == list(pets)  # read back, not recomputed
    assert run.computed == [("oxford_pets", "ecoflap-zeroth", 0.5, 1), ("shapes", "dense", 0.0, None)] + [
        ("shapes", m, 0.5, s) for s in (0, 1) for m in ("wanda", "ecoflap-zeroth")]
    # over both calls every cell was evaluated once: the dense model once per dataset, not per seed or method
    for name, data in sets.items():
        assert calls["eval"].count(data) == 1 + 2 * 2, name
    assert calls["scores"] == 4  # one coarse pass per (dataset, seed)

    recs = run.records
    assert [(r["config"]["dataset"], r["method"], r["config"].get("seed")) for r in recs] == [
        (d, m, s) for d in sets for m, s in [("dense", None)] + [(m, s) for m in ("wanda", "ecoflap-zeroth")
                                                               for s in (0, 1)]]
    templates = {"oxford_pets": ["a photo of a {}, a type of pet."], "shapes": ["a photo of a {}."]}
    for r in recs:
        c = r["config"]
        assert c["templates"] == templates[c["dataset"]] and c["template_set"] == "coop" and c["data"] == sets[c["dataset"]]
        (lo, hi), = r["intervals"].values()
        assert lo <= r["metrics"]["acc1"] <= hi and set(r["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
        if r["method"] == "dense":
            assert "seed" not in c and "calibration" not in c and c["split"] == "test"
            continue
        assert c["seeds"] == [0, 1] and abs(c["actual_sparsity"] - 0.5) < 0.01
        fine = c["calibration"]["fine"]  # pruned on its own dataset's train split, drawn by the cell's seed
        assert (fine["path"], fine["split"], fine["count"], fine["seed"]) == (sets[c["dataset"]], "train", 8, c["seed"])
        assert fine["augmentation"].startswith("none")
        if r["method"] == "ecoflap-zeroth":
            assert c["calibration"]["first_stage"]["count"] == 8 and "scores" in r["resources"]
    by = {(r["config"]["dataset"], r["method"], r["config"].get("seed")): r for r in recs}
    assert by["shapes", "wanda", 0]["config"]["calibration"]["fine"]["ids_sha256"] != \
        by["shapes", "wanda", 1]["config"]["calibration"]["fine"]["ids_sha256"]  # seeds pick other samples
    assert _json(by["oxford_pets", "wanda", 0]) == {**_json(done[1]), "config": {**_json(done[1])["config"],
                                                                                 "seeds": [0, 1]}}

    # a lost cell is computed again from its seed's saved coarse-stage scores; more seeds add only their cells
    folder, = [p for p in cells.iterdir() if p.name.startswith("oxford_pets-")]
    (folder / "ecoflap-zeroth@0.5@seed0.json").unlink()
    more = ex.coop_table(clip, sets, seeds=[0, 1, 2], **kw)
    assert more.computed == [("oxford_pets", "ecoflap-zeroth", 0.5, 0)] + [
        (d, m, 0.5, 2) for d in sets for m in ("wanda", "ecoflap-zeroth")]
    assert calls["scores"] == 4 + 2  # seed 2 of each dataset; seed 0's scores were read back
    again = {(r["config"]["dataset"], r["method"], r["config"].get("seed")): r for r in more.records}
    assert again["oxford_pets", "ecoflap-zeroth", 0]["metrics"] == by["oxford_pets", "ecoflap-zeroth", 0]["metrics"]
    assert again["oxford_pets", "ecoflap-zeroth", 0]["config"]["actual_sparsity"] == \
        by["oxford_pets", "ecoflap-zeroth", 0]["config"]["actual_sparsity"]
    assert len(more.records) == 2 * (1 + 2 * 3) and all(r["config"].get("seeds", [0, 1, 2]) == [0, 1, 2]
                                                       for r in more.records)
    # other settings are other cells (their own folder), never the old ones
    other = ex.coop_table(clip, {"shapes": sets["shapes"]}, seeds=[0], **{**kw, "limit": 5})
    assert [c[1] for c in other.computed] == ["dense", "wanda", "ecoflap-zeroth"] and not other.reused
    assert len([p for p in cells.iterdir() if p.name.startswith("shapes-")]) == 2


def test_paper_protocol_augments_the_calibration_images(clip, sets):
    """Under PROTOCOL paper a CLIP cell calibrates as the official CoOp code: 128 augmented train images in batches
    of 16, the dataset's single template."""
    run = ex.coop_table(clip, {"oxford_pets": sets["oxford_pets"]}, methods=["wanda"], sparsities=[0.4], seeds=[3],
                        protocol="paper", limit=6, progress=False)
    dense, pruned = run.records
    assert dense["config"]["templates"] == ["a photo of a {}, a type of pet."] and dense["config"]["protocol"] == "paper"
    c = pruned["config"]
    assert c["protocol_settings"]["batch_size"] == 16 and c["calib_samples"] == 128
    assert c["calibration"]["fine"]["augmentation"]["name"] == "coop_train"
    assert c["calibration"]["fine"]["augmentation"]["seed"] == 3 == c["seed"]


@pytest.mark.parametrize("change, match", [
    ({"seeds": []}, "seeds is \\[\\]: give a non-empty list of distinct integer seeds"),
    ({"seeds": [0, "1"]}, "seeds holds '1', not an integer"),
    ({"seeds": [1, 1]}, "repeats a seed"),
    ({"methods": ["lamp"]}, "unknown method"),
    ({"sparsities": [1.5]}, "between 0 and 1"),
    ({"datasets": {}}, "no datasets to prune for"),
    ({"calibration": {"other": "coop:/x"}}, "CALIBRATION names other"),
])
def test_bad_input_is_one_line(clip, sets, change, match):
    kw = {"datasets": {"shapes": sets["shapes"]}, "methods": ["wanda"], "sparsities": [0.5], "seeds": [0], **SMALL,
          **change}
    with pytest.raises(UserError, match=match) as e:
        ex.coop_table(clip, kw.pop("datasets"), **kw)
    assert "\n" not in str(e.value)


def _rec(method, sparsity, seed, acc1, dataset="digits", iv=2.0):
    conf = {"dataset": dataset, **({"seed": seed, "seeds": [0, 1, 2]} if seed is not None else {})}
    return ex.record("mini-clip", method, sparsity, "zeroshot", {"acc1": acc1}, config=conf,
                     intervals={"acc1": [acc1 - iv, acc1 + iv]})


def test_table8_frame_reported_above_ours_with_the_seed_spread():
    """report.table8 and report.gain_sentence: the rebuttal's rows above ours, each of our cells the mean (min–max
    over seeds) [item interval], the gain of ECoFLaP over Wanda paired by seed beside the reported one."""
    from ecoflap_utils import report

    recs = [_rec("dense", 0.0, None, 97.6), _rec("dense", 0.0, None, 25.0, "textiles")]
    recs += [_rec("wanda", 0.7, s, v) for s, v in zip((0, 1, 2), (80.0, 82.0, 84.0))]
    recs += [_rec("ecoflap-zeroth", 0.7, s, v) for s, v in zip((0, 1, 2), (90.0, 91.0, 95.0))]
    recs += [_rec(m, 0.7, s, 25.0, "textiles") for m in ("wanda", "ecoflap-zeroth") for s in (0, 1, 2)]
    t = report.table8(recs)
    assert list(t.columns) == list(report.REPORTED_TABLE8["Full model"]) + ["digits", "textiles"]
    assert list(t.index) == [("reported", r) for r in ("Full model", "Wanda @ 0.4", "ECoFLaP @ 0.4",
                                                       "ECoFLaP − Wanda @ 0.4")] + [
        ("ours: mini-clip", r) for r in ("Full model", "wanda @ 0.7", "ecoflap-zeroth @ 0.7",
                                         "ecoflap-zeroth − wanda @ 0.7")]
    assert t.loc[("reported", "ECoFLaP @ 0.4"), "oxford_pets"] == "74.6"
    assert t.loc[("reported", "ECoFLaP − Wanda @ 0.4"), "oxford_pets"] == "+18.6"
    assert t.loc[("reported", "Wanda @ 0.4"), "digits"] == ""
    assert t.loc[("ours: mini-clip", "Full model"), "digits"] == "97.6 [95.6, 99.6]"
    assert t.loc[("ours: mini-clip", "wanda @ 0.7"), "digits"] == "82.0 (80.0–84.0) [80.0, 84.0]"
    assert t.loc[("ours: mini-clip", "ecoflap-zeroth @ 0.7"), "digits"] == "92.0 (90.0–95.0) [90.0, 94.0]"
    # per seed 10, 9, 11: the mean gain and its range over seeds
    assert t.loc[("ours: mini-clip", "ecoflap-zeroth − wanda @ 0.7"), "digits"] == "+10.0 (+9.0 to +11.0 over 3 seeds)"
    assert t.loc[("ours: mini-clip", "ecoflap-zeroth − wanda @ 0.7"), "textiles"] == "+0.0 (+0.0 to +0.0 over 3 seeds)"
    assert t.loc[("ours: mini-clip", "wanda @ 0.7"), "caltech101"] == ""
    text = report.gain_sentence(recs)
    assert "ECoFLaP gains 6.0 to 18.6 points of top-1 over Wanda on the 11 datasets" in text
    assert text.endswith("Measured here on mini-clip, ecoflap-zeroth minus wanda at sparsity 0.7 (acc1 points, "
                         "paired by seed): digits +10.0 (+9.0 to +11.0 over 3 seeds), textiles +0.0 (+0.0 to +0.0 "
                         "over 3 seeds).")
    # a gain inside the spread is no clear difference (report.compare); one beyond both noises differs
    assert "No clear difference" in report.compare(recs, "ecoflap-zeroth", "wanda", 0.7, where={"dataset": "textiles"})
    assert "ecoflap-zeroth and wanda differ" in report.compare(recs, "ecoflap-zeroth", "wanda", 0.7,
                                                             where={"dataset": "digits"})
    # without the reported rows only ours; with no pair measured, no gain row
    only = report.table8([r for r in recs if r["method"] != "wanda"], reported=None)
    assert list(only.columns) == ["digits", "textiles"] and all("−" not in row for _, row in only.index)
