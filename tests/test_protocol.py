"""--protocol paper, calibration from disk in the CLI, per-stack / global comparisons, --lavis-names.

Fixtures are written here: a webdataset tar of MNIST digits (from the bundled training split) captioned
"a photo of the handwritten digit three ...", a CSV with a missing image, a short text file.
"""
import io
import json
import re

import numpy as np
import pytest
import torch

from ecoflap_utils import protocol as P
from ecoflap_utils.cli import main
from ecoflap_utils.errors import UserError
from ecoflap_utils.models import load_model
from ecoflap_utils.prune import global_magnitude_masks, prune

pytestmark = pytest.mark.usefixtures("one_thread")

N_PAIRS = 130  # the paper preset's fine stage draws 128


@pytest.fixture(scope="module")
def tar(tmp_path_factory):
    import webdataset as wds

    from ecoflap_utils.data.images import DIGIT_NAMES, digits, to_pil

    images, labels, _ = digits("train")
    pick = np.linspace(0, len(labels) - 1, N_PAIRS).astype(int)
    path = tmp_path_factory.mktemp("cc3m") / "00000.tar"
    with wds.TarWriter(str(path)) as w:
        for j, i in enumerate(pick):
            buf = io.BytesIO()
            to_pil(images[i]).save(buf, format="JPEG", quality=90)
            cap = f"a photo of the handwritten digit {DIGIT_NAMES[int(labels[i])]}, white on a black background"
            w.write({"__key__": f"{j:09d}", "jpg": buf.getvalue(), "txt": cap})
    return path


def _run(args, tmp_path, capsys, model="tiny-blip2-t5"):
    out = tmp_path / "run"
    rc = main(["prune", "--model", model, *args, "--out", str(out), "--no-progress"])
    return rc, out, capsys.readouterr().err


def _refused(rc, out, err, tmp_path, *patterns):
    assert rc == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for pat in patterns:
        assert re.search(pat, err), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def _zeros_per_row(w):
    return (w == 0).sum(dim=1)


# --------------------------------------------------------------------------- acceptance: BLIP-2 paper protocol
def test_blip2_paper_protocol_from_a_webdataset_tar(tar, tmp_path, capsys):
    rc, out, err = _run(["--protocol", "paper", "--calibration", str(tar), "--method", "wanda", "--sparsity", "0.5"],
                        tmp_path, capsys)
    assert rc == 0, err
    a = load_model(str(out))
    report = json.loads((out / "pruning_config.json").read_text())
    vision = [n for n in report["per_layer_sparsity"] if n.startswith("vision_model")]
    lm = [n for n in report["per_layer_sparsity"] if n.startswith("language_model")]
    assert vision and lm
    # one threshold per matrix on the ViT: rows hold different numbers of zeros
    assert any(len(set(_zeros_per_row(a.model.get_parameter(n)).tolist())) > 1 for n in vision)
    # per row on the LM: every row the same number (s * C_in is whole here)
    for n in lm:
        z = _zeros_per_row(a.model.get_parameter(n))
        assert len(set(z.tolist())) == 1, n
    assert abs(report["actual_sparsity"] - 0.5) <= 0.005
    assert report["protocol"] == "paper"
    ps = report["protocol_settings"]
    assert ps["comparison"]["vision"] == "matrix" and ps["comparison"]["text_encoder"] == "row"
    assert ps["calib_samples"] == 128 and ps["batch_size"] == 1 and ps["difference"] == "central"
    cal = report["calibration"]
    assert cal["path"] == str(tar) and cal["format"] == "webdataset" and cal["count"] == 128 and cal["seed"] == 0
    assert len(cal["ids_sha256"]) == 64


