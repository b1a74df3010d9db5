"""Evaluation metrics for the ECoFLaP benchmarks (pure Python / numpy).

* VQAv2 accuracy and answer normalisation, following the official VQA
  evaluation script (``vqaEval.py`` of GT-Vision-Lab/VQA, also vendored by
  LAVIS).
* GQA normalised exact-match accuracy.
* Corpus BLEU-1..4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015)
  computed the way the ``pycocoevalcap`` scorers compute them.
* Image-text retrieval recall@K (Karpathy-split convention of BLIP/LAVIS).
* Zero-shot classification top-k accuracy and mean per-class recall.

Captioning metrics operate on *already tokenised* text (tokens separated by
whitespace).  ``pycocoevalcap`` tokenises with the Stanford PTB tokenizer
(Java) and then drops punctuation tokens; given the same tokenised strings,
:func:`bleu` and :func:`cider_d` give the same numbers as its ``Bleu`` and
``Cider`` scorers.  :func:`simple_tokenize` is a Java-free approximation of
that tokenisation.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Dict, List, Sequence, Tuple

import numpy as np

__all__ = [
    "normalize_vqa_answer",
    "vqa_score",
    "vqa_accuracy",
    "exact_match_accuracy",
    "simple_tokenize",
    "bleu",
    "cider_d",
    "cider_d_per_image",
    "retrieval_recall",
    "topk_accuracy",
    "mean_per_class_recall",
]


# ---------------------------------------------------------------------------
# VQA answer normalisation (official VQA evaluation script)
# ---------------------------------------------------------------------------

# The official table.  NOTE: most targets use the typographic apostrophe
# U+2019 (written here as ``Q``), a handful use the ASCII one; both are kept
# as in the official script, as are its oddities (identity entries, the
# reversed "somebody'd" entry, and capitalised keys that can never match
# because answers are lower-cased first).
_Q = "\u2019"
_CONTRACTIONS_SPEC = [
    # (key, value) with "Q" standing for U+2019
    ("aint", "ain't"), ("arent", "aren't"), ("cant", "can't"),
    ("couldve", "could've"), ("couldnt", "couldn't"),
    ("couldn'tve", "couldnQtQve"), ("couldntQve", "couldnQtQve"),
    ("didnt", "didnQt"), ("doesnt", "doesnQt"), ("dont", "donQt"),
    ("hadnt", "hadnQt"), ("hadntQve", "hadnQtQve"), ("hadn'tve", "hadnQtQve"),
    ("hasnt", "hasnQt"), ("havent", "havenQt"), ("hed", "heQd"),
    ("hedQve", "heQdQve"), ("heQdve", "heQdQve"), ("hes", "heQs"),
    ("howd", "howQd"), ("howll", "howQll"), ("hows", "howQs"),
    ("IdQve", "IQdQve"), ("IQdve", "IQdQve"), ("Im", "IQm"), ("Ive", "IQve"),
    ("isnt", "isnQt"), ("itd", "itQd"), ("itdQve", "itQdQve"),
    ("itQdve", "itQdQve"), ("itll", "itQll"), ("letQs", "letQs"),
    ("maam", "maQam"), ("mightnt", "mightnQt"), ("mightntQve", "mightnQtQve"),
    ("mightnQtve", "mightnQtQve"), ("mightve", "mightQve"),
    ("mustnt", "mustnQt"), ("mustve", "mustQve"), ("neednt", "neednQt"),
    ("notve", "notQve"), ("oclock", "oQclock"), ("oughtnt", "oughtnQt"),
    ("owQsQat", "QowQsQat"), ("QowsQat", "QowQsQat"), ("QowQsat", "QowQsQat"),
    ("shant", "shanQt"), ("shedQve", "sheQdQve"), ("sheQdve", "sheQdQve"),
    ("sheQs", "sheQs"), ("shouldve", "shouldQve"), ("shouldnt", "shouldnQt"),
    ("shouldntQve", "shouldnQtQve"), ("shouldnQtve", "shouldnQtQve"),
    ("somebodyQd", "somebodyd"), ("somebodydQve", "somebodyQdQve"),
    ("somebodyQdve", "somebodyQdQve"), ("somebodyll", "somebodyQll"),
    ("somebodys", "somebodyQs"), ("someoned", "someoneQd"),
    ("someonedQve", "someoneQdQve"), ("someoneQdve", "someoneQdQve"),
    ("someonell", "someoneQll"), ("someones", "someoneQs"),
    ("somethingd", "somethingQd"), ("somethingdQve", "somethingQdQve"),
    ("somethingQdve", "somethingQdQve"), ("somethingll", "somethingQll"),
    ("thats", "thatQs"), ("thered", "thereQd"), ("theredQve", "thereQdQve"),
    ("thereQdve", "thereQdQve"), ("therere", "thereQre"), ("theres", "thereQs"),
    ("theyd", "theyQd"), ("theydQve", "theyQdQve"), ("theyQdve", "theyQdQve"),
    ("theyll", "theyQll"), ("theyre", "theyQre"), ("theyve", "theyQve"),
    ("twas", "Qtwas"), ("wasnt", "wasnQt"), ("wedQve", "weQdQve"),
    ("weQdve", "weQdQve"), ("weve", "we've"), ("werent", "werenQt"),
    ("whatll", "whatQll"), ("whatre", "whatQre"), ("whats", "whatQs"),
    ("whatve", "whatQve"), ("whens", "whenQs"), ("whered", "whereQd"),
    ("wheres", "where's"), ("whereve", "whereQve"), ("whod", "whoQd"),
    ("whodQve", "whoQdQve"), ("whoQdve", "whoQdQve"), ("wholl", "whoQll"),
    ("whos", "whoQs"), ("whove", "who've"), ("whyll", "whyQll"),
    ("whyre", "whyQre"), ("whys", "whyQs"), ("wont", "wonQt"),
    ("wouldve", "wouldQve"), ("wouldnt", "wouldnQt"),
    ("wouldntQve", "wouldnQtQve"), ("wouldnQtve", "wouldnQtQve"),
    ("yall", "yQall"), ("yallQll", "yQallQll"), ("yQallll", "yQallQll"),
    ("yallQdQve", "yQallQdQve"), ("yQalldQve", "yQallQdQve"),
    ("yQallQdve", "yQallQdQve"), ("youd", "youQd"), ("youdQve", "youQdQve"),
    ("youQdve", "youQdQve"), ("youll", "youQll"), ("youre", "youQre"),
    ("youve", "youQve"),
]
# "Q" never occurs as a real letter in the table above (all entries are
# lower-case apart from the unreachable "I..." keys).
VQA_CONTRACTIONS: Dict[str, str] = {
    k.replace("Q", _Q): v.replace("Q", _Q) for k, v in _CONTRACTIONS_SPEC
}

VQA_NUMBER_WORDS: Dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
    "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
    "nine": "9", "ten": "10",
}
VQA_ARTICLES = ("a", "an", "the")
# Period not followed by a digit.  The leading "(?!<=\d)" is a (buggy,
# always-true) negative look-ahead in the official script; kept verbatim.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
VQA_PUNCT = (";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\",
             "_", ">", "<", "@", "`", ",", "?")


def _process_punctuation(text: str) -> str:
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in VQA_PUNCT:
        # The test looks at the *input* text, the replacement at the output.
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official script calls ``periodStrip.sub("", outText, re.UNICODE)``,
    # i.e. passes re.UNICODE (== 32) as *count*: at most 32 periods go.
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _process_digit_article(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = VQA_NUMBER_WORDS.get(w, w)
        if w not in VQA_ARTICLES:
            words.append(w)
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(ans: str) -> str:
    """Normalise a VQA answer exactly as the official VQA eval script does.

    newline/tab -> space, strip, ``processPunctuation``, then
    ``processDigitArticle`` (lower-case, number words -> digits, drop
    articles, contraction table).  Source: GT-Vision-Lab/VQA ``vqaEval.py``.
    """
    if not isinstance(ans, str):
        raise TypeError(f"answer must be a str, got {type(ans).__name__}")
    ans = ans.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(ans))


def _vqa_score_normalised(pred: str, gts: Sequence[str]) -> float:
    n = len(gts)
    total = 0.0
    n_match = sum(1 for g in gts if g == pred)
    for g in gts:
        # matches among the other n-1 answers (leave this one out)
        others = n_match - (1 if g == pred else 0)
        total += min(1.0, others / 3.0)
    return total / n


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction, in [0, 1] (official VQA eval script).

    ``mean over i of min(1, #{j != i : answer_j == pred} / 3)`` after
    normalising prediction and answers with :func:`normalize_vqa_answer`.
    (The official script only punctuation-processes ground truths, relying on
    pre-normalised annotations; normalising both is a no-op for those.)
    With fewer than 4 answers the maximum is below 1 (one answer -> 0).
    """
    if isinstance(answers, str):
        raise TypeError("answers must be a list of strings, not a str")
    answers = list(answers)
    if len(answers) == 0:
        raise ValueError("vqa_score needs at least one ground-truth answer, "
                         "got an empty list")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    return _vqa_score_normalised(pred, gts)


