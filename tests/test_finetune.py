"""Masked fine-tuning: zeros kept exactly, only the chosen stacks trained, loss falls, the CLI run directory."""
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ecoflap_utils import UserError, load_model, prune
from ecoflap_utils.cli import main
from ecoflap_utils.finetune import (FinetuneData, default_finetune_data, default_finetune_stacks, finetune,
                                    most_common_answer, resolve_stacks, stack_parameters, task_loss, warmup_steps,
                                    zero_pattern)

MODELS = ["tiny-blip2-t5", "tiny-blip2-opt", "tiny-clip", "tiny-llama"]


def _state(adapter):
    return {k: v.detach().clone() for k, v in adapter.model.named_parameters()}


@pytest.mark.parametrize("name", MODELS)
def test_zero_pattern_is_bit_identical_for_every_trained_stack(name):
    a = load_model(name)
    prune(a, 0.5, method="magnitude", stacks=a.stacks(), progress=False)  # the Q-Former too
    before_zeros = zero_pattern(a)
    assert all(z.any() for z in before_zeros.values())
    before = _state(a)
    flags = {n: p.requires_grad for n, p in a.model.named_parameters()}
    res = finetune(a, a.calibration_samples(8, 3), steps=4, lr=1e-2, stacks=a.stacks(), batch_size=4,
                   weight_decay=0.1, progress=False)
    after_zeros = zero_pattern(a)
    for k in before_zeros:
        assert torch.equal(before_zeros[k], after_zeros[k]), k
    assert set(res.masks) == set(before_zeros)
    assert res.config["kept_zeros"] == sum(int(z.sum()) for z in before_zeros.values())
    # every stack really trained: its surviving weights moved
    after = _state(a)
    for stack, names in stack_parameters(a, a.stacks()).items():
        weights = [n for n in a.layer_names([stack])]
        assert any(not torch.equal(before[n], after[n]) for n in weights), stack
        for n in weights:
            moved = before[n] != after[n]
            assert not (moved & before_zeros[n]).any(), n
    assert {n: p.requires_grad for n, p in a.model.named_parameters()} == flags
    assert not any(m.training for m in a.model.modules())


def test_without_masks_the_zeros_come_back():
    """The check above means something: dense fine-tuning (masks={}) revives pruned weights."""
    a = load_model("tiny-llama")
    prune(a, 0.5, method="magnitude", progress=False)
    before = zero_pattern(a)
    finetune(a, a.calibration_samples(8, 3), steps=3, lr=1e-2, batch_size=4, masks={}, progress=False)
    after = zero_pattern(a)
    assert sum(int(before[k].sum()) - int(after[k].sum()) for k in before) > 0


def test_given_masks_are_enforced_from_the_start():
    a = load_model("tiny-llama")
    name = a.layer_names()[0]
    keep = torch.ones_like(a.parameter(name), dtype=torch.bool)
    keep[:, ::2] = False
    res = finetune(a, a.calibration_samples(8, 3), steps=2, lr=1e-3, batch_size=4, masks={name: keep},
                   progress=False)
    assert set(res.masks) == {name}
    assert torch.equal(a.parameter(name) == 0, ~keep)


def test_blip2_default_trains_the_qformer_queries_and_projection_only():
    a = load_model("tiny-blip2-opt")
    prune(a, 0.5, method="wanda", calib_samples=8, progress=False)
    assert default_finetune_stacks(a) == ["qformer"]
    before = _state(a)
    res = finetune(a, a.calibration_samples(8, 3), steps=3, lr=1e-3, batch_size=4, progress=False)
    assert res.config["stacks"] == ["qformer"]
    after = _state(a)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    bridge = ("qformer.", "query_tokens", "language_projection.")
    assert changed and all(n.startswith(bridge) for n in changed)
    assert "query_tokens" in changed and "language_projection.weight" in changed
    assert res.config["masked_layers"] == 0  # the pruned LM and ViT are frozen; the Q-Former is not pruned


