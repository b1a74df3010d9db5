"""The official ECoFLaP release's formats: LAVIS names, checkpoints and score files (ecoflap_utils.lavis)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from ecoflap_utils import lavis
from ecoflap_utils.errors import UserError
from ecoflap_utils.models.hf import Blip2Adapter
from ecoflap_utils.models.tiny import build_tiny

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / "data" / "official"
SCORE_FILES = sorted(OFFICIAL.glob("blip2-flan-t5-xl_local_*_scores.json"))


@pytest.fixture(scope="module")
def flan_t5_xl():
    """BLIP-2 Flan-T5-XL's architecture (bench/gpu_check.py), on the meta device: names and shapes only."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gpu_check import blip2_flan_t5_xl_config
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from transformers import Blip2ForConditionalGeneration

    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(blip2_flan_t5_xl_config("full"))
    return Blip2Adapter(model, "blip2-flan-t5-xl (meta)")


def _official(path):
    return json.loads(Path(path).read_text())


def test_bundled_files_and_license():
    assert [p.name for p in SCORE_FILES] == ["blip2-flan-t5-xl_local_sparsegpt_scores.json",
                                             "blip2-flan-t5-xl_local_wanda_scores.json"]
    assert "MIT License" in (OFFICIAL / "LICENSE-ECoFLaP").read_text()
    for p in SCORE_FILES:
        d = _official(p)
        assert {"source", "model", "what", "scores"} <= set(d)
        assert "59dac0a" in d["source"] and "ylsung/ECoFLaP" in d["source"]
    assert lavis.official_score_file("wanda") in SCORE_FILES


@pytest.mark.parametrize("path", SCORE_FILES, ids=lambda p: p.name.split("_")[2])
def test_official_names_map_one_to_one_onto_prunable_weights(path, flan_t5_xl):
    names = list(_official(path)["scores"])
    assert len(names) == 588
    mapped = [lavis.lavis_to_hf_name(n, lm="t5") for n in names]
    assert len(set(mapped)) == len(mapped)  # injective
    assert set(mapped) == set(flan_t5_xl.layer_names())  # exactly the prunable vision + T5 weights
    assert [lavis.hf_to_lavis_name(m, lm="t5") for m in mapped] == names  # and back


@pytest.mark.parametrize("path", SCORE_FILES, ids=lambda p: p.name.split("_")[2])
def test_read_official_scores(path, flan_t5_xl):
    scores = lavis.read_official_scores(path, flan_t5_xl)
    assert len(scores) == 588
    assert set(scores) == set(flan_t5_xl.layer_names())
    assert all(isinstance(v, float) and math.isfinite(v) for v in scores.values())
    raw = _official(path)["scores"]
    assert (scores["vision_model.encoder.layers.0.self_attn.qkv.weight"]
            == raw["visual_encoder.blocks.0.attn.qkv.weight"])
    assert (scores["language_model.decoder.block.23.layer.2.DenseReluDense.wo.weight"]
            == raw["t5_model.decoder.block.23.layer.2.DenseReluDense.wo.weight"])