def vqa_accuracy(predictions: Sequence[str],
                 answers: Sequence[Sequence[str]]) -> float:
    """Mean VQAv2 accuracy in percent (0..100) (official VQA eval script)."""
    if len(predictions) != len(answers):
        raise ValueError(
            f"predictions and answers differ in length: "
            f"{len(predictions)} predictions vs {len(answers)} answer lists")
    if len(predictions) == 0:
        raise ValueError("vqa_accuracy needs at least one question")
    return 100.0 * sum(vqa_score(p, a) for p, a in zip(predictions, answers)) \
        / len(predictions)


def exact_match_accuracy(predictions: Sequence[str],
                         answers: Sequence[str]) -> float:
    """GQA accuracy: percent of predictions equal to the single answer.

    Both sides are normalised with :func:`normalize_vqa_answer`, as LAVIS does
    for generated GQA answers (Hudson & Manning 2019 use plain exact match).
    """
    if len(predictions) != len(answers):
        raise ValueError(
            f"predictions and answers differ in length: "
            f"{len(predictions)} predictions vs {len(answers)} answers")
    if len(predictions) == 0:
        raise ValueError("exact_match_accuracy needs at least one question")
    hits = sum(normalize_vqa_answer(p) == normalize_vqa_answer(a)
               for p, a in zip(predictions, answers))
    return 100.0 * hits / len(predictions)