# --------------------------------------------------------------------------- comparisons
def test_global_magnitude_ranks_abs_not_signed_and_prunes_exactly():
    w1 = torch.tensor([[-5.0, 1.0], [2.0, -0.5]])
    w2 = torch.tensor([[-3.0, 0.1, 4.0, -0.2]])
    m1, m2 = global_magnitude_masks([w1, w2], 0.5)
    # |W| ranking prunes 0.1, 0.2, 0.5, 1.0; a signed ranking would prune -5, -3, -0.5, -0.2
    assert m1.tolist() == [[False, True], [False, True]]
    assert m2.tolist() == [[False, True, False, True]]
    # ties at the threshold: exactly floor(s * N), by position (first tensor first)
    t1, t2 = torch.ones(3, 3), torch.ones(2, 5)
    n1, n2 = global_magnitude_masks([t1, t2], 0.4)
    assert int(0.4 * 19) == 7 and n1.flatten().tolist() == [True] * 7 + [False] * 2 and not n2.any()
    # one threshold over all layers: nothing kept is smaller than anything pruned
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(7, 5, generator=g) * sc for sc in (0.1, 1.0, 3.0)]
    ms = global_magnitude_masks(ws, 0.37)
    assert sum(int(m.sum()) for m in ms) == int(0.37 * sum(w.numel() for w in ws))
    pruned = torch.cat([w[m].abs() for w, m in zip(ws, ms)])
    kept = torch.cat([w[~m].abs() for w, m in zip(ws, ms)])
    assert pruned.max() <= kept.min()
    assert int(ms[0].sum()) > int(ms[2].sum())  # the small-weight layer loses most


def test_comparison_dict_vision_matrix_lm_row():
    a = load_model("tiny-blip2-t5")
    calib = a.calibration_samples(8, 0)
    comp = {"vision": "matrix", "text_encoder": "row", "text_decoder": "row"}
    res = prune(a, 0.5, calibration=calib, comparison=comp, progress=False)
    assert res.config["comparison"] == comp
    block_of = a.block_of()
    stacks = {}
    for name in res.masks:
        z = _zeros_per_row(a.model.get_parameter(name))
        stacks.setdefault(block_of[name].stack, []).append(len(set(z.tolist())))
    assert max(stacks["vision"]) > 1
    assert max(stacks["text_encoder"]) == 1 and max(stacks["text_decoder"]) == 1
    with pytest.raises(UserError, match="add text_decoder=row"):
        prune(load_model("tiny-blip2-t5"), 0.5, calibration=calib, comparison={"vision": "matrix",
                                                                                "text_encoder": "row"})
    with pytest.raises(UserError, match="does not have"):
        prune(a, 0.5, calibration=calib, comparison={"lm": "row"})
    with pytest.raises(UserError, match="needs --method magnitude"):
        prune(a, 0.5, calibration=calib, comparison="global")


# --------------------------------------------------------------------------- contradictions
@pytest.mark.parametrize("args,flag,value", [
    (["--allocation", "ecoflap", "--perturb", "group"], "--perturb", "tensor"),
    (["--allocation", "ecoflap", "--difference", "forward"], "--difference", "central"),
    (["--calib-samples", "64"], "--calib-samples", "128"),
    (["--comparison", "row"], "--comparison", "vision=matrix"),
    (["--batch-size", "8"], "--batch-size", "1"),  # uniform Wanda: batch 1 in the official scripts
    (["--allocation", "ecoflap", "--scores", "first", "--variant", "grad"], "--variant", "weight_grad"),
    (["--allocation", "ecoflap", "--max-sparsity", "0.8"], "--max-sparsity", r"\(sparsity \+ 0.1\)"),
])
def test_protocol_refuses_contradicting_flags(args, flag, value, tmp_path, capsys):
    rc, out, err = _run(["--protocol", "paper", "--sparsity", "0.5", *args], tmp_path, capsys)
    _refused(rc, out, err, tmp_path, f"sets {flag} {value}", "drop " + flag, "drop --protocol")


def test_protocol_refuses_a_short_window_for_language_models(tmp_path, capsys):
    rc, out, err = _run(["--protocol", "paper", "--sparsity", "0.5", "--seq-len", "512"], tmp_path, capsys,
                        model="tiny-llama")
    _refused(rc, out, err, tmp_path, "sets --seq-len 2048 for causal_lm", "drop --seq-len")


def test_unknown_protocol_is_one_line(tmp_path, capsys):
    rc, out, err = _run(["--protocol", "papr", "--sparsity", "0.5"], tmp_path, capsys)
    _refused(rc, out, err, tmp_path, "unknown --protocol")


