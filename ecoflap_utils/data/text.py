"""Bundled plain-text data for language models: a calibration text and a held-out evaluation text.

Both come from one file that ships with gensim (its test data): a shortened dump of the first
English Wikipedia articles (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``).
:func:`build_wiki_text` turns its markup into plain prose paragraphs and splits it *by article* into
``data/wiki/calibration.txt`` and ``data/wiki/eval.txt``, so no article (hence no paragraph) is in both.
The two files are committed; :func:`calibration_text` and :func:`eval_text` read them, or rebuild
them into a temporary folder when they are missing (an installed copy without ``data/``).

Calibration windows follow Wanda / SparseGPT (Sun et al. 2024, Sec. 4; Frantar & Alistarh 2023,
Sec. 5): ``n`` windows of ``seq_len`` consecutive tokens at seeded random offsets of the
calibration text (:func:`token_windows`).
"""
from __future__ import annotations

import bz2
import functools
import hashlib
import json
import random
import re
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import UserError

SOURCE_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_DIR = Path(__file__).resolve().parents[2] / "data" / "wiki"
FILES = {"calibration": "calibration.txt", "eval": "eval.txt"}

#: defaults of :func:`build_wiki_text` (the committed files were built with these)
EVAL_EVERY = 3
MAX_ARTICLE_CHARS = 6000
EVAL_CHARS = 135_000
CALIBRATION_CHARS = 135_000
MIN_PARAGRAPH_CHARS = 120

# ----------------------------------------------------------------------------- markup -> prose
_HEADING = re.compile(r"^\s*=+[^=\n]*=+\s*$")
_EMPTY_PARENS = re.compile(r"\(\s*(?:[,;:.]\s*)*\)")
_OPEN_PAREN_PUNCT = re.compile(r"\(\s*[,;:]\s*")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")
_REPEATED_PUNCT = re.compile(r"([,;:])(\s*[,;:])+")
_SPACES = re.compile(r"[ \t\u00a0]+")
_LEFTOVER = ("|", "{", "}", "[[", "]]", "http", "thumb", "Category:", "File:", "Image:", "px", "<", ">", "&")


def _clean_paragraph(par: str) -> str:
    """Tidy one paragraph left by ``filter_wiki``: emphasis quotes, gaps where templates were, spacing."""
    par = par.replace("'''", "").replace("''", "")
    par = _SPACES.sub(" ", par.replace("\n", " ")).strip()
    par = _EMPTY_PARENS.sub("", par)
    par = _OPEN_PAREN_PUNCT.sub("(", par)
    par = _REPEATED_PUNCT.sub(r"\1", par)
    par = _SPACE_BEFORE_PUNCT.sub(r"\1", par)
    par = _SPACES.sub(" ", par).strip()
    return par


def _is_prose(par: str, min_chars: int) -> bool:
    """A paragraph that reads as running text: long enough, ends a sentence, no markup left over."""
    if len(par) < min_chars or par[0] in "*#:;!|{=-" or not par[0].isalnum() and par[0] not in "\"'(":
        return False
    if not par.endswith((".", "!", "?", '."', ".'", '?"')):
        return False
    if any(s in par for s in _LEFTOVER):
        return False
    letters = sum(c.isalpha() or c == " " for c in par)
    return letters / len(par) > 0.85


def wiki_prose(wikitext: str, *, min_chars: int = MIN_PARAGRAPH_CHARS) -> list[str]:
    """The prose paragraphs of one article's wiki markup, in order (headings, lists, tables dropped).

    Markup is removed with gensim's ``filter_wiki`` (links become their text, templates, references and
    tables go); what is left is split at blank lines and kept only if it reads as running text.
    """
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(wikitext)
    out = []
    for chunk in re.split(r"\n\s*\n", text):
        lines = [ln for ln in chunk.split("\n") if ln.strip() and not _HEADING.match(ln)]
        if not lines:
            continue
        par = _clean_paragraph("\n".join(lines))
        if par and _is_prose(par, min_chars):
            out.append(par)
    return out


# ----------------------------------------------------------------------------- source and build
def gensim_wiki_dump() -> Path:
    """Path of the shortened English Wikipedia dump inside the installed gensim package."""
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("gensim is not installed, and the bundled wiki text needs its test data: pip install gensim")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / SOURCE_NAME
    if not path.exists():
        raise UserError(f"gensim's test data file {SOURCE_NAME} is missing from {path.parent}: reinstall gensim")
    return path


