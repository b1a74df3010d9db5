"""Tests for ecoflap_utils.metrics.

Where expected numbers come from is stated next to each case:
* VQA: hand-computed from the leave-one-out definition of the official
  VQA evaluation script (GT-Vision-Lab/VQA, vqaEval.py).
* BLEU / CIDEr-D on the five-image fixture: computed ONCE with
  pycocoevalcap 1.2 (PyPI wheel, its pure-Python ``Bleu(4)`` and ``Cider()``
  scorers called directly on the pre-tokenised strings below, bypassing the
  Java PTB tokenizer) and hard-coded here.  pycocoevalcap is NOT a project
  dependency.
* Small BLEU / CIDEr-D cases: derived by hand from Papineni et al. 2002 and
  Vedantam et al. 2015, derivations in the comments.
* Retrieval: constructed similarity matrices with ranks worked out by hand,
  plus a literal LAVIS-style argsort loop written independently in this file.
"""

import math

import numpy as np
import pytest

from ecoflap_utils.metrics import (
    bleu,
    cider_d,
    cider_d_per_image,
    exact_match_accuracy,
    mean_per_class_recall,
    normalize_vqa_answer,
    retrieval_recall,
    simple_tokenize,
    topk_accuracy,
    vqa_accuracy,
    vqa_score,
)

# ---------------------------------------------------------------------------
# VQA normalisation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("a dog", "dog"),               # article dropped
        ("The Dog", "dog"),             # lower-case + article
        ("an apple", "apple"),
        ("yes.", "yes"),                # period not followed by digit removed
        ("Yes", "yes"),
        ("two", "2"),                   # manualMap number words
        ("none", "0"),
        ("ten", "10"),
        ("3.5", "3.5"),                 # period followed by a digit kept
        ("1,000", "1000"),              # digit,digit -> all punct removed
        ("hello , world", "hello world"),  # punct next to a space removed
        ("left/right", "left right"),   # otherwise punct -> space
        ("(left)", "left"),             # '(' -> ' ', ')' -> ' ', then split
        ("  tab\there\n", "tab here"),  # newline/tab -> space, strip
        ("it's 2:30", "it s 2 30"),     # ASCII apostrophe is punctuation
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_contractions_use_official_table():
    # The official table maps most keys to the typographic apostrophe U+2019.
    assert normalize_vqa_answer("dont") == "don\u2019t"
    assert normalize_vqa_answer("isnt") == "isn\u2019t"
    assert normalize_vqa_answer("cant") == "can't"   # one of the ASCII entries
    assert normalize_vqa_answer("I dont know") == "i don\u2019t know"
    # ASCII "don't" is hit by processPunctuation first ("'" -> " "), so the
    # official metric does NOT equate "dont" and "don't".
    assert normalize_vqa_answer("don't") == "don t"


def test_period_strip_count_quirk():
    # The official script passes re.UNICODE (=32) as the *count* argument of
    # periodStrip.sub, so at most 32 periods are removed.
    assert normalize_vqa_answer("." * 40 + "x") == "." * 8 + "x"


def test_normalize_rejects_non_string():
    with pytest.raises(TypeError):
        normalize_vqa_answer(3)


