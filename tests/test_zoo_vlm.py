"""The bundled vision-language models ``mini-clip`` and ``mini-blip2``: offline loading, structure,
train/held-out separation, dense quality on a held-out subset, exact save/load, and the training entry point."""
import json
import os
import socket

import numpy as np
import pytest
import torch

from ecoflap_utils import load_model, load_pruned, save_pruned
from ecoflap_utils.data import images as digit_data
from ecoflap_utils.errors import UserError
from ecoflap_utils.zoo import miniblip2 as mb
from ecoflap_utils.zoo import miniclip as mc
from ecoflap_utils.zoo import train as zoo_train
from ecoflap_utils.zoo.__main__ import main as zoo_main

# Dense quality measured on the full held-out set (data/README_vlm.md): mini-clip 97.6% zero-shot top-1,
# mini-blip2 97.9% VQA accuracy (greedy generate). The subset thresholds leave room for a subset's sampling noise.
CLIP_SUBSET, CLIP_MIN_ACC = 200, 93.0
BLIP2_SUBSET, BLIP2_MIN_ACC = 20, 85.0

needs_clip = pytest.mark.skipif(not (mc.DATA_DIR / mc.WEIGHTS_FILE).exists(), reason="data/mini-clip not built")
needs_blip2 = pytest.mark.skipif(not (mb.DATA_DIR / mb.WEIGHTS_FILE).exists() or
                                 not (mc.DATA_DIR / mc.WEIGHTS_FILE).exists(), reason="data/mini-blip2 not built")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def clip():
    return load_model("mini-clip")


@pytest.fixture(scope="module")
def blip2(mini_blip2):
    return mini_blip2


# --------------------------------------------------------------------------- data split
def test_digit_split_is_disjoint_complete_balanced_and_fixed():
    images, labels = digit_data.load_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    train, held = digit_data.split_indices("train"), digit_data.split_indices("heldout")
    assert len(set(train.tolist()) & set(held.tolist())) == 0
    assert sorted(train.tolist() + held.tolist()) == list(range(5000))
    assert np.bincount(labels[held], minlength=10).tolist() == [digit_data.HELDOUT_PER_CLASS] * 10
    # the split depends only on its seed: another seed gives another held-out part
    assert not np.array_equal(held, digit_data.split_indices("heldout", seed=digit_data.SPLIT_SEED + 1))
    draw = digit_data.sample_indices("train", 50, seed=3)
    assert set(draw.tolist()) <= set(train.tolist()) and len(set(draw.tolist())) == 50
    assert np.array_equal(draw, digit_data.sample_indices("train", 50, seed=3))
    with pytest.raises(UserError):
        digit_data.split_indices("test")
    with pytest.raises(UserError):
        digit_data.sample_indices("heldout", 1001)


