"""Evaluation metrics for the ECoFLaP benchmarks (pure Python / numpy).

* VQAv2 accuracy as the official VQA evaluation script computes it per
  question, quirks included, in two revisions (``revision=`` of
  :func:`vqa_score` / :func:`vqa_accuracy`):
  ``"lavis"`` (default): GT-Vision-Lab/VQA
  ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at 458a8b2 (2016), as
  vendored by Salesforce LAVIS (``lavis/common/vqa_tools/vqa_eval.py``),
  the code that produced ECoFLaP's BLIP-2 numbers: the prediction is always
  fully normalised, the ground truths are only punctuation-processed and
  only when they are not all the same;
  ``"latest"``: the same file at a013f00 (2021): either both sides are fully
  normalised (answers differ) or neither is (all the same).
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
# VQA accuracy: GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py
# (Python 2).  Line numbers below without a revision refer to its newest
# revision a013f00 (2021-03-11, "Fixed processing answers bug").  The tables
# and the two helpers (processPunctuation, processDigitArticle) are the same
# in revision 458a8b2 (2016-10-08, "fixed the apostrophe symbol issue in
# contractions dictionary", lines 20-65 / 122-147 there) and in LAVIS's
# Python 3 port of it, lavis/common/vqa_tools/vqa_eval.py (salesforce/LAVIS
# 506965b, lines 29-191 / 249-274); only the per-question loop differs, see
# vqa_score.
# ---------------------------------------------------------------------------

# Contraction table, vqaEval.py lines 21-42: 120 entries, every apostrophe
# ASCII (revision 458a8b2, 2016, replaced the earlier U+2019 ones).  Its
# oddities are kept: identity entries ("let's", "she's"), the reversed
# "somebody'd" -> "somebodyd", and the capitalised "I..." keys, which can
# never match because processDigitArticle lower-cases first.  Written here as
# whitespace-separated "key value" pairs (no key or value contains a space).
_CONTRACTION_PAIRS = """
aint ain't              arent aren't            cant can't
couldve could've        couldnt couldn't        couldn'tve couldn't've
couldnt've couldn't've  didnt didn't            doesnt doesn't
dont don't              hadnt hadn't            hadnt've hadn't've
hadn'tve hadn't've      hasnt hasn't            havent haven't
hed he'd                hed've he'd've          he'dve he'd've
hes he's                howd how'd              howll how'll
hows how's              Id've I'd've            I'dve I'd've
Im I'm                  Ive I've                isnt isn't
itd it'd                itd've it'd've          it'dve it'd've
itll it'll              let's let's             maam ma'am
mightnt mightn't        mightnt've mightn't've  mightn'tve mightn't've
mightve might've        mustnt mustn't          mustve must've
neednt needn't          notve not've            oclock o'clock
oughtnt oughtn't        ow's'at 'ow's'at        'ows'at 'ow's'at
'ow'sat 'ow's'at        shant shan't            shed've she'd've
she'dve she'd've        she's she's             shouldve should've
shouldnt shouldn't      shouldnt've shouldn't've
shouldn'tve shouldn't've                        somebody'd somebodyd
somebodyd've somebody'd've                      somebody'dve somebody'd've
somebodyll somebody'll  somebodys somebody's    someoned someone'd
someoned've someone'd've                        someone'dve someone'd've
someonell someone'll    someones someone's      somethingd something'd
somethingd've something'd've                    something'dve something'd've
somethingll something'll                        thats that's
thered there'd          thered've there'd've    there'dve there'd've
therere there're        theres there's          theyd they'd
theyd've they'd've      they'dve they'd've      theyll they'll
theyre they're          theyve they've          twas 'twas
wasnt wasn't            wed've we'd've          we'dve we'd've
weve we've              werent weren't          whatll what'll
whatre what're          whats what's            whatve what've
whens when's            whered where'd          wheres where's
whereve where've        whod who'd              whod've who'd've
who'dve who'd've        wholl who'll            whos who's
whove who've            whyll why'll            whyre why're
whys why's              wont won't              wouldve would've
wouldnt wouldn't        wouldnt've wouldn't've  wouldn'tve wouldn't've
yall y'all              yall'll y'all'll        y'allll y'all'll
yall'd've y'all'd've    y'alld've y'all'd've    y'all'dve y'all'd've
youd you'd              youd've you'd've        you'dve you'd've
youll you'll            youre you're            youve you've
""".split()
VQA_CONTRACTIONS: Dict[str, str] = dict(
    zip(_CONTRACTION_PAIRS[0::2], _CONTRACTION_PAIRS[1::2]))

# manualMap, lines 43-55 (number words -> digits; "none" -> "0").
VQA_NUMBER_WORDS: Dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
    "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
    "nine": "9", "ten": "10",
}
# articles, lines 56-59.
VQA_ARTICLES = ("a", "an", "the")
# periodStrip, line 62: a period not followed by a digit.  The leading
# "(?!<=\d)" is a negative *look-ahead* for the text "<=" + digit (meant as a
# look-behind), always true where a period follows; kept verbatim.
# re.ASCII: the official script is Python 2 and compiles its patterns without
# re.UNICODE, so there ``\d`` matches only 0-9, also on unicode input.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
# commaStrip, line 63: a comma between two digits.
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)", re.ASCII)
# punct, lines 64-66, in the official order.  NOT in it: the apostrophe, the
# colon and the period (periods have their own rule above).
VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\",
             "_", "-", ">", "<", "@", "`", ",", "?", "!")
# Lines 137-139 call ``self.periodStrip.sub("", outText, re.UNICODE)``: the
# flag's value (32) lands in the positional *count* argument, so at most 32
# periods are removed.  (LAVIS line 258: the same call, the same cap.)
_PERIOD_STRIP_COUNT = int(re.UNICODE)
# The same two patterns as LAVIS compiles them (vqa_eval.py lines 167-168):
# Python 3 ``str`` patterns, so ``\d`` there matches every Unicode decimal
# digit (e.g. U+0661), not only 0-9.  Used by the "lavis" revision only.
_PERIOD_STRIP_PY3 = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP_PY3 = re.compile(r"(\d)(,)(\d)")

#: Revisions accepted by :func:`vqa_score` / :func:`vqa_accuracy`.
VQA_REVISIONS = ("lavis", "latest")


def _strip_answer(text: str) -> str:
    """Lines 88-90 (ground truths) and 92-94 (prediction): newline and tab
    -> space, then strip surrounding whitespace.  (458a8b2 lines 87-89 and
    LAVIS lines 212-214 do this to the prediction only.)"""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(in_text: str, comma_strip=_COMMA_STRIP,
                         period_strip=_PERIOD_STRIP) -> str:
    """``processPunctuation``, vqaEval.py lines 130-140 (458a8b2: lines
    122-132; LAVIS: lines 249-259, with ``comma_strip`` / ``period_strip``
    compiled the Python 3 way).

    For each character of :data:`VQA_PUNCT`, in order: when the *input* text
    has it next to a space (either side), or the input text has a comma
    between two digits anywhere, every occurrence is deleted; otherwise every
    occurrence becomes a space (line 133: the test reads ``inText``, the
    replacement edits ``outText``).  Then up to 32 periods not followed by a
    digit are deleted (lines 137-139, the count quirk).
    """
    out = in_text
    digit_comma = comma_strip.search(in_text) is not None
    for p in VQA_PUNCT:
        if (p + " " in in_text or " " + p in in_text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return period_strip.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(in_text: str) -> str:
    """``processDigitArticle``, vqaEval.py lines 142-155 (458a8b2: lines
    134-147; LAVIS: lines 261-274).

    Lower-case, split on whitespace, map number words to digits (line 146;
    its ``manualMap.setdefault`` also stores unknown words as themselves,
    which changes nothing), drop articles (lines 147-150), replace whole words
    found in the contraction table (lines 151-153), join with single spaces.
    """
    words = []
    for w in in_text.lower().split():
        w = VQA_NUMBER_WORDS.get(w, w)
        if w not in VQA_ARTICLES:
            words.append(w)
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(ans: str) -> str:
    """Full VQA answer normalisation: what ``vqaEval.py`` does to an answer
    in its "answers differ" branch.

    newline/tab -> space and strip (lines 92-94), ``processPunctuation``
    (lines 130-140), then ``processDigitArticle`` (lines 142-155: lower-case,
    number words -> digits, drop a/an/the, ASCII contraction table); lines
    102-103 apply this to the prediction, lines 99-101 to every ground truth.

    NOTE: :func:`vqa_score` does NOT always apply it.  ``revision="latest"``
    skips it on both sides when all ground-truth answers of a question are
    the same string (line 98); ``revision="lavis"`` applies it to the
    prediction only (with Python 3 regexes), never to the ground truths.
    Other callers (e.g. :func:`exact_match_accuracy`) use it as a plain
    answer normaliser.
    """
    if not isinstance(ans, str):
        raise TypeError(f"answer must be a str, got {type(ans).__name__}")
    return _process_digit_article(_process_punctuation(_strip_answer(ans)))


def _check_vqa_revision(revision) -> None:
    if revision not in VQA_REVISIONS:
        raise ValueError(f"unknown VQA evaluation revision {revision!r}: use "
                         f"'lavis' (GT-Vision-Lab/VQA 458a8b2, as vendored "
                         f"by LAVIS) or 'latest' (GT-Vision-Lab/VQA a013f00)")


def _leave_one_out_mean(gts: Sequence[str], res: str) -> float:
    """Lines 105-112 (458a8b2: 97-104; LAVIS: 222-231): for each ground
    truth i, ``min(1, #{j != i : gt_j == res} / 3)``; their mean."""
    accs = []
    for i in range(len(gts)):
        matching = sum(1 for j, g in enumerate(gts) if j != i and g == res)
        accs.append(min(1, float(matching) / 3))
    return float(sum(accs)) / len(accs)


def vqa_score(prediction: str, answers: Sequence[str], *,
              revision: str = "lavis") -> float:
    """VQA accuracy of one prediction in [0, 1]: one iteration of the
    question loop of ``VQAEval.evaluate`` in GT-Vision-Lab/VQA
    ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, in one of two
    revisions.

    ``revision="lavis"`` (default) -- revision 458a8b2 (2016-10-08), lines
    85-104, as vendored (ported to Python 3) by Salesforce LAVIS in
    ``lavis/common/vqa_tools/vqa_eval.py`` (506965b, lines 210-231; the loop
    is unchanged since LAVIS's first commit of the file).  ECoFLaP's BLIP-2
    numbers were computed with it.

    1. the prediction: newline/tab -> space, strip, ``processPunctuation``,
       ``processDigitArticle`` -- always (458a8b2 lines 86-91, LAVIS
       211-216);
    2. the ground truths are used as given (not stripped); only if they are
       not all identical (``len(set(gtAnswers)) > 1``) each gets
       ``processPunctuation`` -- never ``processDigitArticle`` (458a8b2
       lines 93-96, LAVIS 218-221).  So "Two" scores 1 against ten "2" but
       "two" scores 0 against ten "two", and "dog" scores 0 against
       ground truths "the dog" (not lower-cased, article kept);
    3. leave-one-out matching as below (458a8b2 lines 97-104, LAVIS 222-231).

    LAVIS runs under Python 3, where its regexes (lines 167-168) treat any
    Unicode decimal digit as ``\\d``; this revision does the same (GT-Vision-
    Lab's Python 2 original would match 0-9 only -- irrelevant for VQAv2's
    answers).

    ``revision="latest"`` -- revision a013f00 (2021-03-11, "Fixed processing
    answers bug"), lines 86-112:

    1. ground truths and prediction: newline/tab -> space, strip (lines
       87-94);
    2. only if the stripped ground truths are not all identical (line 98):
       every ground truth AND the prediction get ``processPunctuation`` then
       ``processDigitArticle`` (lines 99-103).  If they are all identical,
       nothing else is done to either side: the match is then exact and
       case-sensitive ("Yes" or "two" against ten "yes" / "2" scores 0);
    3. leave-one-out matching (lines 105-112).

    Leave-one-out matching (both): for each ground truth i,
    ``min(1, #{j != i : gt_j == pred} / 3)``; the score is their mean.  The
    official line leaves out answers by dict inequality
    (``item != gtAnsDatum``); the VQA annotation dicts carry distinct
    ``answer_id`` values, so exactly the i-th answer is left out, which is
    what this does by position.  Any number of answers is accepted: with k
    identical answers the best score is min(1, (k-1)/3), so one answer
    always scores 0.  The scripts report 100x this, rounded to 2 decimals
    (a013f00 line 163, 458a8b2 line 155); no rounding here.

    Raises ValueError for another ``revision``, an empty answer list;
    TypeError for non-string inputs.
    """
    _check_vqa_revision(revision)
    if isinstance(answers, str):
        raise TypeError("answers must be a list of strings, not a str")
    answers = list(answers)
    if len(answers) == 0:
        raise ValueError("vqa_score needs at least one ground-truth answer, "
                         "got an empty list")
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    for a in answers:
        if not isinstance(a, str):
            raise TypeError(f"answers must be strings, got {type(a).__name__}")
    if revision == "lavis":
        res = _process_digit_article(_process_punctuation(
            _strip_answer(prediction), _COMMA_STRIP_PY3, _PERIOD_STRIP_PY3))
        gts = answers
        if len(set(gts)) > 1:
            gts = [_process_punctuation(a, _COMMA_STRIP_PY3, _PERIOD_STRIP_PY3)
                   for a in gts]
        return _leave_one_out_mean(gts, res)
    gts = [_strip_answer(a) for a in answers]
    res = _strip_answer(prediction)
    if len(set(gts)) > 1:
        gts = [_process_digit_article(_process_punctuation(a)) for a in gts]
        res = _process_digit_article(_process_punctuation(res))
    return _leave_one_out_mean(gts, res)


def vqa_accuracy(predictions: Sequence[str],
                 answers: Sequence[Sequence[str]], *,
                 revision: str = "lavis") -> float:
    """Mean VQA accuracy in percent (0..100): ``100 * sum(scores) / n`` over
    the per-question :func:`vqa_score` (same ``revision``: ``"lavis"``, the
    default, or ``"latest"``), as ``setAccuracy`` computes the overall number
    (a013f00 line 158; 458a8b2 line 150; LAVIS vqa_eval.py line 277), except
    that the scripts then round to 2 decimals (``round(..., self.n)``, n=2);
    no rounding here.
    """
    _check_vqa_revision(revision)
    if len(predictions) != len(answers):
        raise ValueError(
            f"predictions and answers differ in length: "
            f"{len(predictions)} predictions vs {len(answers)} answer lists")
    if len(predictions) == 0:
        raise ValueError("vqa_accuracy needs at least one question")
    return 100.0 * sum(vqa_score(p, a, revision=revision)
                       for p, a in zip(predictions, answers)) \
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