def test_stacks_are_validated_and_default_per_family():
    t5 = load_model("tiny-blip2-t5")
    assert resolve_stacks(t5, "text_decoder,qformer") == ["qformer", "text_decoder"]
    with pytest.raises(UserError, match=r"no stack 'lm'.*vision, qformer, text_encoder, text_decoder"):
        resolve_stacks(t5, ["lm"])
    assert default_finetune_stacks(load_model("tiny-clip")) == ["vision", "text_encoder"]
    assert default_finetune_stacks(load_model("tiny-llama")) == ["lm"]
    clip = load_model("tiny-clip")
    params = stack_parameters(clip, clip.stacks())
    assert all(n.startswith("visual") for n in params["vision"])
    assert "logit_scale" not in params["text_encoder"] and "token_embedding.weight" in params["text_encoder"]


@pytest.mark.parametrize("name,stacks,lr,ratio", [
    ("tiny-blip2-opt", None, 3e-3, 0.99),  # the Q-Former alone, under a random LM: a small but steady fall
    ("tiny-blip2-opt", "qformer,lm", 3e-3, 0.9),
    ("tiny-blip2-t5", "qformer,text_decoder", 3e-3, 0.9),
    ("tiny-clip", None, 3e-3, 0.9),
    ("tiny-llama", None, 1e-2, 0.97),
])
def test_loss_falls_on_a_fixed_set(name, stacks, lr, ratio):
    a = load_model(name)
    prune(a, 0.5, method="magnitude", progress=False)
    data = a.calibration_samples(16, 5)
    res = finetune(a, data, steps=30, lr=lr, stacks=stacks, batch_size=8, warmup=3, progress=False)
    assert len(res.losses) == 30 and len(res.lrs) == 30
    assert np.mean(res.losses[-5:]) < ratio * np.mean(res.losses[:5]), res.losses


def test_deterministic_given_seed():
    runs = []
    for seed in (0, 0, 1):
        a = load_model("tiny-blip2-t5")  # has dropout, so the torch seed matters too
        res = finetune(a, a.calibration_samples(16, 2), steps=4, lr=1e-3, batch_size=4, seed=seed,
                       stacks="qformer,text_encoder", progress=False)
        runs.append((res.losses, _state(a)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    assert runs[0][0] != runs[2][0]


def test_eval_fn_records_metrics_against_steps():
    a = load_model("tiny-llama")
    seen = []

    def ev(step, adapter):
        seen.append(adapter.model.training)
        return {"score": float(step)}

    res = finetune(a, a.calibration_samples(8, 1), steps=5, lr=1e-3, batch_size=4, eval_fn=ev, eval_every=2,
                   progress=False)
    assert [e["step"] for e in res.evals] == [0, 2, 4, 5]
    assert [e["score"] for e in res.evals] == [0.0, 2.0, 4.0, 5.0]
    assert seen == [False] * 4
    assert res.curve()["evals"] == res.evals


def test_eval_callback_gives_held_out_metrics():
    from ecoflap_utils.finetune import eval_callback

    a = load_model("tiny-llama")
    res = finetune(a, a.calibration_samples(8, 1), steps=2, lr=1e-3, batch_size=4, progress=False,
                   eval_fn=eval_callback("perplexity", limit=1, window=32))
    assert [e["step"] for e in res.evals] == [0, 2]
    assert all(e["perplexity"] > 1 and e["windows"] == 1 for e in res.evals)


def test_fast_blip2_loss_equals_the_adapter_loss():
    a = load_model("tiny-blip2-opt")
    batch = a.batches(a.calibration_samples(6, 1), 6)[0]
    q = a.model.query_tokens
    q.requires_grad_(True)
    rows = []
    head = a.model.language_model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape))
    fast = task_loss(a, batch)  # adapter.training_loss
    hook.remove()
    assert rows == [torch.Size([int((batch["labels"][:, 1:] != -100).sum()), head.in_features])]  # targets only
    (g_fast,) = torch.autograd.grad(fast, q)
    full = a.loss(batch)
    (g_full,) = torch.autograd.grad(full, q)
    assert torch.allclose(fast, full, atol=1e-5)
    assert torch.allclose(g_fast, g_full, atol=1e-6, rtol=1e-4)