def iter_wiki_articles(source: str | Path | None = None) -> Iterator[tuple[str, int, list[str]]]:
    """``(title, page_id, paragraphs)`` for each main-namespace article of the dump, in file order."""
    from gensim.corpora.wikicorpus import extract_pages

    source = Path(source) if source is not None else gensim_wiki_dump()
    with bz2.BZ2File(source) as f:
        for title, text, pageid in extract_pages(f, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            yield title, int(pageid), wiki_prose(text)


def build_wiki_text(out_dir: str | Path, *, source: str | Path | None = None, eval_every: int = EVAL_EVERY,
                    max_article_chars: int = MAX_ARTICLE_CHARS, eval_chars: int = EVAL_CHARS,
                    calibration_chars: int = CALIBRATION_CHARS) -> dict:
    """Write ``calibration.txt``, ``eval.txt`` and ``manifest.json`` to ``out_dir``; deterministic.

    Rule: articles with at least one prose paragraph are taken in dump order and numbered 0, 1, 2, ...;
    article ``i`` goes to the evaluation part when ``i % eval_every == 1`` and to the calibration part
    otherwise, so the split is by article and made once. Each article contributes its first paragraphs
    up to ``max_article_chars`` characters (at least one paragraph), a paragraph already used is never
    used again, and a part stops taking articles once it holds ``eval_chars`` / ``calibration_chars``.
    Each article is written as a ``= Title =`` line then its paragraphs, separated by blank lines
    (the layout of WikiText). Returns the manifest (titles and sizes of each part).
    """
    if eval_every < 2:
        raise UserError(f"eval_every must be >= 2 (every k-th article is held out), got {eval_every}")
    budgets = {"calibration": calibration_chars, "eval": eval_chars}
    parts: dict[str, list[str]] = {"calibration": [], "eval": []}
    titles: dict[str, list[str]] = {"calibration": [], "eval": []}
    size = {"calibration": 0, "eval": 0}
    seen: set[str] = set()
    index = 0
    for title, _pageid, paragraphs in iter_wiki_articles(source):
        paragraphs = [p for p in paragraphs if p not in seen]
        if not paragraphs:
            continue
        part = "eval" if index % eval_every == 1 else "calibration"
        index += 1
        if size[part] >= budgets[part]:
            if all(size[p] >= budgets[p] for p in budgets):
                break
            continue
        kept, n = [], 0
        for p in paragraphs:
            if kept and n + len(p) > max_article_chars:
                break
            kept.append(p)
            n += len(p)
        seen.update(kept)
        parts[part].append("\n\n".join([f"= {title} ="] + kept))
        titles[part].append(title)
        size[part] += n
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"source": SOURCE_NAME, "eval_every": eval_every, "max_article_chars": max_article_chars,
                "budgets_chars": budgets, "parts": {}}
    for part, file in FILES.items():
        text = "\n\n".join(parts[part]) + "\n"
        (out / file).write_text(text, encoding="utf-8")
        manifest["parts"][part] = {"file": file, "articles": titles[part], "chars": len(text),
                                   "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


# ----------------------------------------------------------------------------- reading
@functools.lru_cache(maxsize=1)
def wiki_dir() -> Path:
    """The folder holding the bundled wiki text: ``data/wiki`` of the repository, else built into a temp dir."""
    if all((WIKI_DIR / f).exists() for f in FILES.values()):
        return WIKI_DIR
    tmp = Path(tempfile.mkdtemp(prefix="ecoflap_wiki_"))
    build_wiki_text(tmp)
    return tmp


def calibration_text() -> str:
    """The bundled calibration text (Wikipedia prose, disjoint by article from :func:`eval_text`)."""
    return (wiki_dir() / FILES["calibration"]).read_text(encoding="utf-8")


def eval_text() -> str:
    """The bundled held-out evaluation text for perplexity (WikiText-style prose, never used to calibrate)."""
    return (wiki_dir() / FILES["eval"]).read_text(encoding="utf-8")


def split_articles(text: str) -> dict[str, list[str]]:
    """Title -> paragraphs of a text written by :func:`build_wiki_text`."""
    out: dict[str, list[str]] = {}
    title = None
    for chunk in text.strip().split("\n\n"):
        m = re.fullmatch(r"= (.+) =", chunk)
        if m:
            title = m.group(1)
            out[title] = []
        elif title is not None:
            out[title].append(chunk)
    return out


def token_windows(tokenizer, text: str, n: int, seq_len: int, seed: int = 0) -> list[list[int]]:
    """``n`` windows of ``seq_len`` consecutive token ids at seeded random offsets of ``text``.

    The calibration sampler of Wanda and SparseGPT (random segments of the calibration corpus). The
    text is tokenized once as a whole, without special tokens.
    """
    if n < 1 or seq_len < 2:
        raise UserError(f"need n >= 1 windows of seq_len >= 2 tokens, got n={n}, seq_len={seq_len}")
    ids = _token_ids(tokenizer, text)
    if len(ids) <= seq_len:
        raise UserError(f"the text has {len(ids)} tokens, too few for windows of {seq_len}: "
                        "use a shorter seq_len or a longer text")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seq_len + 1) for _ in range(n)]
    return [list(ids[s: s + seq_len]) for s in starts]


def _token_ids(tokenizer, text: str) -> tuple[int, ...]:
    key = (id(tokenizer), hashlib.sha1(text.encode("utf-8")).hexdigest())
    hit = _TOKEN_CACHE.get(key)
    if hit is None or hit[0] is not tokenizer:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        hit = (tokenizer, tuple(ids))
        _TOKEN_CACHE.clear()  # hold one text at a time
        _TOKEN_CACHE[key] = hit
    return hit[1]


_TOKEN_CACHE: dict = {}