def test_protocol_accepts_agreeing_flags_and_prunes_global_magnitude(tmp_path, capsys):
    rc, out, err = _run(["--protocol", "paper", "--method", "magnitude", "--sparsity", "0.5", "--perturb", "tensor",
                         "--difference", "central", "--eps", "0.001", "--num-noise", "1", "--calib-samples", "128",
                         "--comparison", "global", "--max-sparsity", "0.6"], tmp_path, capsys)
    assert rc == 0, err
    cfg = json.loads((out / "pruning_config.json").read_text())
    assert cfg["protocol"] == "paper" and cfg["comparison"] == "global"
    a = load_model(str(out))
    ws = [a.model.get_parameter(n) for n in cfg["per_layer_sparsity"]]
    total = sum(w.numel() for w in ws)
    assert sum(int((w == 0).sum()) for w in ws) == int(0.5 * total)
    # one threshold: layers end at different sparsities
    assert len({round(float((w == 0).float().mean()), 3) for w in ws}) > 1


def test_without_protocol_the_defaults_stay(tmp_path, capsys):
    rc, out, err = _run(["--sparsity", "0.5", "--calib-samples", "8"], tmp_path, capsys, model="tiny-llama")
    assert rc == 0, err
    cfg = json.loads((out / "pruning_config.json").read_text())
    assert cfg["protocol"] is None and cfg["comparison"] == "row" and cfg["batch_size"] == 8
    assert "protocol_settings" not in cfg


def test_paper_settings_per_family():
    b, _ = P.paper_settings("blip2", method="wanda", allocation="ecoflap", scores="zeroth")
    assert (b["batch_size"], b["first_stage_samples"], b["first_stage_batch_size"]) == (8, 32, 8)
    f, _ = P.paper_settings("blip2", method="wanda", allocation="ecoflap", scores="first")
    assert (f["variant"], f["first_stage_samples"], f["first_stage_batch_size"], f["batch_size"]) == \
        ("weight_grad", 128, 1, 1)
    c, _ = P.paper_settings("clip", method="wanda", allocation="ecoflap", scores="zeroth")
    assert (c["calib_samples"], c["batch_size"], c["first_stage_samples"], c["first_stage_batch_size"],
            c["comparison"]) == (128, 16, 32, 16, "row")
    llm, notes = P.paper_settings("causal_lm", method="wanda", allocation="ecoflap", scores="zeroth")
    assert (llm["seq_len"], llm["calib_samples"], llm["comparison"]) == (2048, 128, "row") and notes
    assert P.paper_settings("causal_lm", method="magnitude", allocation="uniform", scores="zeroth")[0][
        "comparison"] == "matrix"
    for s in (b, c, llm):
        assert (s["perturb"], s["difference"], s["eps"], s["num_noise"]) == ("tensor", "central", 1e-3, 1)
    # CLIP's pruning data is CoOp's train loader, augmented (vit_b16.yaml L13); ours is not by default
    assert c["calibration_augment"] is True and P.DEFAULTS["calibration_augment"] is False
    assert "calibration_augment" not in b and "calibration_augment" not in llm
    settings, _ = P.resolve("paper", {}, family="clip", method="wanda", allocation="ecoflap", scores="zeroth",
                            target=0.4)
    assert settings["calibration_augment"] is True
    assert P.resolve(None, {}, family="clip", method="wanda", allocation="ecoflap", scores="zeroth",
                     target=0.4)[0]["calibration_augment"] is False


def test_paper_eval_settings():
    vqa, _ = P.paper_eval_settings("vqav2")
    assert vqa == {"prompt": "Question: {} Short answer:", "num_beams": 5, "max_new_tokens": 10, "min_length": 1,
                   "length_penalty": -1.0}
    assert P.paper_eval_settings("gqa")[0] == P.paper_eval_settings("okvqa")[0] == vqa
    assert P.paper_eval_settings("caption")[0] == {"prompt": "a photo of", "num_beams": 5, "max_new_tokens": 30,
                                                   "min_length": 8}
    assert P.paper_eval_settings("zeroshot", dataset="ucf101")[0] == {"templates": ["a photo of a person doing {}."]}
    generic, notes = P.paper_eval_settings("zeroshot")
    assert generic == {"templates": ["a photo of a {}."]} and "not a CoOp dataset" in notes[0]
    assert P.paper_eval_settings("perplexity")[0] == {"window": 2048, "stride": 2048}


