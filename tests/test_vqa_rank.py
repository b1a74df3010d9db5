"""Rank inference for BLIP-2 VQA (``evaluate.rank_answers``, ``vqa(inference="rank")``): every candidate of an
answer list is scored by the language model's summed log-likelihood given the image and the prompt, and the
likeliest one is the prediction (LAVIS's BLIP VQA ``inference_method="rank"``, with every candidate scored in full).
"""
import json

import numpy as np
import pytest
import torch

from ecoflap_utils.cli import main as cli_main
from ecoflap_utils.errors import UserError
from ecoflap_utils.evaluate import evaluate, generate_answers, rank_answers, rows_answer_list, vqa
from ecoflap_utils.models.images import image_batch
from ecoflap_utils.zoo import miniblip2 as mb
from ecoflap_utils.zoo import miniclip as mc

pytestmark = pytest.mark.usefixtures("one_thread")

needs_blip2 = pytest.mark.skipif(not (mb.DATA_DIR / mb.WEIGHTS_FILE).exists() or
                                 not (mc.DATA_DIR / mc.WEIGHTS_FILE).exists(), reason="data/mini-blip2 not built")

PROMPTS = ["Question: what colour is it? Short answer:", "Question: is it big? Short answer:",
           "Question: what colour is it? Short answer:"]
CANDIDATES = ["red", "blue", "a red cat", "no"]


def _images(n=3):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(3, 32, 32, generator=g) for _ in range(n)]


def _hf_loglik(adapter, image, prompt, answer):
    """Independent: minus the model's own mean cross-entropy (``labels=``) times the number of label tokens.
    The answer is scored as generation would write it: a decoder-only LM's answer starts with a space after
    the prompt, and every answer ends with the LM's EOS."""
    model, tok = adapter.model, adapter.tokenizer
    cfg = model.config
    t5 = not cfg.use_decoder_only_language_model
    eos = cfg.text_config.eos_token_id
    prefix = [cfg.image_token_index] * cfg.num_query_tokens + tok.encode(prompt, add_special_tokens=True)
    target = tok.encode(answer if t5 else " " + answer, add_special_tokens=False) + [eos]
    pixel = image_batch(adapter, [image])
    with torch.no_grad():
        if t5:
            out = model(pixel_values=pixel, input_ids=torch.tensor([prefix]), labels=torch.tensor([target]))
        else:
            out = model(pixel_values=pixel, input_ids=torch.tensor([prefix + target]),
                        labels=torch.tensor([[-100] * len(prefix) + target]))
    return -float(out.loss) * len(target)


@pytest.mark.parametrize("which", ["blip_t5", "blip_opt"])
def test_loglik_equals_minus_the_hf_label_loss(which, request):
    adapter = request.getfixturevalue(which)
    images = _images()
    expected = np.array([[_hf_loglik(adapter, im, p, c) for c in CANDIDATES] for im, p in zip(images, PROMPTS)])
    # batched in several ways: prompts of two lengths (OPT groups them), candidates of 1-9 characters
    for batch_size, candidate_batch in ((1, 1), (2, 3), (16, 128)):
        best, scores = rank_answers(adapter, images, PROMPTS, CANDIDATES, batch_size=batch_size,
                                    candidate_batch=candidate_batch, progress=False)
        assert scores.shape == (3, 4) and scores.dtype == np.float64
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4)
        assert best == [CANDIDATES[i] for i in expected.argmax(axis=1)]
    # one image, one candidate: the same number once more, and that candidate is the prediction
    best, one = rank_answers(adapter, images[:1], PROMPTS[0], ["blue"], progress=False)
    assert best == ["blue"] and one[0, 0] == pytest.approx(expected[0, 1], abs=1e-4)
    assert np.all(expected < 0)


def test_prediction_is_the_argmax_and_columns_follow_the_candidates(blip_opt):
    images = _images()
    best, scores = rank_answers(blip_opt, images, PROMPTS, CANDIDATES, progress=False)
    assert best == [CANDIDATES[int(i)] for i in scores.argmax(axis=1)]
    # reordered (and repeated) candidates: the same scores, in the new column order
    perm = [3, 1, 0, 2, 1]
    best2, scores2 = rank_answers(blip_opt, images, PROMPTS, [CANDIDATES[i] for i in perm], progress=False)
    np.testing.assert_allclose(scores2, scores[:, perm], rtol=0, atol=1e-5)
    assert best2 == best
    # the score depends on the image: different images give different rows for the same prompt
    assert not np.allclose(scores[0], scores[2], atol=1e-4)


