"""Evaluation of dense and pruned models on the ECoFLaP benchmarks (paper Sec. 4, Tables 1-4).

* CLIP: zero-shot classification (top-1/top-5, mean per-class recall) and image-text retrieval
  (R@1/5/10), following CLIP (Radford et al. 2021) and CLIP_benchmark's JSON;
* BLIP-2: VQAv2 / OK-VQA (VQA accuracy), GQA (exact match) and captioning (CIDEr-D, BLEU-4),
  generated the way BLIP-2/LAVIS does (prompt ``"Question: {} Short answer:"``, beam search), in batches of
  :data:`GENERATE_BATCH` questions (:data:`GREEDY_BATCH` greedy) with the key/value cache; ``num_beams=1`` (greedy) is the fast path, and the
  answers do not depend on the batch size (:func:`generate_answers`);
* causal LMs: WikiText-2 perplexity with the SparseGPT/Wanda protocol.

Zero-shot classification reads CoOp's 11 datasets from their own split files (``coop:/data/oxford_pets``,
:mod:`ecoflap_utils.data.coop`) and then uses that dataset's single CoOp template, as the official
``ZeroshotCLIP`` does; other data get the 7-template ensemble (:data:`DEFAULT_TEMPLATES`). ``templates="coop"``
or ``"ensemble"`` picks one of the two by name; results name the templates used. ``protocol="paper"``
(:func:`evaluate`) applies the official evaluation settings (:func:`ecoflap_utils.protocol.paper_eval_settings`).

Everything is batched, runs on the model's device and dtype (read from its parameters), shows tqdm
progress bars (quiet off a terminal), and takes ``limit`` to evaluate on the first examples only.
Metrics come from :mod:`ecoflap_utils.metrics`; readers from :mod:`ecoflap_utils.data.formats`.

Each evaluator also returns ``"intervals"``: ``{headline metric: [low, high]}``, a 95 % percentile bootstrap
interval over the evaluated items (images, questions, queries, perplexity windows) computed from per-item
scores of the same run (:mod:`ecoflap_utils.intervals`; 1,000 resamples, seed 0). It covers the sampling
variation of the evaluation items only, not calibration seeds. It is left out (with a warning) when the
per-item scores do not average to the headline number, and when there are fewer than two items.
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import intervals as I
from . import metrics as M
from .data import coop, formats
from .errors import UserError
from .models.images import _first_float_param, image_batch

TASKS = ("zeroshot", "retrieval", "vqav2", "okvqa", "gqa", "caption", "perplexity")
FAMILY_TASKS = {
    "clip": ("zeroshot", "retrieval"),
    "blip2": ("vqav2", "okvqa", "gqa", "caption"),
    "causal_lm": ("perplexity",),
}
FAMILY_NAMES = {"clip": "CLIP", "blip2": "BLIP-2", "causal_lm": "causal language model"}
TASK_NEEDS = {"zeroshot": "clip", "retrieval": "clip", "vqav2": "blip2", "okvqa": "blip2", "gqa": "blip2",
              "caption": "blip2", "perplexity": "causal_lm"}

#: A small prompt ensemble (the 7 templates CLIP's authors picked for ImageNet), used without --templates on data
#: that is not a CoOp dataset, and by name with ``templates="ensemble"``.
DEFAULT_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
#: template sets by name: ``coop`` (the CoOp dataset's single ``ZeroshotCLIP`` template) and ``ensemble``
TEMPLATE_SETS = ("coop", "ensemble")
VQA_PROMPT = "Question: {} Short answer:"
CAPTION_PROMPT = "a photo of"
#: questions (or images) per ``generate`` call when no batch size is given (``--batch-size`` of the generation
#: tasks); with beam search each one is ``num_beams`` rows of the LM's batch. 1 is the one-by-one path.
GENERATE_BATCH = 32
#: questions per call with greedy decoding (``num_beams=1``) when no batch size is given. Larger than
#: :data:`GENERATE_BATCH` because a greedy decoding step over few rows is bound by reading the weights: on
#: mini-blip2 at one CPU thread 500 questions took 20.0 s dense and 42.0 s Wanda-0.5-pruned at 32 per call,
#: 17.8 s and 30.7 s at 128, 18.1 s and 30.9 s at 256 (bench/results/eval_throughput.md). The language model then
#: holds 128 rows, fewer than beam 5 at 32 questions (160); the vision encoder and Q-Former see 128 images per
#: call instead of 32 (pass ``batch_size`` to lower it where memory is short).
GREEDY_BATCH = 128


def generate_batch(num_beams: int, batch_size: int | None = None) -> int:
    """Questions per ``generate`` call: ``batch_size`` when given, else :data:`GREEDY_BATCH` for greedy decoding
    and :data:`GENERATE_BATCH` for beam search."""
    if batch_size is not None:
        return batch_size
    return GREEDY_BATCH if num_beams == 1 else GENERATE_BATCH


# --------------------------------------------------------------------------- small helpers
def _disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None shows bars only on a terminal; False hides them."""
    return None if progress in (None, True) else True


def _check_positive(value: int | None, name: str) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise UserError(f"{name} must be a positive integer, got {value!r}")


def _text_device(adapter) -> torch.device:
    p = _first_float_param(adapter.model)
    return p.device if p is not None else torch.device("cpu")


def _chunks(seq: Sequence[Any], size: int):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def encode_images(adapter, images: Sequence[Any], *, batch_size: int = 64, progress: bool | None = None,
                  desc: str = "images") -> torch.Tensor:
    """L2-normalised image embeddings (float32, CPU), ``batch_size`` images at a time."""
    out = []
    with torch.inference_mode():
        for chunk in tqdm(list(_chunks(list(images), batch_size)), desc=desc, disable=_disable(progress), leave=False):
            out.append(_normalise(adapter.encode_image(image_batch(adapter, chunk))).cpu())
    return torch.cat(out)


def encode_texts(adapter, texts: Sequence[str], *, batch_size: int = 64, progress: bool | None = None,
                 desc: str = "texts") -> torch.Tensor:
    """L2-normalised text embeddings (float32, CPU) of ``adapter.tokenizer(texts)``, in batches."""
    device = _text_device(adapter)
    out = []
    with torch.inference_mode():
        for chunk in tqdm(list(_chunks(list(texts), batch_size)), desc=desc, disable=_disable(progress), leave=False):
            tokens = adapter.tokenizer(list(chunk)).to(device)
            out.append(_normalise(adapter.encode_text(tokens)).cpu())
    return torch.cat(out)