# --------------------------------------------------------------------------- mini-clip
@needs_clip
def test_miniclip_loads_offline_with_expected_blocks(no_network):
    a = load_model("mini-clip")
    assert a.family == "clip" and a.default_task == "zeroshot"
    assert {s: len(a.stack_blocks(s)) for s in a.stacks()} == {"vision": 6, "text_encoder": 6}
    assert [b.modality for b in a.blocks] == ["vision"] * 6 + ["language"] * 6
    assert len(a.blocks[0].weights) == 4 and len(a.blocks[-1].weights) == 6  # qkv, proj, fc1, fc2 / q,k,v,o,up,down
    for b in a.blocks:
        for w in b.weights:
            assert a.model.get_parameter(w).ndim == 2
    # the text tower is the pretrained MiniLM, untouched: its weights equal the package's file
    from safetensors.torch import load_file

    ref = load_file(str(mc.minilm_folder() / "model.safetensors"))
    key = next(k for k in ref if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert torch.equal(a.model.text.encoder.layer[0].attention.self.query.weight, ref[key])


@needs_clip
def test_miniclip_calibration_from_training_and_evaluation_from_heldout(clip):
    train = set(digit_data.split_indices("train").tolist())
    held = set(digit_data.split_indices("heldout").tolist())
    samples = clip.calibration_samples(64, seed=1)
    assert len(samples) == 64 and {s["index"] for s in samples} <= train
    _, labels = digit_data.load_mnist()
    assert all(mc.CLASSNAMES[labels[s["index"]]] in s["caption"] for s in samples)
    data = clip.bundled_eval_data("zeroshot")
    assert set(data["indices"]) == held and len(data["images"]) == 1000
    assert data["labels"] == [int(labels[i]) for i in data["indices"]]
    ret = clip.bundled_eval_data("retrieval")
    assert set(ret["indices"]) <= held and sorted(ret["labels"]) == list(range(10))
    assert len(ret["texts"]) == 10 * len(mc.TEMPLATES) and ret["img2txt"][3] == list(range(24, 32))
    with pytest.raises(UserError):
        clip.bundled_eval_data("vqav2")
    batch = clip.collate(samples[:8])
    loss = clip.loss(batch)
    assert torch.isfinite(loss) and loss.item() > 0


@needs_clip
def test_miniclip_zeroshot_on_heldout_subset(clip):
    data = clip.bundled_eval_data("zeroshot", limit=CLIP_SUBSET)
    assert len(set(data["labels"])) == 10
    acc = zoo_train.zeroshot_accuracy(clip, data)
    assert acc >= CLIP_MIN_ACC, acc
    # the tokenizer/encoder contract of the zero-shot evaluator: encode_text(tokenizer(texts)) is normalised
    emb = clip.encode_text(clip.tokenizer(["a photo of the digit three.", "the number nine."]))
    assert emb.shape == (2, mc.EMBED_DIM) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


@needs_clip
def test_miniclip_save_load_exact(clip, tmp_path):
    # perturb one vision and one text weight so that a load of the shipped files would not match
    a = load_model("mini-clip")
    with torch.no_grad():
        a.parameter(a.blocks[0].weights[0])[0, :5] = 0.0
        a.parameter(a.blocks[-1].weights[0])[1, :5] = 0.0
    save_pruned(a, tmp_path / "run")
    b = load_pruned(tmp_path / "run")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sb[a.blocks[0].weights[0]], clip.model.state_dict()[a.blocks[0].weights[0]])
    # and the shipped load is itself deterministic
    c = load_model("mini-clip")
    assert all(torch.equal(v, c.model.state_dict()[k]) for k, v in clip.model.state_dict().items())


def test_miniclip_training_entry_point_runs(tmp_path, capsys):
    rc = zoo_main(["build", "mini-clip", "--steps", "2", "--batch-size", "16", "--out", str(tmp_path / "mc"),
                   "--eval-limit", "20"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2 and 0.0 <= out["acc1"] <= 100.0
    cfg = json.loads((tmp_path / "mc" / mc.CONFIG_FILE).read_text())
    assert cfg["training"]["steps"] == 2 and cfg["training"]["seed"] == 0
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "mc" / mc.WEIGHTS_FILE))
    assert not any(k.startswith("text.") for k in state)  # the pretrained text tower is never written
    assert "visual.encoder.layers.5.mlp.fc2.weight" in state and "text_proj.weight" in state
    assert zoo_main(["build", "mini-clip", "--steps", "0", "--out", str(tmp_path / "x")]) == 2


# --------------------------------------------------------------------------- mini-blip2
@needs_blip2
def test_miniblip2_loads_offline_with_expected_blocks_and_shared_vit(no_network, blip2):
    from transformers import Blip2ForConditionalGeneration

    a = blip2
    assert isinstance(a.model, Blip2ForConditionalGeneration) and a.default_task == "vqav2"
    assert {s: len(a.stack_blocks(s)) for s in a.stacks()} == {"vision": 6, "qformer": 4, "lm": 30}
    assert a.default_stacks == ("vision", "lm")
    assert a.model.config.image_token_index == mb.IMAGE_TOKEN_INDEX
    # the image encoder is mini-clip's ViT, weight for weight
    from safetensors.torch import load_file

    clip_state = load_file(str(mc.DATA_DIR / mc.WEIGHTS_FILE))
    for k, v in a.model.vision_model.state_dict().items():
        assert torch.equal(v, clip_state["visual." + k]), k
    # the shipped file holds only the trained bridge
    shipped = load_file(str(mb.DATA_DIR / mb.WEIGHTS_FILE))
    assert all(k.startswith(("query_tokens", "qformer.", "language_projection.")) for k in shipped)