def test_read_official_scores_authors_pth_and_errors(tmp_path, flan_t5_xl):
    raw = _official(SCORE_FILES[0])["scores"]
    pth = tmp_path / "scores.pth"  # the authors' own format: a dict LAVIS name -> float
    torch.save(dict(raw), pth)
    assert lavis.read_official_scores(pth, flan_t5_xl) == lavis.read_official_scores(SCORE_FILES[0], flan_t5_xl)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"scores": {"visual_encoder.blocks.0.attn.qkv.weight": 1.0,
                                          "visual_encoder.blocks.99.attn.qkv.weight": 2.0}}))
    with pytest.raises(UserError, match=r"visual_encoder\.blocks\.99\.attn\.qkv\.weight"):
        lavis.read_official_scores(bad, flan_t5_xl)
    bad.write_text(json.dumps({"scores": {"something.else": 1.0}}))
    with pytest.raises(UserError, match=r"something\.else"):
        lavis.read_official_scores(bad, flan_t5_xl)
    bad.write_text(json.dumps({"scores": {"visual_encoder.blocks.0.attn.qkv.weight": "nan"}}))
    with pytest.raises(UserError, match="finite"):
        lavis.read_official_scores(bad, flan_t5_xl)
    # the Flan-T5-XL scores do not fit a smaller model: the first name it lacks is named
    with pytest.raises(UserError, match=r"visual_encoder\.blocks\.3\.attn\.qkv\.weight"):
        lavis.read_official_scores(SCORE_FILES[0], build_tiny("tiny-blip2-t5"))
    with pytest.raises(UserError, match="does not exist"):
        lavis.read_official_scores(tmp_path / "nope.json", flan_t5_xl)


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize("lav,hf", [
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("ln_vision.bias", "vision_model.post_layernorm.bias"),
    ("visual_encoder.blocks.7.norm1.weight", "vision_model.encoder.layers.7.layer_norm1.weight"),
    ("visual_encoder.blocks.7.attn.proj.bias", "vision_model.encoder.layers.7.self_attn.projection.bias"),
    ("visual_encoder.blocks.38.mlp.fc2.weight", "vision_model.encoder.layers.38.mlp.fc2.weight"),
    ("query_tokens", "query_tokens"),
    ("Qformer.bert.embeddings.LayerNorm.weight", "qformer.layernorm.weight"),
    ("Qformer.bert.encoder.layer.2.attention.self.query.weight",
     "qformer.encoder.layer.2.attention.attention.query.weight"),
    ("Qformer.bert.encoder.layer.2.crossattention.self.value.bias",
     "qformer.encoder.layer.2.crossattention.attention.value.bias"),
    ("Qformer.bert.encoder.layer.2.attention.output.dense.weight",
     "qformer.encoder.layer.2.attention.output.dense.weight"),
    ("Qformer.bert.encoder.layer.11.output_query.LayerNorm.bias",
     "qformer.encoder.layer.11.output_query.LayerNorm.bias"),
    ("t5_proj.weight", "language_projection.weight"),
    ("t5_model.shared.weight", "language_model.shared.weight"),
    ("t5_model.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
     "language_model.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    ("opt_proj.bias", "language_projection.bias"),
    ("opt_model.model.decoder.layers.4.self_attn.k_proj.weight",
     "language_model.model.decoder.layers.4.self_attn.k_proj.weight"),
    ("opt_model.lm_head.weight", "language_model.lm_head.weight"),
])
def test_name_rules_both_ways(lav, hf):
    lm = "opt" if lav.startswith("opt") else "t5"
    assert lavis.lavis_to_hf_name(lav) == hf
    assert lavis.hf_to_lavis_name(hf, lm=lm) == lav


def test_name_special_cases():
    packed = "vision_model.encoder.layers.3.self_attn.qkv.bias"
    assert lavis.lavis_to_hf_name("visual_encoder.blocks.3.attn.q_bias") == packed
    assert lavis.lavis_to_hf_name("visual_encoder.blocks.3.attn.v_bias") == packed
    with pytest.raises(UserError, match="q_bias"):
        lavis.hf_to_lavis_name(packed)
    with pytest.raises(UserError, match="skip list"):
        lavis.lavis_to_hf_name("Qformer.bert.embeddings.position_ids")
    with pytest.raises(UserError, match="blip2_opt"):
        lavis.lavis_to_hf_name("opt_proj.weight", lm="t5")
    with pytest.raises(UserError):
        lavis.lavis_to_hf_name("visual_encoder.blocks.0.attn.qkv.bias")
    with pytest.raises(UserError):
        lavis.hf_to_lavis_name("language_model.lm_head.weight", lm="llama")


def test_block_names():
    assert lavis.block_to_lavis("vision.3") == "visual_encoder.blocks.3"
    assert lavis.block_to_lavis("text_encoder.5") == "t5_model.encoder.block.5"
    assert lavis.block_to_lavis("text_decoder.2") == "t5_model.decoder.block.2"
    assert lavis.block_to_lavis("qformer.1") == "Qformer.bert.encoder.layer.1"
    assert lavis.block_to_lavis("lm.7", lm="opt") == "opt_model.model.decoder.layers.7"
    assert lavis.block_to_lavis("vision") == "visual_encoder.blocks"
    with pytest.raises(UserError):
        lavis.block_to_lavis("lm.7", lm="t5")
    with pytest.raises(UserError):
        lavis.block_to_lavis("text_encoder.1", lm="opt")


@pytest.mark.parametrize("name,blocks", [("tiny-blip2-t5", ["vision.0", "text_encoder.2", "text_decoder.1", "qformer.0",
                                                             "vision", "text_decoder"]),
                                         ("tiny-blip2-opt", ["vision.2", "lm.0", "lm"])])
def test_to_lavis_names_round_trip(name, blocks):
    adapter = build_tiny(name)
    lm = lavis.lm_of(adapter)
    sparsity = {w: 0.1 * (i % 7) for i, w in enumerate(adapter.layer_names())}  # a sparsity_dict.json
    out = lavis.to_lavis_names(sparsity, lm=lm)
    assert len(out) == len(sparsity)
    assert all(k.startswith(("visual_encoder.blocks.", f"{lm}_model.")) for k in out)
    assert lavis.from_lavis_names(out, lm=lm) == sparsity
    table = {b: {"score": float(i)} for i, b in enumerate(blocks)}  # a scores.json
    out = lavis.to_lavis_names(table, lm=lm)
    assert lavis.from_lavis_names(out) == table
    if lm == "t5":
        assert out["t5_model.encoder.block.2"] == table["text_encoder.2"]


# --------------------------------------------------------------------------- checkpoints
def _randomise(model, seed):
    """Seeded random values in every tensor (LAVIS has no key bias: keep that part of qkv.bias zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
        for name, p in model.named_parameters():
            if name.endswith("self_attn.qkv.bias"):
                p.view(3, -1)[1].zero_()
    return model


def _fresh(model, seed):
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(seed)
    fresh = Blip2ForConditionalGeneration._from_config(model.config, attn_implementation="eager")
    return _randomise(fresh, seed)


def _lavis_file(tmp_path, name, seed=1):
    """A randomised tiny model and its LAVIS state dict."""
    src = _randomise(build_tiny(name).model, seed)
    sd = lavis.hf_state_dict_to_lavis(src)
    return src, sd


@pytest.mark.parametrize("name", ["tiny-blip2-t5", "tiny-blip2-opt"])
def test_lavis_checkpoint_imports_bit_exactly(tmp_path, name):
    src, sd = _lavis_file(tmp_path, name)
    lm = "t5" if name.endswith("t5") else "opt"
    assert {"visual_encoder.blocks.0.attn.q_bias", "visual_encoder.blocks.0.attn.v_bias", f"{lm}_proj.weight",
            "ln_vision.weight", "Qformer.bert.encoder.layer.0.attention.self.query.weight"} <= set(sd)
    assert not any(k.startswith(("vision_model.", "qformer.", "language_")) for k in sd)
    # what an in-memory LAVIS model's state_dict also holds (skip list)
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(32).unsqueeze(0)
    path = tmp_path / "lavis.pth"
    torch.save({"model": sd}, path)

    dst = _fresh(src, seed=2)
    before = dst.state_dict()
    assert not torch.equal(before["query_tokens"], src.state_dict()["query_tokens"])
    assert lavis.load_lavis_checkpoint(path, dst) is dst
    want, got = src.state_dict(), dst.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # the inverse mapping gives the file back
    again = lavis.hf_state_dict_to_lavis(dst)
    del sd["Qformer.bert.embeddings.position_ids"]
    assert set(again) == set(sd) and all(torch.equal(again[k], sd[k]) for k in sd)
    # and the LAVIS->transformers converter agrees with the model's own state dict
    conv = lavis.lavis_state_dict_to_hf(sd, dst)
    assert set(conv) == set(want) and all(torch.equal(conv[k], want[k]) for k in want)


def test_untied_lm_head_of_flan_t5(tmp_path):
    """Flan-T5 (and LAVIS) have an lm_head separate from the embeddings; transformers 5 builds T5 tied."""
    src, sd = _lavis_file(tmp_path, "tiny-blip2-t5")
    g = torch.Generator().manual_seed(5)
    sd["t5_model.lm_head.weight"] = torch.randn(sd["t5_model.lm_head.weight"].shape, generator=g)
    path = tmp_path / "plain.pth"
    torch.save(sd, path)  # a bare state dict, as ECoFLaP's evaluate_blip.py writes
    dst = _fresh(src, seed=3)
    lm = dst.language_model
    assert lm.lm_head.weight is lm.shared.weight
    lavis.load_lavis_checkpoint(path, dst)
    assert torch.equal(lm.lm_head.weight, sd["t5_model.lm_head.weight"])
    for k in ("shared", "encoder.embed_tokens", "decoder.embed_tokens"):
        assert torch.equal(lm.get_submodule(k).weight, sd["t5_model.shared.weight"]), k
    assert lm.lm_head.weight is not lm.shared.weight
    assert dst.get_output_embeddings().weight is lm.lm_head.weight
    assert "language_model.lm_head.weight" not in getattr(dst, "all_tied_weights_keys", {})


def test_load_through_adapter_and_meta_and_paths(tmp_path, flan_t5_xl):
    src, sd = _lavis_file(tmp_path, "tiny-blip2-opt")
    path = tmp_path / "opt.pth"
    torch.save({"model": sd}, path)
    adapter = build_tiny("tiny-blip2-opt")
    lavis.load_lavis_checkpoint(path, adapter)
    assert torch.equal(adapter.model.language_projection.weight, src.language_projection.weight)
    with pytest.raises(UserError, match="does not exist"):
        lavis.load_lavis_checkpoint(tmp_path / "missing.pth", adapter)
    with pytest.raises(UserError, match="blip2_opt checkpoint but the model's language model is t5"):
        lavis.load_lavis_checkpoint(path, build_tiny("tiny-blip2-t5"))
    with pytest.raises(UserError, match="meta device"):
        lavis.load_lavis_checkpoint(path, flan_t5_xl)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable torch checkpoint"):
        lavis.load_lavis_checkpoint(junk, adapter)


@pytest.mark.parametrize("edit,key,kind", [
    ("drop", "t5_model.encoder.block.1.layer.0.SelfAttention.q.weight", "missing"),
    ("drop", "visual_encoder.blocks.2.attn.v_bias", "missing"),
    ("drop", "t5_proj.bias", "missing"),
    ("add", "t5_model.encoder.block.1.layer.0.SelfAttention.extra.weight", "unexpected"),
    ("add", "vision_proj.weight", "unexpected"),
])
def test_missing_or_extra_key_is_one_line_user_error(tmp_path, edit, key, kind):
    src, sd = _lavis_file(tmp_path, "tiny-blip2-t5")
    if edit == "drop":
        del sd[key]
    else:
        sd[key] = torch.zeros(4, 4)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(UserError) as info:
        lavis.load_lavis_checkpoint(path, _fresh(src, 4))
    msg = str(info.value)
    assert "\n" not in msg
    assert f"1 {kind} key" in msg and key in msg and "expected a LAVIS BLIP-2" in msg


def test_shape_mismatch_and_partial_load(tmp_path):
    src, sd = _lavis_file(tmp_path, "tiny-blip2-t5")
    sd["t5_proj.weight"] = torch.zeros(3, 3)
    path = tmp_path / "shape.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(UserError, match=r"1 shape mismatch.*t5_proj\.weight \(3, 3\)"):
        lavis.load_lavis_checkpoint(path, _fresh(src, 4))
    # a LAVIS training checkpoint holds only what was trained (Q-Former, projection, query tokens)
    part = {k: v for k, v in lavis.hf_state_dict_to_lavis(src).items()
            if k.startswith(("Qformer.", "t5_proj.", "query_tokens"))}
    path = tmp_path / "partial.pth"
    torch.save({"model": part}, path)
    dst = _fresh(src, 5)
    vision_before = dst.vision_model.post_layernorm.weight.clone()
    with pytest.raises(UserError, match="missing key"):
        lavis.load_lavis_checkpoint(path, dst)
    lavis.load_lavis_checkpoint(path, dst, strict=False)
    assert torch.equal(dst.query_tokens, src.query_tokens)
    assert torch.equal(dst.vision_model.post_layernorm.weight, vision_before)


def test_export_needs_zero_key_bias():
    model = _randomise(build_tiny("tiny-blip2-t5").model, 0)
    with torch.no_grad():
        model.vision_model.encoder.layers[0].self_attn.qkv.bias.fill_(1.0)
    with pytest.raises(UserError, match="key bias"):
        lavis.hf_state_dict_to_lavis(model)