# --------------------------------------------------------------------------- calibration from disk, LAVIS names
def test_both_stages_read_the_calibration_and_lavis_names(tar, tmp_path, capsys):
    rc, out, err = _run(["--calibration", str(tar), "--sparsity", "0.5", "--allocation", "ecoflap",
                         "--calib-samples", "8", "--first-stage-samples", "4", "--first-stage-batch-size", "4",
                         "--lavis-names"], tmp_path, capsys)
    assert rc == 0, err
    cfg = json.loads((out / "pruning_config.json").read_text())
    assert cfg["calibration"]["count"] == 8 and cfg["coarse"]["calibration"]["count"] == 4
    assert cfg["coarse"]["calibration"]["seed"] == cfg["calibration"]["seed"] == 0
    assert cfg["coarse"]["calibration"]["path"] == str(tar)
    sd = json.loads((out / "sparsity_dict.lavis.json").read_text())
    ours = json.loads((out / "sparsity_dict.json").read_text())
    assert len(sd) == len(ours)
    assert any(k.startswith("visual_encoder.blocks.") for k in sd)
    assert any(k.startswith("t5_model.encoder.block.") for k in sd)
    sc = json.loads((out / "scores.lavis.json").read_text())
    assert set(sc) >= {"stability", "split", "groups", "config"}
    assert "visual_encoder.blocks.0" in sc["groups"] and "t5_model.decoder.block.0" in sc["groups"]


def test_lavis_names_refused_for_other_families(tmp_path, capsys):
    rc, out, err = _run(["--sparsity", "0.5", "--calib-samples", "8", "--lavis-names"], tmp_path, capsys,
                        model="tiny-llama")
    _refused(rc, out, err, tmp_path, "--lavis-names", "causal_lm")


@pytest.fixture()
def bad_inputs(tar, tmp_path):
    (tmp_path / "pairs.csv").write_text("filepath,caption\nnope/000.png,a photo\nnope/001.png,a photo\n")
    (tmp_path / "short.txt").write_text("Only a few words here.")
    return {"MISSING": str(tmp_path / "missing" / "{00000..00003}.tar"), "TAR": str(tar),
            "CSV": str(tmp_path / "pairs.csv"), "SHORT": str(tmp_path / "short.txt")}


@pytest.mark.parametrize("model,args,match", [
    ("tiny-blip2-t5", ["--calibration", "MISSING"], "missing|does not exist|no such|not found"),
    ("tiny-blip2-t5", ["--calibration", "TAR", "--calibration-format", "parquet"], "parquet"),
    ("tiny-blip2-t5", ["--calibration", "CSV", "--calib-samples", "2"], "image"),
    ("tiny-blip2-t5", ["--calibration", "TAR", "--calib-samples", "500"], "500"),
    ("tiny-llama", ["--calibration", "SHORT", "--calib-samples", "2", "--seq-len", "64"], "64|token|short"),
    ("tiny-blip2-t5", ["--image-root", "/tmp"], "--calibration"),
    ("tiny-blip2-t5", ["--seq-len", "64", "--calib-samples", "2"], "--seq-len"),
])
def test_bad_calibration_input_is_one_line(model, args, match, bad_inputs, tmp_path, capsys):
    args = [bad_inputs.get(a, a) for a in args]
    rc, out, err = _run(["--sparsity", "0.5", *args], tmp_path, capsys, model=model)
    _refused(rc, out, err, tmp_path, match)


# --------------------------------------------------------------------------- sweep
def test_sparsity_sweep_with_the_paper_protocol():
    from ecoflap_utils.experiments import sparsity_sweep

    a = load_model("tiny-clip")
    recs = sparsity_sweep(a, methods=["wanda", "ecoflap-zeroth"], sparsities=[0.5], limit=8, include_dense=False,
                          protocol="paper", progress=False)
    assert len(recs) == 2
    for r in recs:
        assert r["config"]["protocol"] == "paper"
        ps = r["config"]["protocol_settings"]
        assert ps["batch_size"] == 16 and ps["calib_samples"] == 128 and r["config"]["calib_samples"] == 128
        assert abs(r["config"]["actual_sparsity"] - 0.5) < 0.01
    assert recs[1]["config"]["protocol_settings"]["difference"] == "central"
