"""The notebooks' CALIBRATION and PROTOCOL parameters, through the helpers they call (experiments.calibration_for,
prune_settings, score_settings, check_protocol_parameters, calibration_per_dataset) and the experiment functions
that take them (sparsity_sweep, stack_sensitivity, weight_statistics, loss_landscape, recovery_curves), on the
tiny models with calibration files written here."""
import json

import numpy as np
import pytest

from ecoflap_utils import UserError, lessons, recovery
from ecoflap_utils import experiments as ex
from ecoflap_utils.data.images import DIGIT_NAMES, digits, to_pil

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = " ".join(f"token{i:03d}" for i in range(300))  # every 32-byte window of it is a distinct substring


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebook_calib")
    text = root / "wiki.train.raw"
    text.write_text(WORDS)
    # COCO captions: annotations/captions_train2014.json next to train2014/, 6 images, 2 captions each
    images, labels, _ = digits("train")
    pick = np.linspace(0, len(labels) - 1, 6).astype(int).tolist()
    (root / "coco" / "train2014").mkdir(parents=True)
    (root / "coco" / "annotations").mkdir()
    names = [f"COCO_train2014_{i:012d}.jpg" for i in range(6)]
    for name, i in zip(names, pick):
        to_pil(images[i]).save(root / "coco" / "train2014" / name, quality=95)
    captions = [f"a handwritten {DIGIT_NAMES[int(labels[i])]} number {k}" for i in pick for k in range(2)]
    anns = [{"id": 100 + j, "image_id": j // 2, "caption": c} for j, c in enumerate(captions)]
    coco = root / "coco" / "annotations" / "captions_train2014.json"
    coco.write_text(json.dumps({"images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
                                "annotations": anns}))
    return {"text": text, "coco": coco, "captions": captions}


# ------------------------------------------------------------------------------------- calibration_for
def test_calibration_for_reads_the_file_or_generates(files, llama):
    samples, source = ex.calibration_for(llama, files["text"], 6, seed=1)
    assert len(samples) == 6 and all(len(w) == llama.seq_len for w in samples)
    assert all(llama.tokenizer.decode(w) in WORDS for w in samples)  # every window is a piece of the file
    assert source["path"] == str(files["text"]) and source["format"] == "text" and source["count"] == 6
    assert source["seed"] == 1 and samples == ex.calibration_for(llama, files["text"], 6, seed=1)[0]
    generated, none = ex.calibration_for(llama, None, 6, seed=1)
    assert none is None and generated == llama.calibration_samples(6, 1)
    assert not any(llama.tokenizer.decode(w) in WORDS for w in generated)
    with pytest.raises(UserError, match="does not exist"):
        ex.calibration_for(llama, files["text"].parent / "nope.txt", 2)
    assert ex.calibration_config(None, fine=None, nm="2:4") == {"nm": "2:4", "protocol": None}
    assert ex.calibration_config("paper", first_stage=source) == {"protocol": "paper", "calibration": {"first_stage": source}}


def test_sweep_calibrates_on_the_file_and_records_it(files, llama):
    seen = []
    real = ex.prune

    def spy(adapter, target, **kw):
        seen.append(kw["calibration"])
        return real(adapter, target, **kw)

    ex.prune = spy
    try:
        recs = ex.sparsity_sweep(llama, methods=["wanda", "ecoflap-zeroth"], sparsities=[0.5], limit=1, calib_samples=4,
                                 first_stage_samples=4, include_dense=False, progress=False,
                                 calibration=str(files["text"]))
    finally:
        ex.prune = real
    assert len(seen) == 2 and all(llama.tokenizer.decode(w) in WORDS for s in seen for w in s)
    for r in recs:
        cal = r["config"]["calibration"]
        assert cal["fine"]["path"] == str(files["text"]) and cal["fine"]["count"] == 4
    assert recs[1]["config"]["calibration"]["first_stage"]["path"] == str(files["text"])
    assert json.loads(json.dumps(recs))[0]["config"]["calibration"]["fine"]["format"] == "text"  # results.json shows it


def test_ablation_scores_reuse_the_sweeps_entry_and_name_their_calibration(files, llama):
    base = {"samples": 4, "eps": 1e-3, "num_noise": 1, "perturb": "group"}
    cache = {}
    ex.sparsity_sweep(llama, methods=["ecoflap-zeroth"], sparsities=[0.5], limit=1, calib_samples=4,
                      first_stage_samples=4, include_dense=False, progress=False, perturb="group",
                      calibration=str(files["text"]), score_cache=cache)
    swept = cache[ex.score_cache_key("zeroth")]
    sc, cost, first = ex.ablation_scores(llama, cache, base, calibration=str(files["text"]))
    assert (sc, cost) == swept  # the sweep's scores, not a new pass
    assert first == ex.calibration_for(llama, str(files["text"]), 4)[1] and first["count"] == 4
    sc2, _, first2 = ex.ablation_scores(llama, cache, base, calibration=str(files["text"]), eps=1e-2)
    direct, _ = ex.coarse_scores(llama, "zeroth", calibration=ex.calibration_for(llama, str(files["text"]), 4)[0],
                                 samples=4, eps=1e-2, num_noise=1, perturb="group", progress=False)
    assert sc2 == direct and sc2 != sc and first2 == first  # a new setting: its own pass, the same samples
    n = len(cache)
    assert ex.ablation_scores(llama, cache, base, calibration=str(files["text"]), eps=1e-2)[0] == sc2
    assert len(cache) == n  # computed once
    assert ex.ablation_scores(llama, {}, base)[2] is None  # generated samples: no record


def test_weight_statistics_and_loss_landscape_read_the_file(files, llama):
    ours = ex.weight_statistics(llama, calib_samples=4, calibration=str(files["text"]), max_values=200)
    gen = ex.weight_statistics(llama, calib_samples=4, max_values=200)
    assert np.array_equal(ours["language"]["weight"], gen["language"]["weight"])  # same weights, seeded subsample
    assert not np.allclose(ours["language"]["wanda"], gen["language"]["wanda"])  # other inputs
    land = ex.loss_landscape(llama, alphas=[0.0, 0.1], directions=1, samples=4, calibration=str(files["text"]))
    assert land["language"][0, 0] == 0.0
    assert land["language"][0, 1] != ex.loss_landscape(llama, alphas=[0.0, 0.1], directions=1, samples=4)["language"][0, 1]


# ------------------------------------------------------------------------------------- stack_sensitivity
def _spy_prune(monkeypatch):
    seen = []
    real = ex.prune

    def spy(adapter, s, **kw):
        seen.append(kw)
        return real(adapter, s, **kw)

    monkeypatch.setattr(ex, "prune", spy)
    return seen


def test_stack_sensitivity_reads_calibration_from_disk(files, blip_t5, monkeypatch):
    seen = _spy_prune(monkeypatch)
    recs = ex.stack_sensitivity(blip_t5, sparsities=[0.5], limit=2, calib_samples=4, calibration=str(files["coco"]))
    assert len(seen) == 2 and all(len(kw["calibration"]) == 4 for kw in seen)
    for s in seen[0]["calibration"]:  # LAVIS's caption processor lower-cases; the captions are the file's
        assert s["caption"] in files["captions"]
    assert "comparison" not in seen[0] and "batch_size" not in seen[0]  # no protocol: prune's defaults
    for r in recs:
        assert r["config"]["calibration"]["fine"]["path"] == str(files["coco"]) and r["config"]["protocol"] is None


def test_stack_sensitivity_under_the_paper_protocol(blip_t5, monkeypatch):
    seen = _spy_prune(monkeypatch)
    recs = ex.stack_sensitivity(blip_t5, sparsities=[0.5], limit=2, calib_samples=4, protocol="paper")
    expected = {"vision": "matrix", "text_encoder": "row", "text_decoder": "row"}  # the official BLIP-2 Wanda
    assert [kw["comparison"] for kw in seen] == [expected, expected]
    assert all(kw["batch_size"] == 1 and len(kw["calibration"]) == 128 for kw in seen)  # the paper's 128 samples
    for r in recs:
        c = r["config"]
        assert c["protocol"] == "paper" and c["calib_samples"] == 128 and "calibration" not in c
        assert c["protocol_settings"] == {"batch_size": 1, "comparison": expected}


# ------------------------------------------------------------------------------------- protocol helpers
def test_protocol_helpers_give_the_presets(blip_t5, clip, llama):
    for a in (blip_t5, clip, llama):
        assert ex.prune_settings(a, None) == {} and ex.score_settings(a, None) == {}
        ex.check_protocol_parameters(a, None, calib_samples=3, perturb="group")  # no protocol: nothing to refuse
    assert ex.prune_settings(clip, "paper") == {"batch_size": 16, "comparison": "row"}
    assert ex.score_settings(blip_t5, "paper") == {"batch_size": 8, "granularity": "block", "perturb": "tensor",
                                                   "difference": "central", "eps": 1e-3, "num_noise": 1}
    assert ex.score_settings(llama, "paper", "first") == {"batch_size": 1, "granularity": "block", "variant": "grad"}
    assert ex.score_settings(llama, "paper", "magnitude") == {"batch_size": 1, "granularity": "block"}
    assert ex.score_cache_key("zeroth") == "zeroth" and ex.score_cache_key("zeroth", "paper") == "zeroth|paper"
    ex.check_protocol_parameters(llama, "paper", calib_samples=128, first_stage_samples=32, perturb="tensor",
                                 seq_len=2048)
    with pytest.raises(UserError, match=r"PROTOCOL 'paper' sets SEQ_LEN 2048 for causal_lm models, but SEQ_LEN is 64"):
        ex.check_protocol_parameters(llama, "paper", calib_samples=128, seq_len=64)
    with pytest.raises(UserError, match=r"sets PERTURB tensor .* but PERTURB is 'group'"):
        ex.check_protocol_parameters(blip_t5, "paper", perturb="group")
    with pytest.raises(UserError, match=r"FIRST_STAGE_SAMPLES 128"):  # first-order scores: 128 samples of one
        ex.check_protocol_parameters(blip_t5, "paper", scores="first", first_stage_samples=32)
    with pytest.raises(UserError, match="unknown --protocol"):
        ex.prune_settings(clip, "papers")


def test_calibration_per_dataset_matches_the_datasets():
    sets = {"cifar10": "/d/c10/test", "cifar100": "/d/c100/test"}
    assert ex.calibration_per_dataset(None, sets) == {"cifar10": None, "cifar100": None}
    cal = {"cifar100": "/d/c100/train", "cifar10": "/d/c10/train"}
    assert ex.calibration_per_dataset(cal, sets) == {"cifar10": "/d/c10/train", "cifar100": "/d/c100/train"}
    with pytest.raises(UserError, match="one calibration path per dataset"):
        ex.calibration_per_dataset({"cifar10": "/d/c10/train"}, sets)
    with pytest.raises(UserError, match="must map each dataset"):
        ex.calibration_per_dataset("/d/c10/train", sets)


# ------------------------------------------------------------------------------------- notebooks 02 and 07
def test_recovery_curves_pass_protocol_and_calibration_to_the_sweep(monkeypatch, blip_opt):
    got = {}
    monkeypatch.setattr(recovery, "sparsity_sweep", lambda adapter, **kw: got.update(kw) or [])
    recovery.recovery_curves(blip_opt, methods=["wanda"], sparsities=[0.5], steps=1, eval_every=None, lr=1e-3,
                             protocol="paper", calibration="/data/cc3m/{00000..00001}.tar")
    assert got["protocol"] == "paper" and got["calibration"] == "/data/cc3m/{00000..00001}.tar"
    recovery.recovery_curves(blip_opt, methods=["wanda"], sparsities=[0.5], steps=1, eval_every=None, lr=1e-3)
    assert got["protocol"] is None and got["calibration"] is None


def test_notebook02_records_name_the_calibration():
    from types import SimpleNamespace

    default = SimpleNamespace(stability=None)
    rows = [{"estimator": "zeroth per tensor", "reference": "sum of norms", "spearman": 0.5, "samples": 8}]
    recs = lessons.notebook02_records("m", rows, [], [], default, samples=8, calibration={"path": "/c4.json.gz"})
    assert recs[0]["config"] == {"samples": 8, "calibration": {"first_stage": {"path": "/c4.json.gz"}}}
    assert "calibration" not in lessons.notebook02_records("m", rows, [], [], default, samples=8)[0]["config"]


def test_local_wanda_scores_take_the_comparison(blip_t5):
    calib = blip_t5.calibration_samples(4, 0)
    row = lessons.local_wanda_scores(blip_t5, calib, sparsity=0.5)
    per_matrix = lessons.local_wanda_scores(blip_t5, calib, sparsity=0.5,
                                            **ex.prune_settings(blip_t5, "paper"))
    assert list(row) == list(per_matrix)
    first = next(iter(row))  # scored before anything is pruned: the same either way
    assert row[first] == pytest.approx(per_matrix[first], rel=1e-4)
    language = [w for w, b in blip_t5.block_of().items() if w in row and b.modality == "language"]
    assert language and any(row[w] != pytest.approx(per_matrix[w], rel=1e-4) for w in language)  # other vision masks