def test_schedule_warmup_and_bad_numbers():
    assert warmup_steps(0.1, 50) == 5 and warmup_steps(7, 50) == 7 and warmup_steps(0.0, 50) == 0
    for bad in (1.5, -1, 60, "x"):
        with pytest.raises(UserError):
            warmup_steps(bad, 50)
    a = load_model("tiny-llama")
    res = finetune(a, a.calibration_samples(4, 1), steps=10, lr=1e-3, batch_size=2, warmup=4, progress=False)
    assert res.lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert res.lrs[-1] < 1e-4 and all(x >= y for x, y in zip(res.lrs[3:], res.lrs[4:]))
    for kw in ({"steps": 0, "lr": 1e-3}, {"steps": 3, "lr": 0.0}, {"steps": 3, "lr": -1.0},
               {"steps": 3, "lr": 1e-3, "batch_size": 0}, {"steps": 3, "lr": 1e-3, "weight_decay": -0.1}):
        with pytest.raises(UserError):
            finetune(a, a.calibration_samples(4, 1), progress=False, **kw)


def test_interrupted_training_restores_flags_and_eval_mode(monkeypatch):
    a = load_model("tiny-blip2-opt")
    flags = {n: p.requires_grad for n, p in a.model.named_parameters()}
    calls = []
    real = torch.optim.AdamW.step

    def step(self, *args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(self, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(RuntimeError, match="boom"):
        finetune(a, a.calibration_samples(8, 1), steps=5, lr=1e-3, batch_size=4, progress=False)
    assert {n: p.requires_grad for n, p in a.model.named_parameters()} == flags
    assert not any(m.training for m in a.model.modules())
    assert all(p.grad is None for p in a.model.parameters())


def test_default_data_is_the_calibration_sampler_and_grows_past_the_pool():
    a = load_model("tiny-llama")
    d = default_finetune_data(a, 5, seed=3)
    assert d.samples == a.calibration_samples(5, 3) and d.name.startswith("bundled")
    a.finetune_pool_size = 4  # an adapter whose sampler has 4 distinct samples: further draws, new seeds
    d = default_finetune_data(a, 10, seed=3)
    assert len(d) == 10 and d.samples[:4] == a.calibration_samples(4, 3)
    assert most_common_answer(["2", "two", "2", "two", "3"]) == "2"


# --------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("in") / "run"
    assert main(["prune", "--model", "tiny-blip2-opt", "--method", "wanda", "--sparsity", "0.5",
                 "--calib-samples", "16", "--out", str(out), "--no-progress"]) == 0
    return out


def test_cli_writes_a_run_that_loads_and_evaluates(pruned_run, tmp_path, capsys):
    from ecoflap_utils.evaluate import evaluate

    out = tmp_path / "ft"
    rc = main(["finetune", "--model", str(pruned_run), "--steps", "6", "--lr", "1e-3", "--batch-size", "4",
               "--stacks", "qformer,lm", "--weight-decay", "0.05", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    for f in ("pruning_config.json", "sparsity_report.csv", "resources.json", "loss_curve.json",
              "sparsity_dict.json", "model/config.json", "model/model.safetensors"):
        assert (out / f).exists(), f
    cfg_in = json.loads((pruned_run / "pruning_config.json").read_text())
    cfg = json.loads((out / "pruning_config.json").read_text())
    for k in ("model", "family", "method", "requested_sparsity", "actual_sparsity", "per_layer_sparsity",
              "allocation", "calibration"):
        assert cfg[k] == cfg_in[k], k
    ft = cfg["finetune"]
    assert ft["steps"] == 6 and ft["lr"] == 1e-3 and ft["stacks"] == ["qformer", "lm"] and ft["batch_size"] == 4
    assert ft["seed"] == 0 and ft["data"].startswith("bundled") and ft["weight_decay"] == 0.05
    assert ft["final_loss"] is not None and ft["input"] == str(pruned_run) and ft["kept_zeros"] > 0
    assert (out / "sparsity_report.csv").read_bytes() == (pruned_run / "sparsity_report.csv").read_bytes()
    res_in = json.loads((pruned_run / "resources.json").read_text())
    res = json.loads((out / "resources.json").read_text())
    assert list(res["stages"]) == list(res_in["stages"]) + ["finetune"]
    assert res["stages"]["finetune"]["wall_s"] > 0
    assert res["total_wall_s"] == pytest.approx(sum(s["wall_s"] for s in res["stages"].values()), abs=1e-3)
    curve = json.loads((out / "loss_curve.json").read_text())
    assert curve["step"] == list(range(1, 7)) and len(curve["loss"]) == 6
    # loads with the zeros of the input run, and evaluates
    before, after = load_model(str(pruned_run)), load_model(str(out))
    zb, za = zero_pattern(before), zero_pattern(after)
    assert all(torch.equal(zb[k], za[k]) for k in zb)
    assert any(not torch.equal(before.parameter(n), after.parameter(n)) for n in after.layer_names(["lm"]))
    rows = list(csv.DictReader((out / "sparsity_report.csv").open()))
    for r in rows:
        z = za[r["name"]]
        assert abs(float(r["actual_sparsity"]) - z.float().mean().item()) < 1e-5
    metrics = evaluate(after, "vqav2", limit=4, num_beams=1, progress=False)
    assert 0.0 <= metrics["vqa_accuracy"] <= 100.0 and metrics["n"] == 4


def test_cli_interrupted_run_leaves_nothing_and_a_rerun_succeeds(pruned_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ft"
    real = torch.optim.AdamW.step
    calls = []

    def step(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    args = ["finetune", "--model", str(pruned_run), "--steps", "5", "--batch-size", "4", "--out", str(out),
            "--no-progress"]
    assert main(args) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    assert main(args) == 0
    assert json.loads((out / "pruning_config.json").read_text())["finetune"]["steps"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["ft"]


def test_cli_dense_model_only_with_dense(tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", "--model", "tiny-llama", "--dense", "--steps", "3", "--batch-size", "2", "--out",
                 str(out), "--no-progress"]) == 0
    cfg = json.loads((out / "pruning_config.json").read_text())
    assert "method" not in cfg and cfg["finetune"]["dense"] is True and cfg["model"] == "tiny-llama"
    b = load_model(str(out))
    assert b.family == "causal_lm"
    # a dense run is refused without --dense
    rc = main(["finetune", "--model", str(out), "--steps", "3", "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and "--dense" in capsys.readouterr().err


@pytest.mark.parametrize("flags,extra,match", [
    ({"--model": "tiny-llama"}, [], r"dense model.*--dense"),
    ({"--model": "{empty}"}, [], "not a pruned run"),
    ({"--steps": "0"}, [], r"--steps must be > 0"),
    ({"--steps": "-3"}, [], r"--steps must be > 0"),
    ({"--lr": "0"}, [], r"--lr must be > 0"),
    ({"--lr": "-0.0001"}, [], r"--lr must be > 0"),
    ({"--stacks": "qformer,text_decoder"}, [], r"no stack 'text_decoder'.*vision, qformer, lm"),
    ({"--data": "{bad}"}, [], r"bad\.json has no 'questions' field .*'images' field"),
    ({"--data": "{questions}", "--annotations": "{noanswers}"}, [],
     r"annotations\.json: annotation 0 has no 'answers'"),
    ({"--data": "{missing}"}, [], "does not exist"),
    ({}, ["--dense"], r"is a pruned run.*drop --dense"),
    ({"--out": "{held}"}, [], "--overwrite"),
])
def test_cli_refuses_bad_input_and_writes_nothing(pruned_run, flags, extra, match, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text(json.dumps({"info": {}, "licenses": []}))
    (tmp_path / "questions.json").write_text(json.dumps({"questions": [
        {"question_id": 1, "image_id": 1, "question": "what?"}]}))
    (tmp_path / "annotations.json").write_text(json.dumps({"annotations": [{"question_id": 1}]}))
    held = tmp_path / "held"
    held.mkdir()
    (held / "pruning_config.json").write_text("{}")
    paths = {"empty": tmp_path / "empty", "bad": tmp_path / "bad.json", "questions": tmp_path / "questions.json",
             "noanswers": tmp_path / "annotations.json", "missing": tmp_path / "missing.json", "held": held}
    opts = {"--model": str(pruned_run), "--steps": "3", "--out": str(tmp_path / "out")}
    opts.update({k: v.format(**paths) for k, v in flags.items()})
    argv = ["finetune", *[x for kv in opts.items() for x in kv], *extra, "--no-progress"]
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no partial folder
    assert (held / "pruning_config.json").read_text() == "{}"


def _write_image(path, value):
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), value, dtype=np.uint8)).save(path)


def test_cli_reads_vqa_and_caption_files(pruned_run, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        _write_image(root / f"{i:012d}.jpg", 60 * i)
    (tmp_path / "vqa_questions.json").write_text(json.dumps({"questions": [
        {"question_id": i, "image_id": i, "question": f"what is {i}?"} for i in range(3)]}))
    (tmp_path / "vqa_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": i, "answers": [{"answer": str(i)}] * 10} for i in range(3)]}))
    (tmp_path / "captions.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(3)],
        "annotations": [{"image_id": i, "caption": f"a picture of {i}"} for i in range(3)]}))
    out = tmp_path / "ft_vqa"
    assert main(["finetune", "--model", str(pruned_run), "--steps", "2", "--batch-size", "2", "--data",
                 str(tmp_path / "vqa_questions.json"), "--image-root", str(root), "--out", str(out),
                 "--no-progress"]) == 0
    ft = json.loads((out / "pruning_config.json").read_text())["finetune"]
    assert ft["data"].startswith("vqa:") and ft["samples"] == 3
    out = tmp_path / "ft_cap"
    assert main(["finetune", "--model", str(pruned_run), "--steps", "2", "--batch-size", "2", "--data",
                 str(tmp_path / "captions.json"), "--image-root", str(root), "--out", str(out),
                 "--no-progress"]) == 0
    ft = json.loads((out / "pruning_config.json").read_text())["finetune"]
    assert ft["data"].startswith("captions:") and ft["samples"] == 3


def test_caption_rows_are_read_as_calibration_reads_them(tmp_path):
    """Karpathy's JSON gives its train and restval rows (BLIP's 113k training images), not val; a CSV works too;
    a file of another kind is refused in one line."""
    from ecoflap_utils.finetune import read_finetune_rows

    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _write_image(tmp_path / name, 10)
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [
        {"filepath": "", "filename": "a.jpg", "split": "train", "sentences": [{"raw": "one"}, {"raw": "two"}]},
        {"filepath": "", "filename": "b.jpg", "split": "restval", "sentences": [{"raw": "three"}]},
        {"filepath": "", "filename": "c.jpg", "split": "val", "sentences": [{"raw": "held out"}]}]}))
    rows, name = read_finetune_rows("blip2", tmp_path / "dataset_coco.json")
    assert [(Path(im).name, p, t) for im, p, t in rows] == [("a.jpg", None, "one"), ("a.jpg", None, "two"),
                                                            ("b.jpg", None, "three")]
    assert name == f"captions: {tmp_path / 'dataset_coco.json'}"
    (tmp_path / "pairs.csv").write_text("filepath,caption\nc.jpg,a digit\n")
    rows, _ = read_finetune_rows("clip", tmp_path / "pairs.csv")
    assert [(Path(im).name, c) for im, c in rows] == [("c.jpg", "a digit")]
    (tmp_path / "notes.txt").write_text("plain text")
    with pytest.raises(UserError, match=r"is 'text' data; fine-tuning reads .* image-caption pairs"):
        read_finetune_rows("blip2", tmp_path / "notes.txt")