@needs_blip2
def test_miniblip2_calibration_from_training_and_evaluation_from_heldout(blip2):
    train = set(digit_data.split_indices("train").tolist())
    held = set(digit_data.split_indices("heldout").tolist())
    samples = blip2.calibration_samples(32, seed=2)
    assert {s["index"] for s in samples} <= train
    assert {s["task"] for s in samples} == set(mb.TASK_WEIGHTS)
    tok = blip2.tokenizer
    for s in samples:
        assert s["target_ids"][-1] == tok.eos_token_id
        assert s["pixel_values"].shape == (3, 28, 28)
    rows = blip2.bundled_eval_data("vqav2")
    assert {r["index"] for r in rows} == held and len(rows) == 1000
    assert {r["question"] for r in rows} == {mb.QUESTION_DIGIT, mb.QUESTION_PARITY}
    assert all(len(r["answers"]) == 10 for r in rows)
    caps = blip2.bundled_eval_data("caption", limit=5)
    assert {r["index"] for r in caps} <= held and all(r["references"] for r in caps)
    loss = blip2.loss(blip2.collate(samples[:4]))
    assert torch.isfinite(loss)


@needs_blip2
def test_miniblip2_vqa_on_heldout_subset_with_generate(blip2):
    from ecoflap_utils.evaluate import vqa

    rows = blip2.bundled_eval_data("vqav2", limit=BLIP2_SUBSET)
    res = vqa(blip2, rows, num_beams=1, batch_size=BLIP2_SUBSET)
    assert res["vqa_accuracy"] >= BLIP2_MIN_ACC, [p["prediction"] for p in res["predictions"]]


@pytest.mark.slow
@needs_blip2
def test_miniblip2_save_load_exact(blip2, tmp_path):
    a = blip2
    name = a.stack_blocks("lm")[0].weights[0]
    before = a.parameter(name).detach().clone()
    try:
        with torch.no_grad():
            a.parameter(name)[0, :7] = 0.0
        save_pruned(a, tmp_path / "run")
        b = load_pruned(tmp_path / "run")
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert b.default_task == "vqav2" and b.bundled_eval_data("vqav2", limit=2)
    finally:
        with torch.no_grad():
            a.parameter(name).copy_(before)


@pytest.mark.slow
@needs_clip
def test_miniblip2_training_entry_point_runs(tmp_path, capsys):
    rc = zoo_main(["build", "mini-blip2", "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "mb"),
                   "--eval-limit", "4"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "mb" / mb.WEIGHTS_FILE))
    assert set(k.split(".")[0] for k in state) == {"query_tokens", "qformer", "language_projection"}


# --------------------------------------------------------------------------- reproducing the shipped checkpoints
@pytest.mark.slow
@needs_clip
def test_miniclip_build_reproduces_shipped_quality(tmp_path):
    """The training entry point's recipe lands within 2 points of the shipped checkpoint (about 6 CPU-minutes)."""
    shipped = mc.shipped_config()["metrics"]["zeroshot_top1_heldout"]
    res = zoo_train.train_miniclip(out=tmp_path / "mc", threads=2)
    assert abs(res["acc1"] - shipped) <= 2.0, (res, shipped)


@pytest.mark.slow
@needs_clip
@pytest.mark.skipif(not os.environ.get("ECOFLAP_REPRO_BLIP2"),
                    reason="about 15-25 CPU-minutes: set ECOFLAP_REPRO_BLIP2=1 to run it")
def test_miniblip2_build_reproduces_shipped_quality(tmp_path):
    shipped = mb.shipped_config()["metrics"]["vqa_accuracy_heldout_greedy"]
    res = zoo_train.train_miniblip2(out=tmp_path / "mb", threads=2)
    assert abs(res["vqa_accuracy"] - shipped) <= 2.0, (res, shipped)
