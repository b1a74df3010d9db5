"""Adapters' structure, save/load, and the prune CLI (files written, bad input refused)."""
import csv
import json
import subprocess
import sys
import time

import pytest
import torch

from ecoflap_utils import ModelNotAvailable, UserError, load_model, load_pruned, prune, save_pruned
from ecoflap_utils.cli import main

EXPECTED = {
    # name: ({stack: block count}, default stacks, weights per block of the first block)
    "tiny-llama": ({"lm": 4}, ["lm"], 7),
    "tiny-opt": ({"lm": 4}, ["lm"], 6),
    "tiny-blip2-opt": ({"vision": 3, "qformer": 2, "lm": 3}, ["vision", "lm"], 4),
    "tiny-blip2-t5": ({"vision": 3, "qformer": 2, "text_encoder": 3, "text_decoder": 3},
                      ["vision", "text_encoder", "text_decoder"], 4),
    "tiny-clip": ({"vision": 3, "text_encoder": 3}, ["vision", "text_encoder"], 4),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_adapter_blocks_have_expected_names_stacks_and_counts(name):
    a = load_model(name)
    stacks, default, first_n = EXPECTED[name]
    assert {s: len(a.stack_blocks(s)) for s in a.stacks()} == stacks
    assert [b.stack for b in a.pruned_blocks()] == [s for s in default for _ in range(stacks[s])]
    assert [b.name for b in a.stack_blocks(a.stacks()[0])] == [f"{a.stacks()[0]}.{i}" for i in range(stacks[a.stacks()[0]])]
    assert len(a.blocks[0].weights) == first_n
    for b in a.blocks:
        assert b.modality in ("vision", "language", "bridge")
        for w in b.weights:
            assert a.model.get_parameter(w).ndim == 2
    # nothing outside the blocks is pruned: embeddings and heads are not in any block
    names = set(a.layer_names(a.stacks()))
    assert not any("embed" in n or "lm_head" in n for n in names)


def test_blip2_t5_and_clip_modalities():
    a = load_model("tiny-blip2-t5")
    assert {b.stack: b.modality for b in a.blocks} == {
        "vision": "vision", "qformer": "bridge", "text_encoder": "language", "text_decoder": "language"}
    t5_block = a.stack_blocks("text_decoder")[0].weights
    assert any("EncDecAttention" in w for w in t5_block)  # cross-attention is pruned too
    c = load_model("tiny-clip")
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in c.blocks[0].weights


def test_tiny_models_are_seeded():
    a, b = load_model("tiny-blip2-opt"), load_model("tiny-blip2-opt")
    for (k, v), (k2, v2) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


@pytest.mark.parametrize("name", ["tiny-blip2-t5", "tiny-clip", "tiny-llama"])
def test_save_then_load_is_exact(name, tmp_path):
    a = load_model(name)
    res = prune(a, 0.5, calib_samples=8, progress=False)
    save_pruned(a, tmp_path / "run", res)
    b = load_pruned(tmp_path / "run")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    cfg = json.loads((tmp_path / "run" / "pruning_config.json").read_text())
    assert cfg["method"] == "wanda" and abs(cfg["actual_sparsity"] - 0.5) < 0.005
    assert {"torch", "transformers"} <= set(cfg["versions"])
    batch = a.batches(a.calibration_samples(2, 5), 2)[0]
    with torch.no_grad():
        assert torch.equal(a.loss(batch), b.loss(batch))


def test_cli_prune_writes_all_files_and_hits_the_target(tmp_path, capsys):
    out = tmp_path / "run"
    t0 = time.time()
    rc = main(["prune", "--model", "tiny-blip2-t5", "--method", "wanda", "--sparsity", "0.5", "--out", str(out),
               "--no-progress"])
    assert rc == 0 and time.time() - t0 < 60
    for f in ("pruning_config.json", "sparsity_report.csv", "resources.json", "sparsity_dict.json",
              "model/model.safetensors", "model/config.json"):
        assert (out / f).exists(), f
    rows = list(csv.DictReader((out / "sparsity_report.csv").open()))
    params = sum(int(r["params"]) for r in rows)
    actual = sum(float(r["actual_sparsity"]) * int(r["params"]) for r in rows) / params
    assert abs(actual - 0.5) <= 0.005
    assert {r["stack"] for r in rows} == {"vision", "text_encoder", "text_decoder"}
    res = json.loads((out / "resources.json").read_text())
    assert {"load", "fine"} <= set(res["stages"]) and res["stages"]["fine"]["wall_s"] > 0
    assert "text_decoder" in capsys.readouterr().out
    # the written run loads back as a model
    b = load_model(str(out))
    assert b.family == "blip2"


@pytest.mark.parametrize("args,match", [
    (["--sparsity", "1.5"], r"\[0, 1\)"),
    (["--sparsity", "0.5", "--nm", "4:2"], "0 < N < M"),
    (["--sparsity", "0.6", "--nm", "2:4"], "means sparsity 0.5"),
    (["--sparsity", "0.5", "--method", "obs"], "unknown method"),
    (["--sparsity", "0.5", "--model", "no-such-model"], "unknown model"),
    (["--sparsity", "0.5", "--sparsity-dict", "MISSING"], "does not exist"),
    (["--sparsity", "0.5", "--sparsity-dict", "BADKEYS"], "does not have"),
])
def test_cli_refuses_bad_input_and_leaves_nothing(args, match, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model.layers.99.mlp.up_proj.weight": 0.5}))
    args = [str(bad) if a == "BADKEYS" else str(tmp_path / "missing.json") if a == "MISSING" else a for a in args]
    model = [] if "--model" in args else ["--model", "tiny-llama"]
    out = tmp_path / "out"
    rc = main(["prune", *model, *args, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    import re
    assert re.search(match, err), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial folders


def test_cli_refuses_an_existing_run_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--model", "tiny-llama", "--sparsity", "0.5", "--out", str(out), "--no-progress"]) == 0
    stamp = (out / "pruning_config.json").read_text()
    assert main(["prune", "--model", "tiny-llama", "--sparsity", "0.6", "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "pruning_config.json").read_text() == stamp
    assert main(["prune", "--model", "tiny-llama", "--sparsity", "0.6", "--out", str(out), "--no-progress",
                 "--overwrite"]) == 0
    assert json.loads((out / "pruning_config.json").read_text())["requested_sparsity"] == 0.6


def test_cli_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "ecoflap_utils", "prune", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--model", "--method", "--sparsity", "--nm", "--calib-samples", "--seed", "--device", "--dtype",
                 "--out", "--overwrite", "--allocation", "--scores", "--granularity", "--perturb", "--eps",
                 "--num-noise", "--first-stage-samples", "--max-sparsity", "--sparsity-dict"):
        assert flag in out.stdout


def test_hub_model_offline_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(ModelNotAvailable) as e:
        load_model("Salesforce/blip2-flan-t5-xl")
    assert time.time() - t0 < 30
    msg = str(e.value)
    assert "Salesforce/blip2-flan-t5-xl" in msg and "local" in msg


def test_open_clip_pretrained_offline_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable, match="open_clip:ViT-B-16/PATH"):
        load_model("open_clip:ViT-B-16/openai")
    with pytest.raises(UserError, match="unknown open_clip architecture"):
        load_model("open_clip:NoSuchNet/openai")