def test_file_samples_match_the_evaluation_prompt():
    from ecoflap_utils.evaluate import VQA_PROMPT, _tokenize_prompt
    from ecoflap_utils.finetune import blip2_sample

    a = load_model("tiny-blip2-opt")
    s = blip2_sample(a, torch.zeros(3, 32, 32), VQA_PROMPT.format("what?"), "two")
    assert s["prefix_ids"] == _tokenize_prompt(a.tokenizer, "Question: what? Short answer:")
    assert s["target_ids"] == a.tokenizer.encode(" two") + [a.eos_id]
    t5 = load_model("tiny-blip2-t5")
    assert blip2_sample(t5, torch.zeros(3, 32, 32), "q", "two")["target_ids"] == t5.tokenizer.encode("two")
    data = FinetuneData([("x", "p", "t")], "rows", prepare=lambda b: [blip2_sample(a, torch.zeros(3, 32, 32), "p", "t")
                                                                      for _ in b])
    assert data.batch(a, data.samples)["input_ids"].shape[0] == 1


def test_cli_help_documents_the_flags(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["finetune", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--steps", "--lr", "--data", "--annotations", "--image-root", "--stacks", "--batch-size",
                 "--weight-decay", "--warmup", "--seed", "--dense", "--out", "--overwrite", "--no-progress"):
        assert flag in text, flag