# ---------------------------------------------------------------------------
# VQA score
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, expected",
    [
        # With k of the 10 answers equal to the prediction, the k subsets that
        # leave out a matching answer have k-1 matches, the other 10-k have k:
        #   score = (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10
        (0, 0.0),                                   # (0 + 10*0) / 10
        (1, 0.3),                                   # (1*0 + 9*1/3) / 10 = 3/10
        (2, 0.6),                                   # (2*1/3 + 8*2/3) / 10 = 6/10
        (3, 0.9),                                   # (3*2/3 + 7*1) / 10 = 9/10
        (4, 1.0),                                   # (4*1 + 6*1) / 10
        (10, 1.0),
    ],
)
def test_vqa_three_of_ten_rule(k, expected):
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_score("cat", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_score_normalises_prediction_and_answers():
    assert vqa_score("a dog", ["dog"] * 10) == pytest.approx(1.0)
    assert vqa_score("dog", ["the dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_score("yes.", ["yes"] * 10) == pytest.approx(1.0)
    assert vqa_score("Yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    assert vqa_score("two", ["2"] * 10) == pytest.approx(1.0)
    assert vqa_score("2", ["two"] * 1 + ["3"] * 9) == pytest.approx(0.3)
    assert vqa_score("dont", ["don\u2019t"] * 10) == pytest.approx(1.0)
    assert vqa_score("dont", ["dont"] * 4 + ["yes"] * 6) == pytest.approx(1.0)
    assert vqa_score("dont", ["don't"] * 10) == 0.0  # see contraction test
    assert vqa_score("cat", ["dog"] * 10) == 0.0


def test_vqa_score_other_answer_counts():
    # Leave-one-out over however many answers there are.
    assert vqa_score("x", ["x"]) == 0.0                    # 1 subset, 0 others
    assert vqa_score("x", ["x", "x", "x"]) == pytest.approx(2 / 3)
    # 5 answers, 2 match: (2*min(1,1/3) + 3*min(1,2/3)) / 5 = (2/3 + 2)/5
    assert vqa_score("x", ["x", "x", "y", "z", "w"]) == pytest.approx((2 / 3 + 2) / 5)


def test_vqa_score_empty_answers():
    with pytest.raises(ValueError, match="at least one"):
        vqa_score("yes", [])


def test_vqa_accuracy_percent_and_lengths():
    preds = ["yes", "two", "cat"]
    answers = [["yes"] * 10, ["2"] * 2 + ["3"] * 8, ["dog"] * 10]
    # (1.0 + 0.6 + 0.0) / 3 * 100
    assert vqa_accuracy(preds, answers) == pytest.approx(160 / 3)
    with pytest.raises(ValueError, match=r"3 .*2"):
        vqa_accuracy(preds, answers[:2])


def test_exact_match_accuracy():
    preds = ["Yes.", "the red one", "two", "left"]
    gts = ["yes", "red one", "2", "right"]
    assert exact_match_accuracy(preds, gts) == pytest.approx(75.0)
    with pytest.raises(ValueError, match=r"4 .*3"):
        exact_match_accuracy(preds, gts[:3])


# ---------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A man, riding a horse.", "a man riding a horse"),
        ("Don't stop!", "do n't stop"),
        ("The dog's ball", "the dog 's ball"),
        ("a t-shirt -- on sale (cheap)", "a t-shirt on sale cheap"),
        ("1,000 people... 3.5 km", "1,000 people 3.5 km"),
        ('He said "hi"\n', "he said hi"),
    ],
)
def test_simple_tokenize(raw, expected):
    assert simple_tokenize(raw) == expected


# ---------------------------------------------------------------------------
# BLEU / CIDEr-D
# ---------------------------------------------------------------------------

FIX_CANDS = [
    "a man riding a horse on a beach",
    "a cat sitting on a couch",
    "two dogs playing in the snow snow snow",
    "a plate of food",
    "a red bus driving down a city street next to tall buildings",
]
FIX_REFS = [
    ["a man rides a horse along the beach",
     "a person riding a brown horse on the sand",
     "a man on a horse at the beach near the ocean"],
    ["a cat is sitting on a couch",
     "an orange cat lying on a sofa",
     "a cat on a couch",
     "a small cat sits on the couch cushion"],
    ["two dogs play in the snow",
     "a pair of dogs running through snow"],
    ["a plate with a sandwich and fries on it",
     "a white plate of food on a table",
     "a meal of a sandwich and french fries",
     "food on a plate",
     "a plate of food sitting on a wooden table"],
    ["a red double decker bus on a city street",
     "a bus drives down the street in the city",
     "a red bus on the road"],
]
# Short candidates for the same references: corpus brevity penalty < 1.
FIX_SHORT = ["a man on a horse", "a cat", "dogs in snow", "food", "a red bus"]

# From pycocoevalcap 1.2, Bleu(4).compute_score / Cider().compute_score on
# {i: FIX_REFS[i]} / {i: [cands[i]]}.
PCOC_BLEU = [0.7631578947167591, 0.6628679652608516,
             0.4789218928788966, 0.31262525404484914]
PCOC_CIDER = 2.08812440526548
PCOC_CIDER_PER = [2.0836641960551217, 2.9808681065248703, 1.5434915433553136,
                  2.3003685590255785, 1.5322296213665156]
PCOC_BLEU_SHORT = [0.34251885504411445, 0.30207323659310925,
                   0.29241500624017647, 0.30420816256742766]
PCOC_CIDER_SHORT = 1.5218512551595436
PCOC_CIDER_PER_SHORT = [2.1230449421201327, 1.5250588634359619,
                        1.3760223154838176, 0.527144290801165,
                        2.0579858639566404]


def test_bleu_matches_pycocoevalcap():
    assert bleu(FIX_CANDS, FIX_REFS) == pytest.approx(PCOC_BLEU, rel=1e-12)
    assert bleu(FIX_SHORT, FIX_REFS) == pytest.approx(PCOC_BLEU_SHORT, rel=1e-12)


def test_cider_d_matches_pycocoevalcap():
    assert cider_d(FIX_CANDS, FIX_REFS) == pytest.approx(PCOC_CIDER, rel=1e-12)
    assert cider_d_per_image(FIX_CANDS, FIX_REFS) == pytest.approx(
        PCOC_CIDER_PER, rel=1e-12)
    assert cider_d(FIX_SHORT, FIX_REFS) == pytest.approx(PCOC_CIDER_SHORT, rel=1e-12)
    assert cider_d_per_image(FIX_SHORT, FIX_REFS) == pytest.approx(
        PCOC_CIDER_PER_SHORT, rel=1e-12)


def test_bleu_is_corpus_level_not_sentence_average():
    per_image = [bleu([c], [r])[3] for c, r in zip(FIX_CANDS, FIX_REFS)]
    assert abs(np.mean(per_image) - bleu(FIX_CANDS, FIX_REFS)[3]) > 1e-3


def test_bleu_hand_clipping():
    # Papineni et al. 2002 example: 7 candidate "the", reference has 2 ->
    # clipped unigram precision 2/7; len 7 > ref len 6, so no brevity penalty.
    b = bleu(["the the the the the the the"], [["the cat is on the mat"]], n=1)
    assert b == pytest.approx([2 / 7], rel=1e-9)


def test_bleu_hand_brevity_penalty():
    # cand "a b c d" vs ref "a b c d e": all n-gram precisions 1, c=4, r=5,
    # BP = exp(1 - 5/4) = exp(-0.25) for every order.
    b = bleu(["a b c d"], [["a b c d e"]])
    assert b == pytest.approx([math.exp(-0.25)] * 4, rel=1e-8)


def test_bleu_closest_ref_length_tie_goes_to_shorter():
    # cand length 5, refs of length 4 and 6 (both at distance 1): the
    # shorter (4) is taken -> no brevity penalty; all unigrams match -> 1.
    b = bleu(["a b c d e"], [["a b c d", "a b c d e f"]], n=1)
    assert b == pytest.approx([1.0], rel=1e-8)


def test_cider_d_hand_small_case():
    # Three images; every n-gram occurs in exactly one image's references, so
    # all idf weights equal log(3) and cancel in the cosines.
    cands = ["x y", "u u", "z"]
    refs = [["x y y"], ["u v"], ["w"]]
    # Image 0: unigrams cand (x:1, y:1) vs ref (x:1, y:2): clipped dot
    #   min(1,1)*1 + min(1,2)*2 = 3, norms sqrt2*sqrt5 -> 3/sqrt(10);
    #   bigrams {xy} vs {xy, yy}: 1/sqrt2; 3-,4-grams: 0 (empty cand);
    #   length penalty exp(-(2-3)^2 / (2*36)).
    s0 = 10 * (3 / math.sqrt(10) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    # Image 1: unigrams cand (u:2) vs ref (u:1, v:1): clipping gives
    #   min(2,1)*1 = 1 over norms 2*sqrt2 -> 1/(2 sqrt2) (unclipped: 1/sqrt2).
    s1 = 10 * (1 / (2 * math.sqrt(2))) / 4
    s2 = 0.0  # no overlap
    assert cider_d_per_image(cands, refs) == pytest.approx([s0, s1, s2], rel=1e-12)
    assert cider_d(cands, refs) == pytest.approx((s0 + s1 + s2) / 3, rel=1e-12)


def test_cider_d_idf_zero_for_ubiquitous_ngram():
    # "a" occurs in the references of both images: idf = log2 - log2 = 0.
    # Image 0: only "b" and "a b" carry weight and both match -> per-order
    #   cosines (1, 1, 0, 0) -> 10 * 2/4 = 5.  Image 1: only "c" vs "d"
    #   carry weight -> 0.
    assert cider_d_per_image(["a b", "a c"], [["a b"], ["a d"]]) == \
        pytest.approx([5.0, 0.0], rel=1e-12)


def test_cider_d_single_image_is_zero():
    # log(#images) = log(1) = 0 makes every idf weight 0 (pycocoevalcap too).
    assert cider_d(["a b c"], [["a b c"]]) == 0.0


def test_cider_d_multiple_references_averaged():
    # Image 0 with two references: the identical ref gives per-order cosines
    # (1, 1, 0, 0) -> 0.5*10 = 5; the disjoint ref gives 0; mean over refs 2.5.
    per = cider_d_per_image(["p q", "r"], [["p q", "s t"], ["m"]])
    assert per == pytest.approx([2.5, 0.0], rel=1e-12)


@pytest.mark.parametrize("fn", [bleu, cider_d, cider_d_per_image])
def test_caption_length_mismatch(fn):
    with pytest.raises(ValueError, match=r"5 .*4"):
        fn(FIX_CANDS, FIX_REFS[:4])


@pytest.mark.parametrize("fn", [bleu, cider_d])
def test_caption_empty_reference_list(fn):
    with pytest.raises(ValueError, match="references\\[1\\]"):
        fn(["a", "b"], [["a"], []])


# ---------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------

def _lavis_style_ranks(sim, txt2img, img2txt):
    """Literal loop in the style of BLIP/LAVIS report_metrics (untied sims)."""
    i2t = []
    for i, row in enumerate(sim):
        order = list(np.argsort(row)[::-1])
        i2t.append(min(order.index(t) for t in img2txt[i]))
    t2i = []
    for t, col in enumerate(sim.T):
        order = list(np.argsort(col)[::-1])
        t2i.append(order.index(txt2img[t]))
    return np.array(i2t), np.array(t2i)


def test_retrieval_recall_constructed():
    # 3 images x 6 texts; image i owns texts 2i, 2i+1.
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    sim = np.array([
        # t0   t1   t2   t3   t4   t5
        [0.9, 0.1, 0.8, 0.7, 0.6, 0.5],  # img0: t0 is 1st -> rank 0
        [0.6, 0.5, 0.1, 0.2, 0.8, 0.9],  # img1: order t5,t4,t0,t1,t3,t2 -> best own (t3) rank 4
        [0.3, 0.2, 0.85, 0.4, 0.35, 0.0],  # img2: order t2,t3,t4,t0,t1,t5 -> t4 rank 2
    ])
    # i2t ranks (0-based) = [0, 4, 2]
    #   R@1 = 1/3, R@5 = 3/3, R@10 = 3/3
    # t2i: per text column, rank of its image:
    #   t0 col (0.9,0.6,0.3) img0 -> 0
    #   t1 col (0.1,0.5,0.2) img0 -> 2
    #   t2 col (0.8,0.1,0.85) img1 -> 2
    #   t3 col (0.7,0.2,0.4) img1 -> 2
    #   t4 col (0.6,0.8,0.35) img2 -> 2
    #   t5 col (0.5,0.9,0.0) img2 -> 2
    #   ranks [0,2,2,2,2,2]: R@1 = 1/6, R@5 = R@10 = 1
    r = retrieval_recall(sim, txt2img, img2txt)
    assert r["i2t_R@1"] == pytest.approx(100 / 3)
    assert r["i2t_R@5"] == pytest.approx(100.0)
    assert r["i2t_R@10"] == pytest.approx(100.0)
    assert r["t2i_R@1"] == pytest.approx(100 / 6)
    assert r["t2i_R@5"] == pytest.approx(100.0)
    assert r["t2i_R@10"] == pytest.approx(100.0)
    mean = (100 / 3 + 100 + 100 + 100 / 6 + 100 + 100) / 6
    assert r["mean_recall"] == pytest.approx(mean)

    # ks that make the ranks matter more: i2t ranks [0,4,2], t2i [0,2,2,2,2,2]
    r2 = retrieval_recall(sim, txt2img, img2txt, ks=(1, 2, 3))
    assert r2["i2t_R@2"] == pytest.approx(100 / 3)
    assert r2["i2t_R@3"] == pytest.approx(200 / 3)
    assert r2["t2i_R@2"] == pytest.approx(100 / 6)
    assert r2["t2i_R@3"] == pytest.approx(100.0)

    i2t, t2i = _lavis_style_ranks(sim, txt2img, img2txt)
    assert list(i2t) == [0, 4, 2] and list(t2i) == [0, 2, 2, 2, 2, 2]


def test_retrieval_recall_matches_lavis_loop_random():
    rng = np.random.default_rng(0)
    n_img, per = 20, 5
    img2txt = [list(range(per * i, per * i + per)) for i in range(n_img)]
    txt2img = [t // per for t in range(n_img * per)]
    sim = rng.normal(size=(n_img, n_img * per))
    sim[np.array(txt2img), np.arange(n_img * per)] += 1.5  # some signal
    i2t, t2i = _lavis_style_ranks(sim, txt2img, img2txt)
    ks = (1, 5, 10)
    r = retrieval_recall(sim, txt2img, img2txt, ks=ks)
    for k in ks:
        assert r[f"i2t_R@{k}"] == pytest.approx(100 * np.mean(i2t < k))
        assert r[f"t2i_R@{k}"] == pytest.approx(100 * np.mean(t2i < k))
    assert 0 < r["i2t_R@1"] < 100 and 0 < r["t2i_R@1"] < 100


def test_retrieval_ties_go_to_lower_index():
    # Constant similarity: ranks follow the index, no optimistic 100%.
    sim = np.zeros((2, 4))
    r = retrieval_recall(sim, [0, 0, 1, 1], [[0, 1], [2, 3]], ks=(1,))
    # i2t: img0 best own text t0 rank 0; img1 best own t2 rank 2 -> 50%
    # t2i: img0 always rank 0, img1 always rank 1 -> 50%
    assert r["i2t_R@1"] == pytest.approx(50.0)
    assert r["t2i_R@1"] == pytest.approx(50.0)


def test_retrieval_shape_errors():
    sim = np.zeros((2, 3))
    with pytest.raises(ValueError, match="txt2img"):
        retrieval_recall(sim, [0, 1], [[0], [1, 2]])
    with pytest.raises(ValueError, match="img2txt"):
        retrieval_recall(sim, [0, 1, 1], [[0]])
    with pytest.raises(ValueError, match="empty"):
        retrieval_recall(sim, [0, 1, 1], [[0], []])


# ---------------------------------------------------------------------------
# Zero-shot classification
# ---------------------------------------------------------------------------

def test_topk_accuracy():
    logits = np.array([
        [0.1, 0.7, 0.2],   # label 1: rank 0
        [0.5, 0.3, 0.2],   # label 2: rank 2
        [0.2, 0.3, 0.5],   # label 1: rank 1
        [0.9, 0.05, 0.05],  # label 0: rank 0
    ])
    labels = np.array([1, 2, 1, 0])
    r = topk_accuracy(logits, labels, ks=(1, 2, 5))
    assert r["top1"] == pytest.approx(50.0)
    assert r["top2"] == pytest.approx(75.0)
    assert r["top5"] == pytest.approx(100.0)  # k > n_classes


def test_topk_ties_and_errors():
    # All-equal logits: ties broken towards lower index, so only label 0 is top-1.
    r = topk_accuracy(np.zeros((3, 3)), np.array([0, 1, 2]), ks=(1, 2))
    assert r == {"top1": pytest.approx(100 / 3), "top2": pytest.approx(200 / 3)}
    with pytest.raises(ValueError, match=r"3 .*2"):
        topk_accuracy(np.zeros((3, 3)), np.array([0, 1]))


def test_mean_per_class_recall():
    # 4 samples of class 0 (3 correct), 1 of class 1 (wrong), 1 of class 2 (right)
    logits = np.array([
        [1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0],   # class 0
        [1, 0, 0],                                    # class 1 -> predicted 0
        [0, 0, 1],                                    # class 2
    ], dtype=float)
    labels = np.array([0, 0, 0, 0, 1, 2])
    # recalls 3/4, 0, 1 -> mean 7/12; plain accuracy would be 4/6
    assert mean_per_class_recall(logits, labels) == pytest.approx(700 / 12)
    assert topk_accuracy(logits, labels, ks=(1,))["top1"] == pytest.approx(400 / 6)
    with pytest.raises(ValueError):
        mean_per_class_recall(logits, labels[:5])