@needs_blip2
def test_mini_blip2_dense_rank_accuracy(mini_blip2):
    adapter = mini_blip2
    rows = mb.bundled_eval_data("vqav2", limit=40)
    res = vqa(adapter, rows, inference="rank", progress=False)
    assert res["inference"] == "rank" and res["n"] == 40
    assert rows_answer_list(rows) == ["0", "2", "3", "4", "5", "6", "7", "8", "9", "even", "odd"]
    assert res["answer_list"] == "from the evaluated rows (11 answers)"
    assert res["vqa_accuracy"] >= 90.0  # measured: 97.5 (39/40; one odd digit answered "even")
    ranked = [p["prediction"] for p in res["predictions"]]
    assert set(ranked) <= set(rows_answer_list(rows))
    # greedy generation on the same questions: rank picks the generated answer when the list holds it
    gen = generate_answers(adapter, [r["image"] for r in rows], [mb.VQA_PROMPT.format(r["question"]) for r in rows],
                           max_new_tokens=4, num_beams=1, progress=False)
    held = [(g, r) for g, r in zip(gen, ranked) if g in rows_answer_list(rows)]
    assert len(held) >= 36 and sum(g == r for g, r in held) >= 0.9 * len(held)  # measured: 40 of 40, all equal
    # the generated answer's rank score is the log-likelihood of generate's own greedy path (its raw logits,
    # KV-cached, answer tokens then EOS), and it beats the other candidates of the list
    tok, cfg = adapter.tokenizer, adapter.model.config
    eos = cfg.text_config.eos_token_id
    cands = rows_answer_list(rows)
    for r in rows[:2]:
        prompt = mb.VQA_PROMPT.format(r["question"])
        ids = torch.tensor([[cfg.image_token_index] * cfg.num_query_tokens + tok.encode(prompt)])
        with torch.no_grad():
            out = adapter.model.generate(pixel_values=image_batch(adapter, [r["image"]]), input_ids=ids,
                                         max_new_tokens=6, do_sample=False, num_beams=1, eos_token_id=eos,
                                         output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, ids.shape[1]:].tolist()
        answer = tok.decode(new, skip_special_tokens=True).strip()
        assert new == tok.encode(" " + answer, add_special_tokens=False) + [eos]
        path = sum(float(torch.log_softmax(lg[0].float(), -1)[t]) for lg, t in zip(out.logits, new))
        best, scores = rank_answers(adapter, [r["image"]], prompt, cands, progress=False)
        assert best == [answer] and scores[0, cands.index(answer)] == pytest.approx(path, abs=1e-3)


def test_bad_inference_and_empty_answer_lists_are_user_errors(blip_opt, tmp_path):
    rows = [{"image": im, "question": "what colour is it?", "answers": ["red"] * 10} for im in _images(2)]
    with pytest.raises(UserError, match="unknown VQA inference 'beam'.*'generate'.*'rank'"):
        vqa(blip_opt, rows, inference="beam")
    with pytest.raises(UserError, match="answer list for rank inference is empty"):
        vqa(blip_opt, rows, inference="rank", answer_list=[])
    with pytest.raises(UserError, match="only used by rank inference"):
        vqa(blip_opt, rows, answer_list=["red"])
    with pytest.raises(UserError, match="answer list is empty"):
        rank_answers(blip_opt, _images(1), PROMPTS[0], [])
    with pytest.raises(UserError, match="candidate answer 1 is empty"):
        rank_answers(blip_opt, _images(1), PROMPTS[0], ["red", "  "])
    with pytest.raises(UserError, match="apply to the VQA tasks"):
        evaluate(blip_opt, "caption", vqa_inference="rank")
    with pytest.raises(UserError, match="unknown VQA inference"):
        evaluate(blip_opt, "vqav2", limit=2, vqa_inference="Rank")
    given = vqa(blip_opt, rows, inference="rank", answer_list=["blue", "red"])
    assert given["answer_list"] == "given (2 answers)" and given["vqa_accuracy"] in (0.0, 100.0, 50.0)
    # GQA rows (one 'answer' string, exact match): the list comes from those strings
    gqa = [{"image": im, "question": "what is it?", "answer": a} for im, a in zip(_images(3), ["cat", "dog", "cat"])]
    res = vqa(blip_opt, gqa, inference="rank", metric="exact_match")
    assert res["answer_list"] == "from the evaluated rows (2 answers)" and res["inference"] == "rank"
    preds = [p["prediction"] for p in res["predictions"]]
    assert set(preds) <= {"cat", "dog"}
    assert res["vqa_accuracy"] == pytest.approx(100 * np.mean([p == r["answer"] for p, r in zip(preds, gqa)]))
    # the CLI: flags reach results.json's config; a bad flag value is refused by argparse
    (tmp_path / "answers.json").write_text(json.dumps(["0", "1", "2", "3"]))
    out = tmp_path / "run"
    assert cli_main(["evaluate", "--model", "tiny-blip2-opt", "--task", "vqav2", "--limit", "3", "--no-progress",
                     "--vqa-inference", "rank", "--answer-list", str(tmp_path / "answers.json"),
                     "--out", str(out)]) == 0
    cfg = json.loads((out / "results.json").read_text())["config"]
    assert cfg["vqa_inference"] == "rank"
    assert cfg["answer_list"] == f"{tmp_path / 'answers.json'}: given (4 answers)"
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 3 and {p["prediction"] for p in preds} <= {"0", "1", "2", "3"}
    assert cli_main(["evaluate", "--model", "tiny-blip2-opt", "--task", "vqav2", "--out", str(tmp_path / "x"),
                     "--answer-list", str(tmp_path / "answers.json")]) == 2  # rank not asked for
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--model", "tiny-blip2-opt", "--vqa-inference", "beam", "--out", str(tmp_path / "y")])