def _subset_indices(n: int, limit: int | None, spread: bool) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    if spread:  # evenly spaced, so that a class-sorted set keeps every class
        return [i * n // limit for i in range(limit)]
    return list(range(limit))


def _fill(template: str, name: str) -> str:
    return template.format(c=name) if "{c}" in template else template.format(name)


def _consistent(items: np.ndarray, headline: float, metric: str, statistic: float | None = None) -> bool:
    """Whether per-item scores reproduce the headline (their mean, or ``statistic`` computed from them)."""
    got = float(np.mean(items)) if statistic is None else float(statistic)
    if abs(got - float(headline)) <= 1e-6 * max(1.0, abs(float(headline))):
        return True
    warnings.warn(f"no interval for {metric}: the per-item scores give {got!r}, the headline is {headline!r}",
                  RuntimeWarning, stacklevel=3)
    return False


def item_interval(items: Sequence[float], headline: float, metric: str) -> dict[str, list[float]]:
    """``{metric: [low, high]}``: bootstrap interval of the mean of per-item scores (``intervals.bootstrap_ci``),
    or ``{}`` when there are fewer than ``intervals.MIN_ITEMS`` items or their mean is not ``headline``."""
    arr = np.asarray(items, dtype=np.float64)
    if arr.size < I.MIN_ITEMS or not _consistent(arr, headline, metric):
        return {}
    return {metric: list(I.bootstrap_ci(arr))}


# --------------------------------------------------------------------------- zero-shot classification
def classifier_weights(adapter, classnames: Sequence[str], templates: Sequence[str], *,
                       progress: bool | None = None) -> torch.Tensor:
    """Zero-shot classifier (CLIP, Radford et al. 2021, Sec. 3.1.4): for each class the normalised mean of
    the normalised text embeddings of its prompts. Returns (n_classes, dim), float32 on the CPU."""
    if not templates:
        raise UserError("no prompt templates: give at least one, e.g. 'a photo of a {}.'")
    for t in templates:
        if "{}" not in t and "{c}" not in t:
            raise UserError(f"template {t!r} has no '{{}}' (or '{{c}}') where the class name goes")
    rows = []
    for name in tqdm(list(classnames), desc="classes", disable=_disable(progress), leave=False):
        emb = encode_texts(adapter, [_fill(t, name) for t in templates], batch_size=len(templates), progress=False)
        rows.append(_normalise(emb.mean(dim=0)))
    return torch.stack(rows)


def resolve_templates(templates: Any, coop_data: "coop.CoOpDataset | None" = None) -> tuple[list[str], str]:
    """``(templates, template_set)``: what zero-shot classification prompts with, and which set that is.

    ``None`` gives the CoOp dataset's single template (``coop``) on CoOp data, else the ensemble
    (:data:`DEFAULT_TEMPLATES`, ``ensemble``); the names ``"coop"`` and ``"ensemble"`` pick one; a list is
    used as given (``given``)."""
    if templates is None:
        templates = "coop" if coop_data is not None else "ensemble"
    if isinstance(templates, str) and templates in TEMPLATE_SETS:
        if templates == "ensemble":
            return list(DEFAULT_TEMPLATES), "ensemble"
        if coop_data is None:
            raise UserError("templates 'coop' are a CoOp dataset's own: give the data as coop:/data/NAME, or "
                            "templates 'ensemble' or a file of templates")
        return [coop_data.template], "coop"
    if isinstance(templates, str):
        raise UserError(f"templates {templates!r}: give a list of templates, a file, or one of "
                        f"{', '.join(TEMPLATE_SETS)}")
    return [str(t) for t in templates], "given"


def zeroshot_classification(adapter, dataset: Any, *, classnames: Sequence[str] | None = None,
                            templates: Sequence[str] | str | None = None, batch_size: int = 64,
                            limit: int | None = None, dataset_name: str | None = None, split: str = "test",
                            template_set: str | None = None, progress: bool | None = None) -> dict[str, Any]:
    """CLIP zero-shot classification (Radford et al. 2021; ECoFLaP Table 3): logits = image_emb @ text_emb.T.

    ``dataset`` is an ImageFolder directory, a CSV of ``path,label``, a list of ``(image, label)``, a
    :class:`~ecoflap_utils.data.formats.ClassificationSet`, or one of CoOp's datasets (``"coop:/data/oxford_pets"``
    or a :class:`~ecoflap_utils.data.coop.CoOpDataset`), whose ``split`` (default ``test``) is evaluated with
    CoOp's class names. ``templates``: see :func:`resolve_templates` (CoOp data: the dataset's single template,
    as ``ZeroshotCLIP``, ``zsclip.py`` L42-45; other data: the 7-template ensemble); ``template_set`` relabels
    a given list (e.g. ``"coop"`` for the paper preset's). ``limit`` keeps that many evenly spaced examples
    (a class-sorted folder would otherwise give one class). Returns ``acc1``, ``acc5``,
    ``mean_per_class_recall`` (percent), ``n``, ``intervals`` (of ``acc1``, over images), ``templates`` and
    ``template_set`` (what prompted), ``dataset`` and ``split`` for CoOp data, and ``clip_benchmark``
    (CLIP_benchmark's result JSON).
    """
    _check_positive(batch_size, "batch_size")
    _check_positive(limit, "limit")
    coop_data = coop.read_coop(dataset) if coop.is_coop(dataset) else None
    templates, label = resolve_templates(templates, coop_data)
    if coop_data is not None:
        ds = coop_data.classification_set(split)
        if classnames is not None:
            if len(classnames) != len(ds.classnames):
                raise UserError(f"{coop_data.name} has {len(ds.classnames)} classes but {len(classnames)} class "
                                "names were given: drop --classnames (CoOp's are used) or give one per class")
            ds.classnames = list(classnames)
    else:
        ds = formats.load_classification(dataset, classnames=classnames)
    names = list(classnames) if classnames is not None else ds.classnames
    if not names:
        raise UserError("zero-shot classification needs class names: pass --classnames FILE (one per line)")
    if max(ds.labels) >= len(names) or min(ds.labels) < 0:
        raise UserError(f"labels run from {min(ds.labels)} to {max(ds.labels)} but there are {len(names)} class "
                        "names: give one class name per label")
    idx = _subset_indices(len(ds), limit, spread=True)
    images = [ds.images[i] for i in idx]
    labels = np.asarray([ds.labels[i] for i in idx], dtype=np.int64)
    weights = classifier_weights(adapter, names, templates, progress=progress)
    feats = encode_images(adapter, images, batch_size=batch_size, progress=progress)
    logits = (feats @ weights.T).numpy()
    top = M.topk_accuracy(logits, labels, ks=(1, 5))
    out = {"acc1": top["top1"], "acc5": top["top5"],
           "mean_per_class_recall": M.mean_per_class_recall(logits, labels), "n": len(idx)}
    # per image: 100 if the label has the highest logit (argmax breaks ties towards the lower class, as top-k)
    correct = 100.0 * (logits.argmax(axis=1) == labels)
    out["intervals"] = item_interval(correct, out["acc1"], "acc1")
    out["templates"], out["template_set"] = list(templates), template_set or label
    if coop_data is not None:
        out.update(dataset=coop_data.name, split=split)
    out["clip_benchmark"] = {
        "dataset": dataset_name or ds.name, "model": adapter.name, "task": "zeroshot_classification",
        "metrics": {k: out[k] / 100.0 for k in ("acc1", "acc5", "mean_per_class_recall")},
    }
    return out


# --------------------------------------------------------------------------- retrieval
def retrieval(adapter, dataset: Any, *, batch_size: int = 64, limit: int | None = None, split: str | None = "test",
              image_root: str | os.PathLike | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Image->text and text->image recall@1/5/10 (BLIP/LAVIS Karpathy protocol; ECoFLaP Table 3).

    ``dataset``: a Karpathy-style COCO/Flickr30k JSON (several captions per image), a list of
    ``{"image", "captions"}`` or a :class:`~ecoflap_utils.data.formats.RetrievalSet`; ``limit`` keeps
    the first images with all their captions. Similarity is the cosine of CLIP embeddings. ``intervals``
    holds the interval of ``mean_recall`` (:func:`retrieval_interval`).
    """
    _check_positive(batch_size, "batch_size")
    _check_positive(limit, "limit")
    if isinstance(dataset, (str, os.PathLike)):
        ds = formats.read_karpathy(dataset, split=split, image_root=image_root)
    else:
        ds = formats.retrieval_from_memory(dataset)
    if limit is not None and limit < len(ds):
        ds = ds.subset(limit)
    img = encode_images(adapter, ds.images, batch_size=batch_size, progress=progress)
    txt = encode_texts(adapter, ds.texts, batch_size=batch_size, progress=progress)
    sim = (img @ txt.T).numpy()
    out: dict[str, Any] = M.retrieval_recall(sim, ds.txt2img, ds.img2txt, ks=(1, 5, 10))
    out.update(n_images=len(ds.images), n_texts=len(ds.texts))
    out["intervals"] = retrieval_interval(sim, ds.txt2img, ds.img2txt, out["mean_recall"], ks=(1, 5, 10))
    return out


def retrieval_item_recalls(sim: np.ndarray, txt2img: Sequence[int], img2txt: Sequence[Sequence[int]],
                           ks: Sequence[int] = (1, 5, 10)) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the mean over ``ks`` of 100 x [a correct item ranks in the top k]: one value per image
    (image->text) and one per text (text->image). Ranks as ``metrics.retrieval_recall`` (ties to the lower index)."""
    sim = np.asarray(sim, dtype=np.float64)
    n_img, n_txt = sim.shape
    ks_arr = np.asarray(ks)[None, :]
    cols = np.arange(n_txt)[None, :]
    i2t_rank = np.empty(n_img, dtype=np.int64)
    for i in range(n_img):
        gt = np.asarray(list(img2txt[i]), dtype=np.int64)
        row, s = sim[i][None, :], sim[i, gt][:, None]
        i2t_rank[i] = ((row > s).sum(axis=1) + ((row == s) & (cols < gt[:, None])).sum(axis=1)).min()
    gt_img = np.asarray(list(txt2img), dtype=np.int64)
    t2i_rank = np.empty(n_txt, dtype=np.int64)
    rows = np.arange(n_img)[:, None]
    step = max(1, (1 << 22) // max(1, n_img))
    for lo in range(0, n_txt, step):
        block, g = sim[:, lo : lo + step], gt_img[lo : lo + step]
        s = block[g, np.arange(block.shape[1])][None, :]
        t2i_rank[lo : lo + step] = (block > s).sum(axis=0) + ((block == s) & (rows < g[None, :])).sum(axis=0)
    return 100.0 * (i2t_rank[:, None] < ks_arr).mean(axis=1), 100.0 * (t2i_rank[:, None] < ks_arr).mean(axis=1)


def retrieval_interval(sim: np.ndarray, txt2img: Sequence[int], img2txt: Sequence[Sequence[int]], headline: float,
                       ks: Sequence[int] = (1, 5, 10)) -> dict[str, list[float]]:
    """``{"mean_recall": [low, high]}``. The unit resampled is an image with its captions (they share the
    image); the gallery is held fixed (ranks are not recomputed on a resample). On each resample
    mean_recall = (mean image->text recall + mean text->image recall over the resampled captions) / 2."""
    i2t, t2i = retrieval_item_recalls(sim, txt2img, img2txt, ks)
    n_img = len(i2t)
    owner = np.asarray(list(txt2img), dtype=np.int64)
    t2i_sum = np.bincount(owner, weights=t2i, minlength=n_img)
    t2i_count = np.bincount(owner, minlength=n_img).astype(np.float64)
    if n_img < I.MIN_ITEMS or t2i_count.sum() == 0:
        return {}
    point = (i2t.mean() + t2i_sum.sum() / t2i_count.sum()) / 2.0
    if not _consistent(i2t, headline, "mean_recall", statistic=point):
        return {}

    def stat(idx: np.ndarray) -> np.ndarray:
        count = t2i_count[idx].sum(axis=1)
        t2i_mean = np.divide(t2i_sum[idx].sum(axis=1), count, out=np.zeros(len(idx)), where=count > 0)
        return (i2t[idx].mean(axis=1) + t2i_mean) / 2.0

    return {"mean_recall": list(I.resample_ci(n_img, stat))}


# --------------------------------------------------------------------------- BLIP-2 generation
def _tokenize_prompt(tokenizer, text: str) -> list[int]:
    # Blip2Processor tokenises the prompt with the tokenizer's special tokens (BOS for OPT, EOS for T5).
    ids = tokenizer.encode(text, add_special_tokens=True)
    return list(ids.tolist() if hasattr(ids, "tolist") else ids)


def _paired_prompts(images: Sequence[Any], prompts: Sequence[str] | str) -> tuple[list, list[str]]:
    """Images and one prompt per image (a single prompt string serves them all)."""
    images = list(images)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise UserError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image (or one for all)")
    return images, prompts


@dataclass(frozen=True)
class _Blip2Inputs:
    """What both BLIP-2 answer paths (generation and ranking) read from the adapter to build the LM's input:
    ``n_query`` copies of ``image_token`` then the tokenised prompt, padded with ``pad``."""

    tokenizer: Any
    n_query: int
    image_token: int
    decoder_only: bool
    text_cfg: Any
    pad: int
    device: Any

    @classmethod
    def of(cls, adapter) -> "_Blip2Inputs":
        tok = getattr(adapter, "tokenizer", None)
        if tok is None:
            raise UserError(f"{adapter.name} has no tokenizer: load it from a folder that holds the tokenizer files")
        cfg = adapter.model.config
        pad = getattr(adapter, "pad_id", None)
        pad = int(pad if pad is not None else (cfg.text_config.pad_token_id or 0))
        return cls(tok, cfg.num_query_tokens, cfg.image_token_index, bool(cfg.use_decoder_only_language_model),
                   cfg.text_config, pad, adapter.input_device())

    def prefix(self, prompt: str) -> list[int]:
        return [self.image_token] * self.n_query + _tokenize_prompt(self.tokenizer, prompt)


def generate_answers(adapter, images: Sequence[Any], prompts: Sequence[str] | str, *, max_new_tokens: int = 10,
                     min_new_tokens: int = 0, num_beams: int = 1, length_penalty: float = 1.0,
                     batch_size: int | None = None, min_length: int | None = None,
                     progress: bool | None = None) -> list[str]:
    """Generate one text per image with a BLIP-2 model (Li et al. 2023, Sec. 3.3), deterministically.

    The language model's input is ``num_query_tokens`` copies of ``config.image_token_index`` (replaced by
    the Q-Former outputs inside ``Blip2ForConditionalGeneration.generate``) followed by the tokenised
    prompt, as ``Blip2Processor`` builds it. Decoder-only LMs (OPT, LLaMA) get left padding and their
    output is cut after the prompt; a T5 LM reads the prompt in its encoder and its decoder output is the text.

    ``min_new_tokens`` forbids the end token before that many new tokens (our default). ``min_length`` instead
    passes transformers' ``min_length`` as LAVIS's ``blip2_t5.py`` does (L360, L426): it counts the whole
    output sequence, for T5 the decoder's start token included (so ``min_length=k`` means k - 1 new tokens), for
    a decoder-only LM the prompt included. Give one of the two.

    Batching: ``batch_size`` questions per ``generate`` call (None: :func:`generate_batch`), with the key/value cache (``num_beams=1``, greedy,
    is the fast path); questions are taken in order of prompt length so that a batch pads as little as possible,
    and the answers come back in the input order. Padding is invisible: masked positions get no attention and
    position ids follow the attention mask (``cumsum(mask) - 1``, transformers' ``generate``), so each answer is
    the one ``batch_size=1`` gives: tested string for string on the tiny models and mini-blip2, greedy and beam.
    (A batch changes matrix shapes and so float rounding; only a near-tie between two tokens could flip.)
    With beam search on a decoder-only LM the prompt goes through the LM once per question and its cache is
    repeated for the beams (:func:`_beam_generate`), not once per beam as ``generate`` does.
    """
    _check_positive(batch_size, "batch_size")
    _check_positive(max_new_tokens, "max_new_tokens")
    _check_positive(num_beams, "num_beams")
    batch_size = generate_batch(num_beams, batch_size)
    images, prompts = _paired_prompts(images, prompts)
    if not images:
        return []
    inp = _Blip2Inputs.of(adapter)
    model, tok, text_cfg, pad, decoder_only = adapter.model, inp.tokenizer, inp.text_cfg, inp.pad, inp.decoder_only
    gen_kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                                  pad_token_id=pad, use_cache=True)
    if min_length is not None and min_new_tokens:
        raise UserError("give min_new_tokens or min_length (transformers' count, start token included), not both")
    if min_new_tokens:
        gen_kw["min_new_tokens"] = min(min_new_tokens, max_new_tokens)
    if min_length is not None:
        gen_kw["min_length"] = int(min_length)
    if num_beams > 1:
        gen_kw["length_penalty"] = length_penalty
    if getattr(text_cfg, "eos_token_id", None) is not None:
        gen_kw["eos_token_id"] = text_cfg.eos_token_id
    # beam search on a decoder-only LM: the prompt once per question (not per beam); models spread over devices by
    # accelerate, and LMs whose generation config asks for a cache of its own, keep transformers' own path
    lm_gen_cfg = getattr(getattr(model, "language_model", None), "generation_config", None)
    shared_prefill = (decoder_only and num_beams > 1 and not hasattr(model, "hf_device_map")
                      and getattr(lm_gen_cfg, "cache_implementation", None) is None)
    device = inp.device
    prefixes = [inp.prefix(p) for p in prompts]
    order = sorted(range(len(images)), key=lambda i: len(prefixes[i]))  # stable: equal lengths keep their order
    answers: list[str | None] = [None] * len(images)
    for chunk in tqdm(list(_chunks(order, batch_size)), desc="generate", disable=_disable(progress), leave=False):
        pixel = image_batch(adapter, [images[i] for i in chunk])
        seqs = [prefixes[i] for i in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            span = slice(width - len(s), width) if decoder_only else slice(0, len(s))
            ids[i, span] = torch.tensor(s, dtype=torch.long)
            mask[i, span] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            if shared_prefill and width > 1:
                out = _beam_generate(model, pixel, ids, mask, gen_kw)
            else:
                out = model.generate(pixel_values=pixel, input_ids=ids, attention_mask=mask, **gen_kw)
        if decoder_only and out.shape[1] >= width and torch.equal(out[:, :width], ids):
            out = out[:, width:]  # the LM returns the prompt followed by the new tokens
        for i, row in zip(chunk, out):
            answers[i] = tok.decode(row.tolist(), skip_special_tokens=True).strip()
    return answers  # type: ignore[return-value]


def _lm_inputs_embeds(model, pixel: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The LM's input embeddings exactly as ``Blip2ForConditionalGeneration.generate`` builds them: the prompt's
    token embeddings with the image-token slots replaced by the projected Q-Former outputs."""
    image = model.vision_model(pixel, return_dict=True).last_hidden_state
    image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
    query = model.qformer(query_embeds=model.query_tokens.expand(image.shape[0], -1, -1),
                          encoder_hidden_states=image, encoder_attention_mask=image_mask,
                          return_dict=True).last_hidden_state
    if query.dtype != image.dtype:
        query = query.to(image.dtype)
    visual = model.language_projection(query)
    embeds = model.get_input_embeddings()(ids)
    slots = (ids == model.config.image_token_index).unsqueeze(-1).to(embeds.device)
    return embeds.masked_scatter(slots, visual.to(embeds.device, embeds.dtype))


def _beam_generate(model, pixel: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                   gen_kw: Mapping[str, Any]) -> torch.Tensor:
    """Beam search on a decoder-only LM (``gen_kw["num_beams"]`` beams) with the prompt run once per question.

    ``generate`` repeats every input ``num_beams`` times before its first forward, so the whole prompt (query
    tokens included) goes through the LM once per beam. Here all but the prompt's last position go through once,
    with the position ids ``generate`` would give (``cumsum(mask) - 1``, 0 on padding); the key/value cache is
    repeated ``num_beams`` times (``Cache.batch_repeat_interleave``: question-major, as ``generate`` expands) and
    handed to ``language_model.generate`` with the full ``inputs_embeds``, ``input_ids`` and mask, the call
    ``Blip2ForConditionalGeneration.generate`` makes: it runs only the uncached last position, then searches as
    usual. The same search, on the same numbers up to float rounding of the split prefill."""
    from transformers.cache_utils import DynamicCache

    lm = model.language_model
    embeds = _lm_inputs_embeds(model, pixel, ids)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=lm.config.get_text_config(decoder=True))
    kw = _cache_kwarg(lm)
    lm(inputs_embeds=embeds[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True,
       **{kw: cache}, **_keep_last_logits(lm))
    cache.batch_repeat_interleave(int(gen_kw["num_beams"]))
    return lm.generate(inputs_embeds=embeds, input_ids=ids, attention_mask=mask, **{kw: cache}, **gen_kw)


VQA_INFERENCE = ("generate", "rank")
VQA_TASKS = ("vqav2", "okvqa", "gqa")


def _stop_token(text_cfg) -> int | None:
    """The token ``generate_answers`` stops on (``text_config.eos_token_id``; the first one of a list)."""
    eos = getattr(text_cfg, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


def _candidate_ids(tokenizer, prompt: str, candidate: str, *, decoder_only: bool, eos: int | None) -> list[int]:
    """A candidate as the answer tokens the generator would have to produce: its tokens (no special tokens;
    after a prompt that does not end in white space a decoder-only LM's answer starts with a space, as
    generation writes it) followed by the stop token."""
    text = str(candidate).strip()
    if decoder_only and prompt and not prompt[-1].isspace():
        text = " " + text
    ids = tokenizer.encode(text, add_special_tokens=False)
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    return ids + ([eos] if eos is not None else [])


def _cache_kwarg(lm) -> str:
    """The name under which the LM's forward takes a key/value cache (``cache`` since transformers 5.x,
    ``past_key_values`` before)."""
    import inspect

    try:
        params = inspect.signature(lm.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def _keep_last_logits(lm) -> dict[str, int]:
    """``{"logits_to_keep": 1}`` where the LM's forward takes it (the vocabulary head on the last position only)."""
    import inspect

    try:
        params = inspect.signature(lm.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        params = {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _output_cache(outputs):
    cache = getattr(outputs, "cache", None) if "cache" in getattr(outputs, "keys", lambda: ())() else None
    return cache if cache is not None else outputs.past_key_values


def rank_answers(adapter, images: Sequence[Any], prompts: Sequence[str] | str, candidates: Sequence[str], *,
                 batch_size: int = 16, candidate_batch: int = 128,
                 progress: bool | None = None) -> tuple[list[str], np.ndarray]:
    """Rank a fixed answer list by the language model's likelihood (LAVIS's ``inference_method="rank"``).

    For every image/prompt and every candidate, the summed log-probability of the candidate's tokens given
    the image and the prompt; the prediction is the candidate with the highest sum (ties go to the earlier
    candidate). Returns ``(best candidate per question, log-likelihoods of shape (questions, candidates))``,
    the latter float64 on the CPU.

    The input is built as in :func:`generate_answers`: ``num_query_tokens`` copies of
    ``config.image_token_index``, then the tokenised prompt. A candidate is scored as the answer generation
    would have to write: its tokens, then the stop token (``text_config.eos_token_id``), so that an answer
    that is a prefix of another ("1" / "10") gains nothing from being shorter.

    * Flan-T5 (encoder-decoder): query tokens and prompt go to the encoder; the candidate plus EOS is the
      decoder's target, as in BLIP-2's prefix-LM training; the decoder reads the target shifted right after
      ``decoder_start_token_id`` (what T5 builds from ``labels``), and logit ``i`` scores target token ``i``.
    * decoder-only LMs (OPT, LLaMA): query tokens, prompt, then the candidate, with a leading space after a
      prompt that does not end in white space (as generation writes the answer); only the candidate's tokens
      are scored, each by the logits of the position before it.

    Cost: one ``Blip2ForConditionalGeneration.forward`` per group of at most ``batch_size`` questions runs the
    vision encoder and Q-Former once per image, splices the query outputs into the image-token positions
    (``masked_scatter``) and runs the prompt through the LM (the T5 encoder; for a decoder-only LM the prompt
    with its key/value cache, questions grouped by prompt length so that no prompt is padded). The
    candidates then go through the LM alone, the T5 encoder states / the prompt's cache repeated per
    candidate, about ``candidate_batch`` (question, candidate) rows at a time (at least one candidate per
    question of the group; candidates right-padded). Memory grows with ``candidate_batch`` x prompt length
    (the repeated cache) and x candidate length x vocabulary (the logits). All in the model's dtype under
    ``torch.inference_mode()``; log-softmax in float32.

    LAVIS (salesforce/LAVIS @506965b, ``lavis/models/blip_models/blip_vqa.py``; the same lines in ECoFLaP's
    copy, ``LAVIS/lavis/models/blip_models/blip_vqa.py`` @59dac0a): ``predict_answers`` (L162-235;
    ``inference_method="rank"`` by default, L166; ``num_ans_candidates=128``, L169, capped at the list's
    length, L231) calls ``_rank_answers`` (L277-354), which keeps the ``num_ans_candidates`` candidates
    whose *first token* is most probable after BOS (L299-317), re-scores only those with the decoder's
    per-sequence loss (L336-347) and returns the lowest-loss one (L349-352). That loss is label-smoothed
    (``CrossEntropyLoss(reduction=..., label_smoothing=0.1)``, summed per sequence: ``lavis/models/med.py``
    L1238-1244), so LAVIS's score is not exactly a log-likelihood. Here every candidate is scored in full and
    without smoothing. That is exact (LAVIS's first-token filter can drop the best candidate: candidates that
    share a first token tie on it and the top-k cuts among them arbitrarily) and affordable for the short
    lists used here; with a list of thousands (VQAv2's 3,128) it costs one LM row per candidate and question.
    LAVIS's BLIP-2 models do not rank at all: ``lavis/models/blip2_models/blip2_t5.py`` ``predict_answers``
    (L247-312) and ``blip2_opt.py`` ``predict_answers`` (L282-354) take ``inference_method``,
    ``num_ans_candidates`` and ``answer_list`` (L251-255, L286-290) but never read them, and always generate
    (``t5_model.generate`` L296, ``opt_model.generate`` L337).
    """
    _check_positive(batch_size, "batch_size")
    _check_positive(candidate_batch, "candidate_batch")
    images, prompts = _paired_prompts(images, prompts)
    candidates = [str(c) for c in candidates]
    if not candidates:
        raise UserError("the answer list is empty: give at least one candidate answer to rank")
    blank = [i for i, c in enumerate(candidates) if not c.strip()]
    if blank:
        raise UserError(f"candidate answer {blank[0]} is empty: drop empty lines from the answer list")
    if not images:
        return [], np.zeros((0, len(candidates)), dtype=np.float64)
    inp = _Blip2Inputs.of(adapter)
    model, tok, pad, decoder_only, device = adapter.model, inp.tokenizer, inp.pad, inp.decoder_only, inp.device
    eos = _stop_token(inp.text_cfg)
    start = getattr(inp.text_cfg, "decoder_start_token_id", None)
    start = int(start if start is not None else pad)
    lm = model.language_model
    from transformers.modeling_outputs import BaseModelOutput

    n_cand = len(candidates)
    scores = np.empty((len(images), n_cand), dtype=np.float64)
    prefixes = [inp.prefix(p) for p in prompts]
    cand_cache: dict[bool, list[list[int]]] = {}  # the ids depend on the prompt only through its last character

    def cand_ids(prompt: str) -> list[list[int]]:
        spaced = bool(decoder_only and prompt and not prompt[-1].isspace())
        if spaced not in cand_cache:
            cand_cache[spaced] = [_candidate_ids(tok, prompt, c, decoder_only=decoder_only, eos=eos)
                                  for c in candidates]
            for c, ids in zip(candidates, cand_cache[spaced]):
                if not ids:  # pragma: no cover - a tokenizer that drops the text, and an LM without EOS
                    raise UserError(f"candidate answer {c!r} has no tokens: drop it from the answer list")
        return cand_cache[spaced]

    # question groups: at most batch_size each; for a decoder-only LM, prompts of one length only (no padding)
    order = sorted(range(len(images)), key=lambda i: len(prefixes[i])) if decoder_only else list(range(len(images)))
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < batch_size and (not decoder_only or
                                                        len(prefixes[groups[-1][0]]) == len(prefixes[i])):
            groups[-1].append(i)
        else:
            groups.append([i])

    def token_sum(logp_rows: torch.Tensor, ids: Sequence[int]) -> float:
        lp = torch.log_softmax(logp_rows.float(), dim=-1)
        return float(lp.gather(1, torch.as_tensor(list(ids), device=lp.device)[:, None]).sum())

    with torch.inference_mode():
        for group in tqdm(groups, desc="rank", disable=_disable(progress), leave=False):
            g = len(group)
            pixel = image_batch(adapter, [images[i] for i in group])
            ids, mask = _right_pad([prefixes[i] for i in group], pad)
            ids, mask = ids.to(device), mask.to(device)
            if decoder_only:
                out = model(pixel_values=pixel, input_ids=ids, attention_mask=mask, use_cache=True)
                cache = _output_cache(out.language_model_outputs)
                first = out.logits[:, -1]  # predicts each candidate's first token
            else:
                dec0 = torch.full((g, 1), start, dtype=torch.long, device=device)
                out = model(pixel_values=pixel, input_ids=ids, attention_mask=mask, decoder_input_ids=dec0,
                            use_cache=False)
                enc = out.language_model_outputs.encoder_last_hidden_state
            per = max(1, candidate_batch // g)  # candidates per LM pass: g x per rows
            for c0 in range(0, n_cand, per):
                cs = list(range(c0, min(n_cand, c0 + per)))
                k = len(cs)
                targets = [cand_ids(prompts[q])[j] for q in group for j in cs]  # row = question-major
                if decoder_only:
                    for r, t in enumerate(targets):
                        scores[group[r // k], cs[r % k]] = token_sum(first[r // k : r // k + 1], t[:1])
                    rest = [t[:-1] for t in targets]  # inputs: every target token but the last
                    if max(len(x) for x in rest) == 0:
                        continue
                    cin, cmask = _right_pad([x if x else [pad] for x in rest], pad)
                    for r, x in enumerate(rest):
                        cmask[r, len(x):] = 0
                    past = copy.deepcopy(cache)
                    past.batch_repeat_interleave(k)
                    full_mask = torch.cat([mask.repeat_interleave(k, dim=0), cmask.to(device)], dim=1)
                    logits = lm(input_ids=cin.to(device), attention_mask=full_mask, use_cache=True,
                                **{_cache_kwarg(lm): past}).logits
                    for r, t in enumerate(targets):
                        if len(t) > 1:  # logit i (after target token i) scores target token i + 1
                            scores[group[r // k], cs[r % k]] += token_sum(logits[r, : len(t) - 1], t[1:])
                else:
                    din, dmask = _right_pad([[start] + t[:-1] for t in targets], pad)
                    logits = lm(encoder_outputs=BaseModelOutput(last_hidden_state=enc.repeat_interleave(k, dim=0)),
                                attention_mask=mask.repeat_interleave(k, dim=0), decoder_input_ids=din.to(device),
                                decoder_attention_mask=dmask.to(device), use_cache=False).logits
                    for r, t in enumerate(targets):
                        scores[group[r // k], cs[r % k]] = token_sum(logits[r, : len(t)], t)
    best = scores.argmax(axis=1)
    return [candidates[int(b)] for b in best], scores


def _right_pad(seqs: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def score_vqa(predictions: Sequence[str], answers: Sequence[Any], *, metric: str = "vqa") -> float:
    """VQA accuracy in percent: ``metric="vqa"`` is the VQAv2 soft accuracy over the 10 human answers
    (official VQA eval); ``"exact_match"`` is GQA's exact match against one answer."""
    if len(predictions) != len(answers):
        raise UserError(f"{len(predictions)} predictions but {len(answers)} answer entries: predictions and "
                        "references must have the same length (one prediction per question)")
    if not predictions:
        raise UserError("no questions to score")
    if metric == "vqa":
        return M.vqa_accuracy(list(predictions), [list(a) for a in answers])
    if metric == "exact_match":
        return M.exact_match_accuracy(list(predictions), [str(a) for a in answers])
    raise UserError(f"unknown VQA metric {metric!r}: use 'vqa' or 'exact_match'")


def vqa_item_scores(predictions: Sequence[str], answers: Sequence[Any], *, metric: str = "vqa") -> np.ndarray:
    """Per question, in percent: 100 x ``metrics.vqa_score`` (``metric="vqa"``) or 100 x exact match after
    ``metrics.normalize_vqa_answer`` (``"exact_match"``, GQA); their mean is :func:`score_vqa`."""
    if metric == "vqa":
        return np.array([100.0 * M.vqa_score(p, list(a)) for p, a in zip(predictions, answers)], dtype=np.float64)
    if metric == "exact_match":
        return np.array([100.0 * (M.normalize_vqa_answer(p) == M.normalize_vqa_answer(str(a)))
                         for p, a in zip(predictions, answers)], dtype=np.float64)
    raise UserError(f"unknown VQA metric {metric!r}: use 'vqa' or 'exact_match'")


def _check_inference(inference: str) -> None:
    if inference not in VQA_INFERENCE:
        raise UserError(f"unknown VQA inference {inference!r}: use 'generate' (free-form answers) or 'rank' "
                        "(pick the likeliest answer of an answer list)")


def rows_answer_list(rows: Sequence[Mapping[str, Any]], key: str = "answers") -> list[str]:
    """The distinct reference answers of VQA rows (``answers`` lists, or GQA's ``answer``), stripped, sorted."""
    found: set[str] = set()
    for r in rows:
        refs = r.get(key)
        for a in ([refs] if isinstance(refs, str) else list(refs or [])):
            if str(a).strip():
                found.add(str(a).strip())
    return sorted(found)


def vqa(adapter, questions: Sequence[Mapping[str, Any]], *, prompt: str = VQA_PROMPT, max_new_tokens: int = 10,
        min_new_tokens: int = 1, num_beams: int = 5, length_penalty: float = -1.0,
        batch_size: int | None = None,
        limit: int | None = None, metric: str | None = None, inference: str = "generate",
        answer_list: Sequence[str] | None = None, min_length: int | None = None,
        progress: bool | None = None) -> dict[str, Any]:
    """Zero-shot VQA with BLIP-2 (ECoFLaP Table 1; LAVIS's VQAv2/OK-VQA/GQA zero-shot settings:
    prompt ``"Question: {} Short answer:"``, beam 5, at most 10 tokens, length penalty -1).

    ``questions``: rows ``{"image", "question", "answers": [...]}`` (VQAv2/OK-VQA, scored with the VQA
    soft accuracy) or ``{"image", "question", "answer": str}`` (GQA, exact match). Returns
    ``vqa_accuracy`` (percent), ``n``, ``intervals`` (of ``vqa_accuracy``, over questions), the
    ``predictions`` and ``inference``.

    ``inference="generate"`` (the paper's and LAVIS's BLIP-2 setting) generates free-form answers;
    ``"rank"`` predicts, per question, the candidate of ``answer_list`` with the highest likelihood
    (:func:`rank_answers`, LAVIS's BLIP VQA ``inference_method="rank"``; the generation settings are then
    unused). Without ``answer_list`` the candidates are the distinct reference answers of the evaluated rows
    (:func:`rows_answer_list`), which makes the task a closed-set choice among answers that occur. With
    rank the result also holds ``answer_list``: which list was used.

    Length: by default at least ``min_new_tokens=1`` new token (an empty answer is never generated);
    ``min_length`` replaces it with transformers' ``min_length`` as the official code passes it
    (:func:`generate_answers`; LAVIS's ``min_len 1``, which on Flan-T5 imposes nothing). Generated results hold
    ``generation``: the settings used.

    Speed: ``batch_size`` questions per ``generate`` (or rank) call, by default :func:`generate_batch` (rank:
    :data:`GENERATE_BATCH`); the
    answers are those of ``batch_size=1``. Greedy decoding (``num_beams=1``) costs about a fifth of beam 5 on
    the bundled mini-blip2 (bench/results/eval_throughput.md).
    """
    _check_positive(limit, "limit")
    _check_inference(inference)
    if answer_list is not None and inference != "rank":
        raise UserError("an answer list is only used by rank inference: pass inference='rank' "
                        "(--vqa-inference rank) or drop the answer list")
    if "{}" not in prompt:
        raise UserError(f"VQA prompt {prompt!r} has no '{{}}' where the question goes")
    rows = formats.check_rows(questions, ("image", "question"), "VQA",
                              "{'image': ..., 'question': str, 'answers': [str, ...]}")
    rows = rows[:limit] if limit is not None else rows
    if metric is None:
        metric = "vqa" if all("answers" in r for r in rows) else "exact_match"
    key = "answers" if metric == "vqa" else "answer"
    for i, r in enumerate(rows):
        if key not in r:
            raise UserError(f"VQA row {i} has no {key!r} field: VQAv2/OK-VQA rows need 'answers' (a list), "
                            "GQA rows need 'answer' (a string)")
    images, prompts = [r["image"] for r in rows], [prompt.format(r["question"]) for r in rows]
    extra: dict[str, Any] = {"inference": inference}
    if inference == "rank":
        if answer_list is None:
            cands = rows_answer_list(rows, key)
            extra["answer_list"] = f"from the evaluated rows ({len(cands)} answers)"
        else:
            if isinstance(answer_list, (str, os.PathLike)):
                raise UserError("answer_list must be a list of answers, not a path: read the file first "
                                "(formats.read_lines) or pass it to evaluate()/--answer-list")
            cands = [str(a) for a in answer_list]
            extra["answer_list"] = f"given ({len(cands)} answers)"
        if not cands:
            raise UserError("the answer list for rank inference is empty: give --answer-list FILE with one answer "
                            "per line, or rows whose reference answers are not empty")
        preds, _ = rank_answers(adapter, images, prompts, cands,
                                batch_size=GENERATE_BATCH if batch_size is None else batch_size, progress=progress)
    else:
        if min_length is not None:
            min_new_tokens = 0
        preds = generate_answers(adapter, images, prompts, max_new_tokens=max_new_tokens,
                                 min_new_tokens=min_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                                 batch_size=batch_size, min_length=min_length, progress=progress)
        extra["generation"] = _generation(prompt, num_beams, max_new_tokens, min_new_tokens, min_length,
                                          length_penalty)
    refs = [r[key] for r in rows]
    acc = score_vqa(preds, refs, metric=metric)
    return {"vqa_accuracy": acc, "n": len(rows),
            "intervals": item_interval(vqa_item_scores(preds, refs, metric=metric), acc, "vqa_accuracy"),
            "predictions": [{"question_id": r.get("question_id", i), "question": r["question"], "prediction": p,
                             key: r[key]} for i, (r, p) in enumerate(zip(rows, preds))], **extra}


def score_captions(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """CIDEr-D (Vedantam et al. 2015) and BLEU-4 (Papineni et al. 2002), both x100 as in the paper tables,
    on PTB-like tokenised, lower-cased text (``metrics.simple_tokenize``, as pycocoevalcap tokenises)."""
    if len(predictions) != len(references):
        raise UserError(f"{len(predictions)} predictions but {len(references)} reference lists: predictions and "
                        "references must have the same length (one caption per image)")
    if not predictions:
        raise UserError("no captions to score")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise UserError(f"references[{i}] must be a non-empty list of captions")
    cands, refs = _tokenized(predictions, references)
    return {"cider": 100.0 * M.cider_d(cands, refs), "bleu4": 100.0 * M.bleu(cands, refs, n=4)[3]}


def _tokenized(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list, list]:
    return [M.simple_tokenize(p) for p in predictions], [[M.simple_tokenize(r) for r in rs] for rs in references]


def caption_item_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
    """Per image CIDEr-D x100 (``metrics.cider_d_per_image``, document frequencies over the whole set);
    corpus CIDEr-D is their mean. The item scores behind the ``cider`` interval (the image is the unit;
    the idf weights stay those of the whole set on every resample)."""
    cands, refs = _tokenized(predictions, references)
    return 100.0 * np.asarray(M.cider_d_per_image(cands, refs), dtype=np.float64)


def caption(adapter, dataset: Any, *, prompt: str | None = None, max_new_tokens: int = 30, min_new_tokens: int = 8,
            num_beams: int = 5, batch_size: int | None = None, limit: int | None = None,
            image_root: str | os.PathLike | None = None, split: str | None = "test",
            min_length: int | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Image captioning with BLIP-2 (ECoFLaP Table 1, NoCaps/COCO; LAVIS's settings: prompt
    ``"a photo of"``, beam 5, 8 to 30 new tokens). The prompt is not part of the scored caption.
    ``prompt=None`` takes a row's own ``"prompt"``, else ``adapter.caption_prompt``, else ``"a photo of"``;
    ``""`` means no prompt. ``min_length`` replaces ``min_new_tokens`` with transformers' ``min_length`` as the
    official code passes it (LAVIS's NoCaps ``min_len 8``: 7 new tokens on Flan-T5; :func:`generate_answers`).

    ``dataset``: a COCO captions / NoCaps JSON, a Karpathy-style JSON, or rows ``{"image", "references"}``.
    Returns ``cider``, ``bleu4`` (x100), ``n``, ``intervals`` (of ``cider``, over images), the ``predictions``
    and ``generation`` (the settings used).
    """
    _check_positive(limit, "limit")
    if isinstance(dataset, (str, os.PathLike)):
        rows = formats.read_captions(dataset, image_root=image_root, split=split)
    else:
        rows = formats.check_rows(dataset, ("image", "references"), "caption",
                                  "{'image': ..., 'references': [str, ...]}")
    rows = rows[:limit] if limit is not None else rows
    default = getattr(adapter, "caption_prompt", None) or CAPTION_PROMPT
    prompts = [prompt if prompt is not None else r.get("prompt", default) for r in rows]
    if min_length is not None:
        min_new_tokens = 0
    preds = generate_answers(adapter, [r["image"] for r in rows], prompts, max_new_tokens=max_new_tokens,
                             min_new_tokens=min_new_tokens, num_beams=num_beams, batch_size=batch_size,
                             min_length=min_length, progress=progress)
    refs = [r["references"] for r in rows]
    out: dict[str, Any] = score_captions(preds, refs)
    out["n"] = len(rows)
    out["intervals"] = item_interval(caption_item_scores(preds, refs), out["cider"], "cider")
    out["predictions"] = [{"image_id": r.get("image_id", i), "caption": p} for i, (r, p) in enumerate(zip(rows, preds))]
    out["generation"] = _generation(prompt if prompt is not None else default, num_beams, max_new_tokens,
                                    min_new_tokens, min_length, None)
    return out


def _generation(prompt, num_beams, max_new_tokens, min_new_tokens, min_length, length_penalty) -> dict[str, Any]:
    """The generation settings a result records (``min_length``: transformers' count, as the official code)."""
    g: dict[str, Any] = {"prompt": prompt, "num_beams": num_beams, "max_new_tokens": max_new_tokens}
    g.update({"min_length": min_length} if min_length is not None else {"min_new_tokens": min_new_tokens})
    if length_penalty is not None and num_beams > 1:
        g["length_penalty"] = length_penalty
    return g


# --------------------------------------------------------------------------- perplexity
def model_context(adapter) -> int | None:
    """The longest sequence the LM's position embeddings cover (``max_position_embeddings``), if known."""
    cfg = getattr(adapter.model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if n else None


def _encode_text(adapter, text: str) -> list[int]:
    tok = getattr(adapter, "tokenizer", None)
    if tok is None or not hasattr(tok, "encode"):
        raise UserError(f"{adapter.name} has no tokenizer with .encode: load it from a folder with tokenizer files")
    ids = tok.encode(text)
    return list(ids.tolist() if hasattr(ids, "tolist") else ids)


def perplexity_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """``(begin, n_scored)`` of each full window: windows start every ``stride`` tokens; the first scores
    all but its first token, later ones only their last ``stride`` (new) tokens. A trailing partial
    window is dropped (SparseGPT/Wanda use ``n_tokens // window`` windows)."""
    out = []
    for k, begin in enumerate(range(0, n_tokens - window + 1, stride)):
        out.append((begin, window - 1 if k == 0 else min(stride, window - 1)))
    return out


def perplexity_stats(adapter, text: str, *, window: int = 512, stride: int | None = None, limit: int | None = None,
                     batch_size: int = 1, progress: bool | None = None) -> dict[str, Any]:
    """Total NLL, scored tokens and windows behind :func:`perplexity` (same arguments), the per-window
    ``window_nll`` / ``window_tokens``, and ``intervals``: ``{"perplexity": [low, high]}``, a bootstrap with
    windows resampled as units (``intervals.perplexity_ci``; none with a single window)."""
    _check_positive(window, "window")
    _check_positive(batch_size, "batch_size")
    _check_positive(limit, "limit")
    stride = window if stride is None else stride
    if window < 2:
        raise UserError(f"window must be at least 2 tokens, got {window}")
    if not isinstance(stride, (int, np.integer)) or not 1 <= stride <= window:
        raise UserError(f"stride must be between 1 and the window ({window}), got {stride!r}")
    ctx = model_context(adapter)
    if ctx is not None and window > ctx:
        raise UserError(f"window {window} is longer than {adapter.name}'s context of {ctx} tokens: "
                        f"pass --window {ctx} or less")
    if not isinstance(text, str) or not text:
        raise UserError("perplexity needs non-empty text")
    ids = torch.tensor(_encode_text(adapter, text), dtype=torch.long)
    spans = perplexity_windows(len(ids), window, stride)
    if not spans:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one window of {window}: "
                        "use a smaller --window or a longer text")
    spans = spans[:limit] if limit is not None else spans
    device = adapter.input_device()
    window_nll: list[float] = []
    window_tokens: list[int] = []
    with torch.inference_mode():
        for chunk in tqdm(list(_chunks(spans, batch_size)), desc="perplexity", disable=_disable(progress),
                          leave=False):
            inp = torch.stack([ids[b : b + window] for b, _ in chunk]).to(device)
            target = inp[:, 1:].clone()
            for row, (_, n_scored) in enumerate(chunk):
                target[row, : window - 1 - n_scored] = -100  # context tokens, already scored in an earlier window
            logits = adapter.model(input_ids=inp, use_cache=False).logits[:, :-1]
            nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                  ignore_index=-100, reduction="none").reshape(target.shape)
            window_nll += nll.double().sum(dim=1).tolist()
            window_tokens += (target != -100).sum(dim=1).tolist()
    total_nll, total_tokens = float(np.sum(window_nll)), int(np.sum(window_tokens))
    intervals = ({"perplexity": list(I.perplexity_ci(window_nll, window_tokens))}
                 if len(spans) >= I.MIN_ITEMS else {})
    return {"nll": total_nll, "tokens": total_tokens, "windows": len(spans), "window": window, "stride": stride,
            "perplexity": math.exp(total_nll / total_tokens), "window_nll": window_nll,
            "window_tokens": window_tokens, "intervals": intervals}


def perplexity(adapter, text: str, *, window: int = 512, stride: int | None = None, limit: int | None = None,
               batch_size: int = 1, progress: bool | None = None) -> float:
    """Perplexity of a causal LM on ``text`` (WikiText-2 protocol of SparseGPT/Wanda, ECoFLaP Table 5).

    The text is tokenised once; windows of ``window`` tokens start every ``stride`` tokens (default
    ``stride=window``: non-overlapping); with a smaller stride only the tokens new to a window are
    scored (sliding-window evaluation). ``limit`` caps the number of windows.
    perplexity = exp(total NLL / total scored tokens).
    """
    return perplexity_stats(adapter, text, window=window, stride=stride, limit=limit, batch_size=batch_size,
                            progress=progress)["perplexity"]


def perplexity_file(adapter, path: str | os.PathLike, *, window: int = 512, stride: int | None = None,
                    limit: int | None = None, batch_size: int = 1, progress: bool | None = None) -> float:
    """:func:`perplexity` of a raw text file (e.g. ``wikitext-2-raw/wiki.test.raw``)."""
    return perplexity(adapter, formats.read_text(path), window=window, stride=stride, limit=limit,
                      batch_size=batch_size, progress=progress)


# --------------------------------------------------------------------------- dispatcher
def supported_tasks(adapter) -> tuple[str, ...]:
    """The tasks this model family can be evaluated on (CLIP: zeroshot, retrieval; BLIP-2: VQA and
    captioning; causal LMs: perplexity). Unknown families are recognised by their methods."""
    fam = getattr(adapter, "family", None)
    if fam in FAMILY_TASKS:
        return FAMILY_TASKS[fam]
    if all(hasattr(adapter, a) for a in ("encode_image", "encode_text")):
        return FAMILY_TASKS["clip"]
    if hasattr(adapter, "num_query_tokens"):
        return FAMILY_TASKS["blip2"]
    if getattr(adapter, "tokenizer", None) is not None and hasattr(adapter.model, "generate"):
        return FAMILY_TASKS["causal_lm"]
    return ()


def _family_name(adapter) -> str:
    fam = getattr(adapter, "family", None)
    return FAMILY_NAMES.get(fam, f"{fam or 'unknown'}-family")


def resolve_task(adapter, task: str | None) -> str:
    """``task``, or the adapter's ``default_task`` when None; UserError when the model cannot do it."""
    tasks = supported_tasks(adapter)
    if task is None:
        task = getattr(adapter, "default_task", None)
        if task is None and len(tasks) == 1:
            task = tasks[0]
        if task is None:
            raise UserError(f"pass --task: {adapter.name} ({_family_name(adapter)}) supports "
                            f"{', '.join(tasks) or 'no evaluation task'}")
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task not in tasks:
        raise UserError(f"task {task!r} needs a {FAMILY_NAMES[TASK_NEEDS[task]]} model, but {adapter.name} is a "
                        f"{_family_name(adapter)} model, which supports: {', '.join(tasks) or 'no evaluation task'}")
    return task


def _bundled(adapter, task: str) -> Any:
    fn = getattr(adapter, "bundled_eval_data", None)
    if fn is None:
        raise UserError(f"task {task!r} needs --data: {adapter.name} has no bundled evaluation set "
                        "(see data/BENCHMARKS.md for the layouts)")
    try:
        data = fn(task)
    except UserError:
        raise
    except (KeyError, NotImplementedError, ValueError) as e:
        raise UserError(f"{adapter.name} has no bundled set for task {task!r} ({e}): pass --data") from None
    if data is None:
        raise UserError(f"{adapter.name} has no bundled set for task {task!r}: pass --data")
    return data


def _as_list(value: Any, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return formats.read_lines(value, what)
    return [str(v) for v in value]


def _check_data_path(data: Any, task: str) -> None:
    folder = coop.coop_path(data)
    if folder is not None:
        if task != "zeroshot":
            raise UserError(f"--data {data} is a CoOp classification dataset: it serves --task zeroshot, not {task}")
        return  # read_coop names the missing folder or file and the DATASETS.md step
    if isinstance(data, (str, os.PathLike)) and not Path(data).exists():
        raise UserError(f"--data {data} does not exist: give the path of the {task} data (see data/BENCHMARKS.md)")


def _paper_eval(task: str, data: Any, given: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The paper preset for an evaluation, checked against the explicitly given settings (the protocol rule)."""
    from . import protocol as P

    ds = coop.read_coop(data) if coop.is_coop(data) else None
    dataset = ds.name if ds is not None and ds.spec.section is not None else None  # one of CoOp's datasets
    preset, notes = P.paper_eval_settings(task, dataset=dataset)
    P.check_agreement(preset, given, family=None, target=None,
                      scope=f"{task} on {dataset}" if dataset else task)
    return preset, notes


def evaluate(adapter, task: str | None = None, data: Any = None, *, limit: int | None = None,
             batch_size: int | None = None, classnames: Any = None, templates: Any = None,
             annotations: str | os.PathLike | None = None, image_root: str | os.PathLike | None = None,
             split: str | None = "test", prompt: str | None = None, max_new_tokens: int | None = None,
             num_beams: int | None = None, window: int | None = None, stride: int | None = None,
             vqa_inference: str = "generate", answer_list: Any = None, protocol: str | None = None,
             progress: bool | None = None) -> dict[str, Any]:
    """Evaluate ``adapter`` on ``task`` (zeroshot, retrieval, vqav2, okvqa, gqa, caption, perplexity).

    ``data`` is a path in the task's standard format (data/BENCHMARKS.md), an in-memory set, or None
    for the model's bundled held-out set (``adapter.bundled_eval_data(task)``); zero-shot also reads one of
    CoOp's datasets (``"coop:/data/oxford_pets"``, its ``split``: test by default). ``classnames`` and
    ``templates`` are lists or files (one per line); ``templates`` may also name a set, ``"coop"`` or
    ``"ensemble"`` (:func:`resolve_templates`). ``window`` defaults to min(512, model context).
    VQA tasks take ``vqa_inference`` (``"generate"``, or ``"rank"``: :func:`vqa`) and, for rank,
    ``answer_list`` (a list or a file: one answer per line, or a JSON list; default: the evaluated rows' answers).
    ``batch_size``: images per forward for CLIP tasks (default 64), questions or images per ``generate`` call for
    BLIP-2 (default :func:`generate_batch`; the answers do not depend on it), windows for perplexity (default 1).
    Returns the task's metrics, ``intervals`` (``{headline metric: [low, high]}``, 95 % bootstrap over the
    evaluated items; see the module docstring) and ``predictions`` / ``clip_benchmark`` where there are some.

    ``protocol="paper"`` applies :func:`ecoflap_utils.protocol.paper_eval_settings` (zero-shot: the CoOp
    dataset's single template; VQA and captions: LAVIS's prompt, beams, lengths and transformers' ``min_length``;
    perplexity: 2048-token windows); an explicit setting that contradicts it is refused, as in ``prune``. The
    result then holds ``protocol`` and ``protocol_notes``.
    """
    from . import protocol as P

    protocol = P.check_protocol(protocol)
    task = resolve_task(adapter, task)
    _check_positive(limit, "limit")
    _check_positive(batch_size, "batch_size")
    _check_inference(vqa_inference)
    if task not in VQA_TASKS and (vqa_inference != "generate" or answer_list is not None):
        raise UserError(f"--vqa-inference rank and --answer-list apply to the VQA tasks ({', '.join(VQA_TASKS)}), "
                        f"not to {task!r}: drop them")
    _check_data_path(data, task)
    bundled = data is None
    if bundled:
        data = _bundled(adapter, task)
    coop_data = coop.read_coop(data) if coop.is_coop(data) else None
    classnames = _as_list(classnames, "class names")
    template_set = None
    if isinstance(templates, str) and templates in TEMPLATE_SETS:
        templates, template_set = resolve_templates(templates, coop_data)
    templates = _as_list(templates, "templates")
    answer_list = _as_list(answer_list, "answer list")
    preset: dict[str, Any] = {}
    notes: list[str] = []
    if protocol is not None:
        preset, notes = _paper_eval(task, coop_data if coop_data is not None else data,
                                    {"templates": templates, "prompt": prompt, "num_beams": num_beams,
                                     "max_new_tokens": max_new_tokens, "window": window, "stride": stride})
    proto = {"protocol": protocol, "protocol_notes": notes} if protocol is not None else {}
    if task == "zeroshot":
        if isinstance(data, Mapping):
            classnames = classnames or data.get("classnames")
            if templates is None and data.get("templates") is not None:
                templates, template_set = list(data["templates"]), "bundled"
        if "templates" in preset:
            templates, template_set = preset["templates"], "coop" if coop_data is not None else "coop-generic"
        res = zeroshot_classification(adapter, coop_data if coop_data is not None else data, classnames=classnames,
                                      templates=templates, batch_size=batch_size or 64, limit=limit,
                                      dataset_name="bundled" if bundled else None, split=split or "test",
                                      template_set=template_set, progress=progress)
        return {**res, **proto}
    if task == "retrieval":
        return {**retrieval(adapter, data, batch_size=batch_size or 64, limit=limit, split=split,
                            image_root=image_root, progress=progress), **proto}
    gen = dict(batch_size=batch_size, limit=limit, progress=progress)
    for key in ("max_new_tokens", "num_beams", "min_length", "length_penalty"):
        if key in preset:
            gen[key] = preset[key]
    prompt = preset.get("prompt", prompt)
    if max_new_tokens is not None:
        gen["max_new_tokens"] = max_new_tokens
    if num_beams is not None:
        gen["num_beams"] = num_beams
    if task in ("vqav2", "okvqa", "gqa"):
        if isinstance(data, (str, os.PathLike)):
            if task == "gqa":
                q, _ = formats.find_vqa_files(data, annotations, need_annotations=False)
                data = formats.read_gqa(q, image_root=image_root)
            else:
                q, a = formats.find_vqa_files(data, annotations)
                data = formats.read_vqa(q, a, image_root=image_root)
        return {**vqa(adapter, data, prompt=prompt or VQA_PROMPT, metric="exact_match" if task == "gqa" else "vqa",
                      inference=vqa_inference, answer_list=answer_list, **gen), **proto}
    if task == "caption":
        return {**caption(adapter, data, prompt=prompt, image_root=image_root, split=split, **gen), **proto}
    # perplexity
    # a bundled set gives the held-out text itself as a str (a Path is read as a file)
    is_text = isinstance(data, str) and bundled
    text = formats.read_text(data) if isinstance(data, (str, os.PathLike)) and not is_text else data
    if not isinstance(text, str):
        raise UserError(f"perplexity needs text (a file path or a str), got {type(text).__name__}")
    ctx = model_context(adapter)
    window = window or preset.get("window") or min(512, ctx or 512)
    stride = stride or preset.get("stride")
    stats = perplexity_stats(adapter, text, window=window, stride=stride, limit=limit,
                             batch_size=batch_size or 1, progress=progress)
    return {"perplexity": stats["perplexity"], "tokens": stats["tokens"], "windows": stats["windows"],
            "window": stats["window"], "stride": stats["stride"], "intervals": stats["intervals"], **proto}


# --------------------------------------------------------------------------- results
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def split_metrics(result: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """(numbers, everything else) of a task result: metrics go to results.json's ``metrics``, the rest
    (``intervals``, ``predictions``, ...) to its own key or a side file."""
    nums = {k: (float(v) if isinstance(v, (float, np.floating)) else int(v))
            for k, v in result.items() if _is_number(v)}
    return nums, {k: v for k, v in result.items() if k not in nums}


def clean_intervals(intervals: Mapping[str, Any] | None, metrics: Mapping[str, Any] | None = None
                    ) -> dict[str, list[float]]:
    """``{metric: [low, high]}`` as plain floats, keeping only well-formed pairs (and, given ``metrics``,
    only the metrics found there)."""
    out: dict[str, list[float]] = {}
    for k, v in (intervals or {}).items():
        try:
            lo, hi = (float(x) for x in v)
        except (TypeError, ValueError):
            continue
        if (metrics is None or k in metrics) and not (math.isnan(lo) or math.isnan(hi)):
            out[str(k)] = [min(lo, hi), max(lo, hi)]
    return out


def results_record(model: str, method: str | None, sparsity: float | None, task: str, metrics: Mapping[str, Any],
                   resources: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None, *,
                   intervals: Mapping[str, Any] | None = None) -> dict:
    """One result in the project schema: ``{"model", "method", "sparsity", "task", "metrics", "resources",
    "config"}``; only numeric metrics are kept (``acc1``, ``vqa_accuracy``, ``cider``, ``perplexity``...).

    With intervals (``intervals=``, or the ``"intervals"`` of an evaluator's result passed as ``metrics``)
    the record also holds ``"intervals": {metric: [low, high]}``; without any, it has no such key."""
    nums, extras = split_metrics(metrics)
    if intervals is None and isinstance(extras.get(I.KEY), Mapping):
        intervals = extras[I.KEY]
    rec: dict[str, Any] = {"model": str(model), "method": method,
                           "sparsity": None if sparsity is None else float(sparsity), "task": task, "metrics": nums}
    iv = clean_intervals(intervals, nums)
    if iv:
        rec[I.KEY] = iv
    rec.update(resources=dict(resources or {}), config=dict(config or {}))
    return rec


def run_evaluate(*, model: str, task: str | None = None, data: str | None = None, out: str | os.PathLike,
                 limit: int | None = None, batch_size: int | None = None, device: str = "cpu",
                 dtype: str = "float32", classnames: str | None = None, templates: str | None = None,
                 annotations: str | None = None, image_root: str | None = None, split: str | None = "test",
                 prompt: str | None = None, max_new_tokens: int | None = None, num_beams: int | None = None,
                 window: int | None = None, stride: int | None = None, vqa_inference: str = "generate",
                 answer_list: str | None = None, protocol: str | None = None, overwrite: bool = False,
                 progress: bool | None = None) -> dict[str, Any]:
    """The ``evaluate`` command: load ``model`` (a name or a pruned run's folder), evaluate, and write
    ``out/results.json`` (plus ``predictions.json`` / ``clip_benchmark.json``) atomically. For VQA tasks the
    record's config holds ``vqa_inference`` and, with rank, ``answer_list`` (the file, or which list was used).
    Zero-shot records name the ``templates`` used and their ``template_set`` (``coop``, ``ensemble``, ``given``,
    ...), and on CoOp data the ``dataset`` and ``split``; generation records hold ``generation``; with
    ``protocol`` the config holds ``protocol`` (and ``protocol_notes``). Bad input is refused before anything
    is written."""
    from .io import atomic_dir, check_out_dir, write_json_atomic
    from .measure import Resources
    from .models import load_model

    if task is not None and task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    _check_positive(limit, "--limit")
    _check_positive(batch_size, "--batch-size")
    if vqa_inference not in VQA_INFERENCE:
        raise UserError(f"unknown --vqa-inference {vqa_inference!r}: use generate or rank")
    if answer_list is not None and vqa_inference != "rank":
        raise UserError("--answer-list is only used with --vqa-inference rank: add it, or drop --answer-list")
    from . import protocol as P

    P.check_protocol(protocol)
    named_templates = templates if templates in TEMPLATE_SETS else None
    for path, flag in ((None if coop.is_coop(data) else data, "--data"), (classnames, "--classnames"),
                       (None if named_templates else templates, "--templates"), (annotations, "--annotations"),
                       (image_root, "--image-root"), (answer_list, "--answer-list")):
        if path is not None and not Path(path).exists():
            raise UserError(f"{flag} {path} does not exist: check the path (see data/BENCHMARKS.md)")
    if coop.is_coop(data):
        coop.read_coop(data).check_images(split or "test")  # a missing split file or image folder fails here
    check_out_dir(out, overwrite)
    res = Resources(device)
    with res.stage("load"):
        adapter = load_model(model, device=device, dtype=dtype)
    task = resolve_task(adapter, task)
    with res.stage("evaluate"):
        result = evaluate(adapter, task, data, limit=limit, batch_size=batch_size, classnames=classnames,
                          templates=templates, annotations=annotations, image_root=image_root, split=split,
                          prompt=prompt, max_new_tokens=max_new_tokens, num_beams=num_beams, window=window,
                          stride=stride, vqa_inference=vqa_inference, answer_list=answer_list, protocol=protocol,
                          progress=progress)
    pcfg = getattr(adapter, "pruning_config", None) or {}
    nums, extras = split_metrics(result)
    config = {"data": str(data) if data is not None else "bundled", "limit": limit, "batch_size": batch_size,
              "device": str(device), "dtype": str(dtype), "split": split}
    for key, val in (("prompt", prompt), ("max_new_tokens", max_new_tokens), ("num_beams", num_beams),
                     ("window", window), ("stride", stride), ("classnames", classnames),
                     ("templates_file", None if named_templates else templates),
                     ("annotations", annotations), ("image_root", image_root)):
        if val is not None:
            config[key] = val
    for key in ("templates", "template_set", "dataset", "split", "generation", "protocol", "protocol_notes"):
        if key in extras:
            config[key] = extras[key]
    config.setdefault("protocol", None)
    if task in VQA_TASKS:
        config["vqa_inference"] = result.get("inference", vqa_inference)
        if config["vqa_inference"] == "rank":
            used = result.get("answer_list")
            config["answer_list"] = f"{answer_list}: {used}" if answer_list is not None else used
    if pcfg:
        config.update(pruned_run=str(model), allocation=pcfg.get("allocation"),
                      actual_sparsity=pcfg.get("actual_sparsity"), nm=pcfg.get("nm"))
    sparsity = pcfg.get("requested_sparsity", pcfg.get("target_sparsity")) if pcfg else 0.0
    record = results_record(pcfg.get("model", adapter.name), pcfg.get("method", "dense") if pcfg else "dense",
                            sparsity, task, nums, resources=res.as_dict(), config=config,
                            intervals=extras.get(I.KEY))
    with atomic_dir(out, overwrite) as tmp:
        write_json_atomic(tmp / "results.json", record)
        if "predictions" in extras:
            write_json_atomic(tmp / "predictions.json", extras["predictions"])
        if "clip_benchmark" in extras:
            write_json_atomic(tmp / "clip_benchmark.json", extras["clip_benchmark"])
    return record