# ---------------------------------------------------------------------------
# Captioning: tokenisation, BLEU, CIDEr-D
# ---------------------------------------------------------------------------

_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'m|'d)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|m|d)\b|[^\W_]+(?:[-'.,/&][^\W_]+)*|\S")
# Tokens pycocoevalcap drops after PTB tokenisation (plus raw quote/bracket
# characters, which PTB would have rewritten to ``/''/-LRB- etc.).
_PTB_PUNCT = frozenset(["''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-",
                        "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...",
                        ";", '"', "(", ")", "{", "}", "[", "]"])


def simple_tokenize(s: str) -> str:
    """Lower-case, PTB-like tokenisation without Java; returns tokens joined by spaces.

    Splits clitics ("don't" -> "do n't", "dog's" -> "dog 's") and punctuation,
    then drops punctuation tokens like pycocoevalcap's PTBTokenizer wrapper.
    It only approximates the Stanford PTB tokenizer pycocoevalcap runs.
    """
    s = s.replace("\n", " ").lower()
    s = _CLITIC.sub(r" \1", s)
    toks = [t for t in _TOKEN.findall(s) if t not in _PTB_PUNCT]
    return " ".join(toks)


def _check_caption_inputs(candidates, references) -> None:
    if isinstance(candidates, str):
        raise TypeError("candidates must be a list of strings, not a str")
    if len(candidates) != len(references):
        raise ValueError(
            f"candidates and references differ in length: "
            f"{len(candidates)} candidates vs {len(references)} reference lists")
    if len(candidates) == 0:
        raise ValueError("need at least one image (got empty candidates)")
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise TypeError(f"references[{i}] must be a list of strings, "
                            "not a str")
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty; every image needs "
                             "at least one reference")


def _ngram_counts(tokens: List[str], n: int) -> Counter:
    c: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            c[tuple(tokens[i:i + k])] += 1
    return c


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]],
         n: int = 4) -> List[float]:
    """Corpus BLEU-1..n as pycocoevalcap's ``Bleu`` (Papineni et al. 2002).

    Clipped n-gram counts and lengths are summed over the corpus; brevity
    penalty uses the "closest" reference length (ties -> shorter);
    precisions use (correct + 1e-15) / (total + 1e-9).  Returns [BLEU-1..n].
    """
    _check_caption_inputs(candidates, references)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tiny, small = 1e-15, 1e-9
    correct = [0] * n
    total = [0] * n
    cand_len = 0
    ref_len = 0
    for cand, refs in zip(candidates, references):
        c_toks = cand.split()
        c_counts = _ngram_counts(c_toks, n)
        max_ref: Dict[tuple, int] = {}
        ref_lens = []
        for r in refs:
            r_toks = r.split()
            ref_lens.append(len(r_toks))
            for g, cnt in _ngram_counts(r_toks, n).items():
                if cnt > max_ref.get(g, 0):
                    max_ref[g] = cnt
        lc = len(c_toks)
        cand_len += lc
        ref_len += min(ref_lens, key=lambda L: (abs(L - lc), L))
        for k in range(n):
            total[k] += max(0, lc - k)
        for g, cnt in c_counts.items():
            correct[len(g) - 1] += min(cnt, max_ref.get(g, 0))
    scores = []
    prod = 1.0
    for k in range(n):
        prod *= (correct[k] + tiny) / (total[k] + small)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (cand_len + tiny) / (ref_len + small)
    if ratio < 1:
        bp = math.exp(1 - 1 / ratio)
        scores = [s * bp for s in scores]
    return scores


def _tfidf(counts: Counter, n: int, log_n_images: float,
           df: Dict[tuple, float]) -> Tuple[List[Dict[tuple, float]], List[float]]:
    vecs: List[Dict[tuple, float]] = [dict() for _ in range(n)]
    sq = [0.0] * n
    for g, tf in counts.items():
        w = float(tf) * (log_n_images - math.log(max(1.0, df.get(g, 0.0))))
        vecs[len(g) - 1][g] = w
        sq[len(g) - 1] += w * w
    return vecs, [math.sqrt(x) for x in sq]


def cider_d_per_image(candidates: Sequence[str],
                      references: Sequence[Sequence[str]], n: int = 4,
                      sigma: float = 6.0) -> List[float]:
    """Per-image CIDEr-D as pycocoevalcap's ``Cider`` (Vedantam et al. 2015).

    TF-IDF n-gram vectors with document frequency over the references of the
    evaluated set (idf = log(#images) - log(max(1, df))); per n the clipped
    similarity sum(min(g_c, g_r) * g_r) / (|g_c| |g_r|) times
    exp(-(l_c - l_r)^2 / (2 sigma^2)); mean over n and references, times 10.
    """
    _check_caption_inputs(candidates, references)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ref_counts = [[_ngram_counts(r.split(), n) for r in refs]
                  for refs in references]
    df: Dict[tuple, float] = {}
    for refs in ref_counts:
        for g in set().union(*[c.keys() for c in refs]):
            df[g] = df.get(g, 0.0) + 1.0
    log_n_images = math.log(float(len(candidates)))

    scores = []
    for cand, refs, rcounts in zip(candidates, references, ref_counts):
        c_toks = cand.split()
        c_vec, c_norm = _tfidf(_ngram_counts(c_toks, n), n, log_n_images, df)
        per_n = [0.0] * n
        for r, rc in zip(refs, rcounts):
            r_vec, r_norm = _tfidf(rc, n, log_n_images, df)
            # pycocoevalcap measures length as the number of bigrams; for
            # non-empty sentences the difference equals the word-count
            # difference, and empty sentences score 0 either way.
            delta = float(len(c_toks) - len(r.split()))
            penalty = math.exp(-(delta ** 2) / (2.0 * sigma ** 2))
            for k in range(n):
                num = 0.0
                rv = r_vec[k]
                for g, w in c_vec[k].items():
                    wr = rv.get(g, 0.0)
                    num += min(w, wr) * wr
                if c_norm[k] != 0 and r_norm[k] != 0:
                    num /= c_norm[k] * r_norm[k]
                per_n[k] += num * penalty
        scores.append(10.0 * (sum(per_n) / n) / len(refs))
    return scores


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]],
            n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: mean of :func:`cider_d_per_image` (Vedantam et al. 2015)."""
    per = cider_d_per_image(candidates, references, n=n, sigma=sigma)
    return float(sum(per) / len(per))


# ---------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------

def _rank_of(scores: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """0-based rank of items ``idx`` in descending ``scores``; ties go to the
    lower index (same as ``np.argsort(-scores, kind="stable")``)."""
    s = scores[idx]
    greater = (scores[None, :] > s[:, None]).sum(axis=1)
    tied_before = ((scores[None, :] == s[:, None])
                   & (np.arange(scores.shape[0])[None, :] < idx[:, None])).sum(axis=1)
    return greater + tied_before


def retrieval_recall(sim: np.ndarray, txt2img: Sequence[int],
                     img2txt: Sequence[Sequence[int]],
                     ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Image-text retrieval recall@K in percent (BLIP/LAVIS Karpathy-split).

    ``sim`` is (n_images, n_texts).  i2t: rank of the best-ranked correct
    caption; t2i: rank of the single correct image.  Returns ``i2t_R@k``,
    ``t2i_R@k``, ``i2t_mean``, ``t2i_mean`` and ``mean_recall`` (mean of all
    i2t and t2i R@k).  Ties are broken towards the lower index.
    """
    sim = np.asarray(sim)
    if not np.issubdtype(sim.dtype, np.floating):
        sim = sim.astype(np.float64)
    if sim.ndim != 2:
        raise ValueError(f"sim must be 2-D (n_images, n_texts), got shape {sim.shape}")
    n_img, n_txt = sim.shape
    if len(txt2img) != n_txt:
        raise ValueError(f"txt2img has {len(txt2img)} entries but sim has "
                         f"{n_txt} texts (columns)")
    if len(img2txt) != n_img:
        raise ValueError(f"img2txt has {len(img2txt)} entries but sim has "
                         f"{n_img} images (rows)")
    if len(ks) == 0:
        raise ValueError("ks must not be empty")

    i2t_ranks = np.empty(n_img, dtype=np.int64)
    for i in range(n_img):
        gt = np.asarray(list(img2txt[i]), dtype=np.int64)
        if gt.size == 0:
            raise ValueError(f"img2txt[{i}] is empty")
        if gt.min() < 0 or gt.max() >= n_txt:
            raise ValueError(f"img2txt[{i}] has a text index outside [0, {n_txt})")
        i2t_ranks[i] = _rank_of(sim[i], gt).min()

    t2i = np.asarray(list(txt2img), dtype=np.int64)
    if t2i.size and (t2i.min() < 0 or t2i.max() >= n_img):
        raise ValueError(f"txt2img has an image index outside [0, {n_img})")
    # t2i, vectorised over blocks of text columns (bounded memory).
    t2i_ranks = np.empty(n_txt, dtype=np.int64)
    rows = np.arange(n_img)[:, None]
    block = max(1, (1 << 22) // max(1, n_img))
    for lo in range(0, n_txt, block):
        cols = sim[:, lo:lo + block]
        gt = t2i[lo:lo + block]
        s = cols[gt, np.arange(cols.shape[1])][None, :]
        t2i_ranks[lo:lo + block] = (cols > s).sum(axis=0) + \
            ((cols == s) & (rows < gt[None, :])).sum(axis=0)

    out: Dict[str, float] = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * float(np.mean(i2t_ranks < k))
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * float(np.mean(t2i_ranks < k))
    out["i2t_mean"] = float(np.mean([out[f"i2t_R@{k}"] for k in ks]))
    out["t2i_mean"] = float(np.mean([out[f"t2i_R@{k}"] for k in ks]))
    out["mean_recall"] = (out["i2t_mean"] + out["t2i_mean"]) / 2.0
    return out


# ---------------------------------------------------------------------------
# Zero-shot classification
# ---------------------------------------------------------------------------

def _check_logits_labels(logits, labels) -> Tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (n_samples, n_classes), got shape {logits.shape}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits and labels differ in length: "
                         f"{logits.shape[0]} rows vs {labels.shape[0]} labels")
    if logits.shape[0] == 0:
        raise ValueError("need at least one sample")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]})")
    return logits, labels.astype(np.int64)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray,
                  ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Top-k accuracy in percent, keys ``"top{k}"`` (standard definition).

    A sample counts if its label is among the k highest logits; ties are
    broken towards the lower class index.  k larger than the number of
    classes counts every sample.
    """
    logits, labels = _check_logits_labels(logits, labels)
    rows = np.arange(logits.shape[0])
    true = logits[rows, labels][:, None]
    cls = np.arange(logits.shape[1])[None, :]
    rank = (logits > true).sum(axis=1) + \
        ((logits == true) & (cls < labels[:, None])).sum(axis=1)
    return {f"top{k}": 100.0 * float(np.mean(rank < k)) for k in ks}


def mean_per_class_recall(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes present in ``labels`` of per-class top-1 recall, percent.

    Standard "mean per-class accuracy" (as used for e.g. FGVC-Aircraft, Pets,
    Caltech-101 in CLIP's zero-shot benchmark); argmax ties -> lower index.
    """
    logits, labels = _check_logits_labels(logits, labels)
    pred = logits.argmax(axis=1)
    recalls = [float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)]
    return 100.0 * float(np.mean(recalls))
