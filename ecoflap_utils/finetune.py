"""Masked fine-tuning of a pruned model: recover accuracy while every pruned weight stays exactly zero.

``finetune(adapter, data, steps=..., lr=...)`` trains the chosen *stacks* of a model with AdamW (linear
warm-up, then cosine decay) on the family's own task loss, and keeps the sparsity pattern:

* the masks are the zero pattern, at the start, of every prunable weight that is trained (or the keep
  masks given, ``True`` = the weight survives, as ``PruneResult.masks``); ``masks={}`` trains densely;
* after each backward pass the gradients of pruned weights are zeroed, so neither AdamW's moments nor
  gradient clipping see them, and after each optimiser step the mask is applied again, so neither weight
  decay nor momentum revives a weight. The zero pattern after training is bit-identical to the one before.

What a *stack* trains (the names are ``adapter.stacks()``; everything else is frozen):

=========== ============================================================================================
BLIP-2      ``vision``: the ViT; ``qformer``: the Q-Former, ``query_tokens`` and ``language_projection``;
            ``lm`` (OPT, LLaMA family): the whole LM; ``text_encoder`` / ``text_decoder`` (T5): its
            encoder / its decoder and LM head (the shared token embedding stays frozen).
            Default: ``qformer`` (BLIP-2's second stage: the bridge adapts to the pruned LM and ViT).
CLIP        ``vision``: the image tower and its projection; ``text_encoder``: the text tower and its
            projection (the temperature stays frozen). Default: both towers, since both are pruned by
            default; ``stacks=["vision"]`` keeps the text side locked as in LiT.
causal LM   ``lm``: the whole model (default).
=========== ============================================================================================

Losses: BLIP-2's language-modelling loss on the answer / caption tokens only (``adapter.training_loss``: the
same value as ``adapter.loss``; for decoder-only LMs computed with the LM head applied only where a target
token is predicted, which saves most of its cost on a large vocabulary); CLIP's symmetric contrastive loss (pairs of
the same class count as positives when the samples carry a ``label``, as ``mini-clip`` was trained); a causal
LM's next-token loss (``adapter.loss``).

Data: ``default_finetune_data`` draws the model's bundled *training* samples (mini-blip2 and mini-clip: the
training split of the digits, never the held-out one; smollm2-135m: windows of the bundled calibration text;
tiny models: their generated samples). ``read_finetune_data`` reads COCO captions / VQAv2 files (BLIP-2,
CLIP) or raw text (causal LM) with the evaluation readers of :mod:`ecoflap_utils.data.formats`.

``run_finetune`` is the ``python -m ecoflap_utils finetune`` command: a pruned run in, a run out (written
atomically).
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import UserError
from .models.base import ModelAdapter, to_device
from .models.devices import offloaded_names, weight_tensor

#: stacks trained when the caller names none, by model family
DEFAULT_STACKS = {"blip2": ("qformer",), "clip": ("vision", "text_encoder"), "causal_lm": ("lm",)}
#: parameters that are never trained: CLIP's temperature and bias
FROZEN_ALWAYS = ("logit_scale", "logit_bias")


# --------------------------------------------------------------------------- what a stack trains
def default_finetune_stacks(adapter: ModelAdapter) -> list[str]:
    """The stacks ``finetune`` trains by default (see the module docstring)."""
    own = DEFAULT_STACKS.get(adapter.family)
    if own is not None:
        return [s for s in own if s in adapter.stacks()]
    return list(adapter.default_stacks or adapter.stacks())


def resolve_stacks(adapter: ModelAdapter, stacks: str | Iterable[str] | None) -> list[str]:
    """``stacks`` (a list or ``"a,b"``; None: the default) checked against the model's, in model order."""
    if stacks is None:
        return default_finetune_stacks(adapter)
    if isinstance(stacks, str):
        stacks = [s.strip() for s in stacks.split(",")]
    chosen = [s for s in stacks if s]
    if not chosen:
        raise UserError(f"no stack to train: choose among {', '.join(adapter.stacks())}")
    unknown = [s for s in chosen if s not in adapter.stacks()]
    if unknown:
        raise UserError(f"{adapter.name} has no stack {', '.join(repr(s) for s in unknown)}; it has "
                        f"{', '.join(adapter.stacks())}")
    return [s for s in adapter.stacks() if s in chosen]


def _stack_prefixes(adapter: ModelAdapter) -> dict[str, tuple[str, ...]] | None:
    """Parameter-name prefixes of each stack for the known families (None: use the blocks' parameters)."""
    names = [n for n, _ in adapter.model.named_parameters()]
    if adapter.family == "blip2":
        out = {"vision": ("vision_model.",), "qformer": ("qformer.", "query_tokens", "language_projection.")}
        if getattr(adapter, "is_t5", False):
            out["text_encoder"] = ("language_model.encoder.",)
            out["text_decoder"] = ("language_model.decoder.", "language_model.lm_head.")
        else:
            out["lm"] = ("language_model.",)
        return out
    if adapter.family == "clip":
        vision = ("visual",)  # open_clip's visual.* and mini-clip's visual.* and visual_proj.*
        text = tuple(sorted({n.split(".")[0] + ("." if "." in n else "") for n in names
                             if not n.startswith(vision) and n not in FROZEN_ALWAYS}))
        return {"vision": vision, "text_encoder": text}
    if adapter.family == "causal_lm":
        return {"lm": ("",)}
    return None


def stack_parameters(adapter: ModelAdapter, stacks: Iterable[str]) -> dict[str, list[str]]:
    """``{stack: [qualified parameter names]}`` that training ``stacks`` updates (each name under one stack)."""
    stacks = list(stacks)
    prefixes = _stack_prefixes(adapter)
    out: dict[str, list[str]] = {s: [] for s in stacks}
    if prefixes is None:  # unknown family: the parameters of the stack's blocks
        for s in stacks:
            for block in adapter.stack_blocks(s):
                prefix = _module_prefix(adapter.model, block.module)
                out[s] += [f"{prefix}.{n}" for n, _ in block.module.named_parameters()]
        return out
    for name, _ in adapter.model.named_parameters():
        if name in FROZEN_ALWAYS:
            continue
        for s in stacks:
            if any(name.startswith(p) for p in prefixes.get(s, ())):
                out[s].append(name)
                break
    return out


def _module_prefix(model: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    raise ValueError("block module is not inside the model")  # pragma: no cover


def _stack_modules(adapter: ModelAdapter, stacks: Sequence[str]) -> list[torch.nn.Module]:
    """Submodules that belong wholly to the trained stacks: they are put in training mode (dropout)."""
    prefixes = _stack_prefixes(adapter)
    if prefixes is None:
        return [b.module for s in stacks for b in adapter.stack_blocks(s)]
    mods = []
    for s in stacks:
        for p in prefixes.get(s, ()):
            if p == "":
                mods.append(adapter.model)
            elif p.endswith("."):
                try:
                    mods.append(adapter.model.get_submodule(p[:-1]))
                except AttributeError:
                    pass
            else:  # "visual" and friends: every top-level module whose name starts so
                mods += [m for n, m in adapter.model.named_children() if n.startswith(p)]
    return mods


def pruning_masks(adapter: ModelAdapter, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Keep masks (``True`` = nonzero) of the prunable weights in ``names`` (default: all of them) that hold
    at least one zero; a weight without zeros needs no mask."""
    prunable = set(adapter.layer_names(adapter.stacks()))
    chosen = prunable if names is None else prunable & set(names)
    out = {}
    with torch.no_grad():
        for name in sorted(chosen):
            keep = weight_tensor(adapter.model, name) != 0
            if not bool(keep.all()):
                out[name] = keep
    return out


# --------------------------------------------------------------------------- data
@dataclass
class FinetuneData:
    """Fine-tuning samples and how to turn a drawn list of them into ``adapter.collate`` input.

    ``prepare`` (when set) runs on each batch's samples just before ``collate``: file-based data keeps
    image paths and raw text until then, so a large dataset is not decoded up front.
    """

    samples: list[Any]
    name: str
    prepare: Callable[[list[Any]], list[Any]] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def batch(self, adapter: ModelAdapter, samples: list[Any]) -> dict[str, Any]:
        return adapter.collate(self.prepare(samples) if self.prepare is not None else samples)


def _distinct_pool(adapter: ModelAdapter) -> int | None:
    """How many distinct samples one ``calibration_samples`` call can give (None: unlimited)."""
    own = getattr(adapter, "finetune_pool_size", None)
    if own:
        return int(own)
    for mod_name, cls_name in (("ecoflap_utils.zoo.miniblip2", "MiniBlip2Adapter"),
                               ("ecoflap_utils.zoo.miniclip", "MiniCLIPAdapter")):
        mod = sys.modules.get(mod_name)
        if mod is not None and isinstance(adapter, getattr(mod, cls_name)):
            from .data import images as digit_data

            return len(digit_data.split_indices("train"))
    return None


def default_finetune_data(adapter: ModelAdapter, n: int, seed: int = 0) -> FinetuneData:
    """``n`` bundled *training* samples of the model (its calibration sampler: mini-blip2's VQA and caption
    samples and mini-clip's image-caption pairs from the digits' training split, smollm2's windows of the
    bundled calibration text, the tiny models' generated samples). Beyond the training split's size, further
    draws with the next seeds are appended (each a new order and, for mini-blip2, new task choices)."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"number of fine-tuning samples must be a positive integer, got {n!r}")
    pool = _distinct_pool(adapter)
    samples: list[Any] = []
    k = 0
    while len(samples) < n:
        take = n - len(samples) if pool is None else min(pool, n - len(samples))
        samples += adapter.calibration_samples(take, seed + 7919 * k)
        k += 1
    return FinetuneData(samples, f"bundled: {adapter.calibration_name}")


def _tokenizer(adapter: ModelAdapter):
    tok = getattr(adapter, "tokenizer", None)
    if tok is None:
        raise UserError(f"{adapter.name} has no tokenizer: load it from a folder that holds the tokenizer files")
    return tok


def _ids(x) -> list[int]:
    if isinstance(x, Mapping):
        x = x["input_ids"]
    return [int(i) for i in (x.tolist() if hasattr(x, "tolist") else x)]


def blip2_sample(adapter: ModelAdapter, image: Any, prompt: str, target: str) -> dict[str, Any]:
    """One BLIP-2 training sample ``{"pixel_values", "prefix_ids", "target_ids"}``: the image through the
    model's own transform (as in evaluation), the prompt tokenised as ``Blip2Processor`` does, the target
    after a space with the LM's end-of-sequence token (T5: ``collate`` adds it)."""
    from .data import formats
    from .evaluate import _tokenize_prompt
    from .models.images import _image_transform

    tok = _tokenizer(adapter)
    im = formats.load_image(image)
    pixel = im if isinstance(im, torch.Tensor) else _image_transform(adapter)(im)
    is_t5 = getattr(adapter, "is_t5", False)
    target_ids = _ids(tok.encode(target if is_t5 else " " + target, add_special_tokens=False))
    eos = getattr(adapter, "eos_id", None)
    if not is_t5 and eos is not None:
        target_ids.append(int(eos if not isinstance(eos, (list, tuple)) else eos[0]))
    return {"pixel_values": pixel, "prefix_ids": _tokenize_prompt(tok, prompt), "target_ids": target_ids}


def clip_sample(adapter: ModelAdapter, image: Any, caption: str) -> dict[str, Any]:
    """One CLIP training pair ``{"image", "text"}``: the model's image transform and tokenizer."""
    from .data import formats
    from .models.images import _image_transform

    im = formats.load_image(image)
    pixel = im if isinstance(im, torch.Tensor) else _image_transform(adapter)(im)
    return {"image": pixel, "text": _tokenizer(adapter)([caption])[0]}


def most_common_answer(answers: Sequence[str]) -> str:
    """The answer most annotators gave (the first of those tied): the training target of a VQA question."""
    counts = Counter(str(a).strip() for a in answers)
    best = max(counts.values())
    return next(a for a in (str(x).strip() for x in answers) if counts[a] == best)


def _data_kind(path: Path) -> str:
    """``"vqa"`` for a VQA questions file (or a folder of them), else the image-caption format of
    :mod:`ecoflap_utils.data.calibration` (``coco``, ``karpathy``, ``csv``, ...), reading a JSON file once."""
    from .data import calibration, formats

    if path.is_dir():
        return "vqa"
    if path.suffix.lower() != ".json":
        return calibration.detect_format(path)
    obj = formats.read_json_file(path, "fine-tuning data")
    if isinstance(obj, dict) and "questions" in obj:
        return "vqa"
    if isinstance(obj, list) or (isinstance(obj, dict) and "images" in obj):
        return calibration._json_kind(obj, path)
    keys = ", ".join(repr(k) for k in list(obj)[:5]) if isinstance(obj, dict) else type(obj).__name__
    raise UserError(f"{path} has no 'questions' field (a VQAv2 questions JSON) and no 'images' field (a COCO "
                    f"captions or Karpathy JSON); it holds {keys}: pass one of those files")


def read_finetune_rows(family: str, path: str | os.PathLike, *, annotations: str | os.PathLike | None = None,
                       image_root: str | os.PathLike | None = None,
                       prompt: str | None = None) -> tuple[list[Any], str]:
    """Read fine-tuning data for a model ``family`` without the model (so bad files fail before it loads).

    Returns ``(rows, name)``: rows ``(image, prompt, target)`` for BLIP-2 (``prompt`` None for captions: the
    model's caption prompt), ``(image, caption)`` for CLIP, ``[text]`` for a causal LM. Image-caption pairs
    are read as calibration reads them (:func:`ecoflap_utils.data.calibration.read_pairs`: COCO captions,
    Karpathy's train + restval rows or a BLIP/LAVIS list, CSV/TSV; every listed image checked on disk).
    See :func:`read_finetune_data`.
    """
    from .data import formats
    from .data.calibration import read_pairs
    from .evaluate import VQA_PROMPT

    path = Path(path)
    if not path.exists():
        raise UserError(f"--data {path} does not exist: give the path of the fine-tuning data")
    if family == "causal_lm":
        return [formats.read_text(path)], f"text: {path}"
    if family not in ("blip2", "clip"):
        raise UserError(f"fine-tuning data files are read for BLIP-2, CLIP and causal LMs, not {family}")
    kind = _data_kind(path)
    if kind == "vqa":
        if family == "clip":
            raise UserError(f"{path} holds VQA questions; CLIP fine-tunes on image-caption pairs: pass a COCO "
                            "captions or Karpathy JSON")
        q, a = formats.find_vqa_files(path, annotations)
        template = prompt or VQA_PROMPT
        if "{}" not in template:
            raise UserError(f"VQA prompt {template!r} has no '{{}}' where the question goes")
        rows = [(r["image"], template.format(r["question"]), most_common_answer(r["answers"]))
                for r in formats.read_vqa(q, a, image_root=image_root) if r["answers"]]
        name = f"vqa: {q}"
    else:
        if kind not in ("coco", "karpathy", "csv"):
            raise UserError(f"{path} is {kind!r} data; fine-tuning reads a VQAv2 questions JSON (BLIP-2) or "
                            "image-caption pairs (a COCO captions, Karpathy or CSV file): pass one of those")
        rows = [(p["image"], prompt, p["caption"]) for p in read_pairs(path, kind, image_root)]
        name = f"captions: {path}"
    if not rows:
        raise UserError(f"{path}: no usable sample (no question with an answer, no image with a caption)")
    if family == "clip":
        rows = [(im, cap) for im, _, cap in rows]
    return rows, name


def finetune_data_from_rows(adapter: ModelAdapter, rows: list[Any], name: str) -> FinetuneData:
    """:class:`FinetuneData` over rows of :func:`read_finetune_rows`, prepared with the model's image transform
    and tokenizer when a batch is drawn."""
    from .evaluate import CAPTION_PROMPT

    if adapter.family == "blip2":
        caption_prompt = getattr(adapter, "caption_prompt", None) or CAPTION_PROMPT

        def prepare(batch):
            return [blip2_sample(adapter, im, caption_prompt if p is None else p, t) for im, p, t in batch]

        return FinetuneData(rows, name, prepare=prepare)
    if adapter.family == "clip":
        return FinetuneData(rows, name, prepare=lambda batch: [clip_sample(adapter, im, c) for im, c in batch])
    return FinetuneData(rows, name)


def read_finetune_data(adapter: ModelAdapter, path: str | os.PathLike, *, annotations: str | os.PathLike | None = None,
                       image_root: str | os.PathLike | None = None, prompt: str | None = None) -> FinetuneData:
    """Fine-tuning data from files (data/BENCHMARKS.md): VQA with :mod:`ecoflap_utils.data.formats`, image-caption
    pairs with :func:`ecoflap_utils.data.calibration.read_pairs` (as calibration reads them):

    * BLIP-2: a VQAv2 / OK-VQA questions JSON (or its folder) with its annotations (``annotations``, else the
      one ``*annotations*.json`` next to it): target = the most common answer after the prompt
      ``"Question: {} Short answer:"``; or image-caption pairs (a COCO captions JSON, Karpathy's JSON - its
      train and restval rows, BLIP's 113k training images - or a BLIP/LAVIS list, or a CSV/TSV): one sample
      per caption after the prompt ``"a photo of"`` (the adapter's ``caption_prompt`` when it has one);
    * CLIP: the same image-caption pairs, one (image, caption) pair per caption;
    * causal LM: a raw text file, cut into windows of ``adapter.seq_len`` tokens (seeded random offsets).

    Images stay paths until their batch is drawn. Unreadable files raise UserError naming file and field.
    """
    rows, name = read_finetune_rows(adapter.family, path, annotations=annotations, image_root=image_root,
                                    prompt=prompt)
    return finetune_data_from_rows(adapter, rows, name)


def _text_windows(adapter: ModelAdapter, data: FinetuneData, n: int, seed: int) -> FinetuneData:
    from .data.text import token_windows

    seq_len = int(getattr(adapter, "seq_len", 128))
    windows = token_windows(_tokenizer(adapter), data.samples[0], n, seq_len, seed)
    return FinetuneData(windows, data.name)


def as_finetune_data(adapter: ModelAdapter, data: Any, n: int, seed: int = 0) -> FinetuneData:
    """``data`` as :class:`FinetuneData`: None -> the bundled training samples (``n`` of them); a path ->
    :func:`read_finetune_data`; a list of ``collate``-ready samples -> as given."""
    if data is None:
        return default_finetune_data(adapter, n, seed)
    if isinstance(data, (str, os.PathLike)):
        data = read_finetune_data(adapter, data)
    if isinstance(data, FinetuneData):
        if adapter.family == "causal_lm" and len(data.samples) == 1 and isinstance(data.samples[0], str):
            return _text_windows(adapter, data, n, seed)
        if not data.samples:
            raise UserError("the fine-tuning data holds no sample")
        return data
    samples = list(data)
    if not samples:
        raise UserError("the fine-tuning data holds no sample")
    return FinetuneData(samples, "in-memory")


def _index_stream(n: int, gen: torch.Generator) -> Iterator[int]:
    """Sample indices epoch after epoch, each epoch a fresh seeded permutation."""
    while True:
        yield from torch.randperm(n, generator=gen).tolist()


# --------------------------------------------------------------------------- losses
def task_loss(adapter: ModelAdapter, batch: Mapping[str, Any], *, labels: torch.Tensor | None = None,
              vision_grad: bool = True) -> torch.Tensor:
    """The family's training loss on a collated batch (see the module docstring)."""
    if adapter.family == "clip" and labels is not None:
        from .zoo.train import clip_batch_loss

        img = adapter.encode_image(batch["image"]).float()
        txt = adapter.encode_text(batch["text"]).float()
        return clip_batch_loss(img, txt, labels.to(img.device), adapter.model.logit_scale.exp().float())
    return adapter.training_loss(batch, vision_grad=vision_grad)


def _labels_of(samples: Sequence[Any]) -> torch.Tensor | None:
    if samples and all(isinstance(s, Mapping) and "label" in s for s in samples):
        return torch.tensor([int(s["label"]) for s in samples])
    return None


# --------------------------------------------------------------------------- the loop
def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero (as the bundled models were trained)."""
    from .zoo.train import cosine_lr

    return cosine_lr(step, total, peak, warmup)


def warmup_steps(warmup: float | int, steps: int) -> int:
    """``warmup`` as a number of steps: a float in [0, 1] is a fraction of ``steps``, an int a step count."""
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float, np.integer, np.floating)):
        raise UserError(f"warmup must be a fraction of the steps (0.1) or a number of steps (20), got {warmup!r}")
    if isinstance(warmup, (float, np.floating)):
        if not 0.0 <= warmup <= 1.0:
            raise UserError(f"warmup fraction must be in [0, 1], got {warmup}; give a step count as an int")
        return int(round(warmup * steps))
    if not 0 <= warmup <= steps:
        raise UserError(f"warmup of {warmup} steps must be between 0 and the {steps} steps")
    return int(warmup)


def _check_number(value, name: str, *, positive: bool, integer: bool = False) -> None:
    ok_type = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, ok_type) or not math.isfinite(value):
        raise UserError(f"{name} must be a {'whole' if integer else 'finite'} number, got {value!r}")
    if positive and value <= 0:
        raise UserError(f"{name} must be > 0, got {value}")
    if not positive and value < 0:
        raise UserError(f"{name} must be >= 0, got {value}")


@dataclass
class FinetuneResult:
    """What ``finetune`` returns: the loss curve (one value per step), held-out metrics recorded by
    ``eval_fn`` (``[{"step": k, ...}]``), the settings and the keep masks that were enforced."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    wall_s: float = 0.0  # the whole call, evaluations included
    eval_s: float = 0.0  # time spent in eval_fn

    @property
    def initial_loss(self) -> float | None:
        """Mean loss of the first (up to) 10 steps."""
        head = self.losses[:10]
        return float(np.mean(head)) if head else None

    @property
    def final_loss(self) -> float | None:
        """Mean loss of the last (up to) 10 steps."""
        tail = self.losses[-10:]
        return float(np.mean(tail)) if tail else None

    @property
    def seconds_per_step(self) -> float | None:
        """Training time per step (evaluations excluded)."""
        return (self.wall_s - self.eval_s) / len(self.losses) if self.losses else None

    def curve(self) -> dict[str, Any]:
        """``loss_curve.json``: per-step loss and learning rate, and the held-out evaluations."""
        return {"step": list(range(1, len(self.losses) + 1)), "loss": [round(x, 6) for x in self.losses],
                "lr": self.lrs, "evals": self.evals, "wall_s": round(self.wall_s, 3),
                "eval_s": round(self.eval_s, 3)}


def _disable(progress: bool | None) -> bool | None:
    return None if progress in (None, True) else True


def _check_masks(adapter: ModelAdapter, masks: Mapping[str, torch.Tensor], trained: set[str]) -> dict:
    out = {}
    for name, keep in masks.items():
        try:
            p = adapter.parameter(name)
        except AttributeError:
            raise UserError(f"mask for {name!r}: {adapter.name} has no such parameter") from None
        keep = torch.as_tensor(keep)
        if tuple(keep.shape) != tuple(p.shape):
            raise UserError(f"mask for {name} has shape {tuple(keep.shape)}, the weight {tuple(p.shape)}")
        if name in trained:
            out[name] = keep.to(device=p.device, dtype=torch.bool)
    return out


def finetune(adapter: ModelAdapter, data: Any = None, *, steps: int, lr: float,
             stacks: str | Iterable[str] | None = None,
             batch_size: int = 16, seed: int = 0, weight_decay: float = 0.0, warmup: float | int = 0.1,
             masks: Mapping[str, torch.Tensor] | None = None, max_grad_norm: float | None = 1.0,
             autocast: bool = False, eval_fn: Callable[[int, ModelAdapter], Mapping[str, Any]] | None = None,
             eval_every: int | None = None, progress: bool | None = None, log_every: int = 10) -> FinetuneResult:
    """Fine-tune ``adapter``'s model in place, keeping every pruned weight exactly zero (module docstring).

    ``data``: None (the bundled training samples, ``steps * batch_size`` of them), a path
    (:func:`read_finetune_data`), a :class:`FinetuneData` or a list of ``collate``-ready samples; batches are
    drawn from seeded permutations, epoch after epoch. ``stacks``: what is trained (default
    :func:`default_finetune_stacks`). ``masks``: keep masks to enforce (default: the zero pattern of the
    trained prunable weights; ``{}``: none, dense fine-tuning). AdamW (betas 0.9, 0.98) with ``weight_decay`` on
    matrices (not on biases, norms, embeddings or query tokens); learning rate warm-up over ``warmup`` (a
    fraction of the steps or a step count), then cosine decay to zero; gradients clipped to ``max_grad_norm``.
    ``autocast``: bfloat16 autocast for the forward pass (parameters and optimiser state stay as they are; meant
    for GPUs: on this project's 2-core CPU it made a mini-blip2 step many times slower).
    ``eval_fn(step, adapter) -> metrics`` runs in eval mode before training, every ``eval_every`` steps and at
    the end. Deterministic given ``seed``. The model is left in eval mode with its ``requires_grad`` flags
    restored, also when training is interrupted.

    A model accelerate spread over several devices (``load_model(..., device_map=...)``) trains where it lies:
    batches go to its main device, its hooks carry activations and gradients between devices, and each mask
    sits next to its weight. Weights accelerate offloaded to the CPU are refused (they are parameters only
    during their own forward, so no gradient reaches them).
    """
    _check_number(steps, "steps", positive=True, integer=True)
    _check_number(lr, "learning rate", positive=True)
    _check_number(batch_size, "batch size", positive=True, integer=True)
    _check_number(weight_decay, "weight decay", positive=False)
    _check_number(seed, "seed", positive=False, integer=True)
    if eval_every is not None:
        _check_number(eval_every, "eval_every", positive=True, integer=True)
    if max_grad_norm is not None:
        _check_number(max_grad_norm, "max_grad_norm", positive=True)
    n_warm = warmup_steps(warmup, steps)
    chosen = resolve_stacks(adapter, stacks)
    data = as_finetune_data(adapter, data, steps * batch_size, seed)

    model = adapter.model
    by_stack = stack_parameters(adapter, chosen)
    trained_names = [n for s in chosen for n in by_stack[s]]
    if not trained_names:
        raise UserError(f"stacks {chosen} of {adapter.name} hold no parameter to train")
    off = offloaded_names(model, trained_names)
    if off:
        raise UserError(f"accelerate offloaded {len(off)} of the weights to train ({off[0]} first) to the CPU, where "
                        "they exist only during their forward and get no gradient: load the model with a device map "
                        "that keeps the trained stacks on GPUs (more max_memory), or train fewer --stacks")
    params = dict(model.named_parameters())
    trained = {n: params[n] for n in trained_names}
    if masks is None:
        keep = pruning_masks(adapter, trained_names)
    else:
        keep = _check_masks(adapter, masks, set(trained_names))
    vision_grad = "vision" in chosen

    decay, no_decay = [], []
    for n, p in trained.items():
        (decay if p.ndim >= 2 and "embed" not in n and n != "query_tokens" else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    flags = {n: p.requires_grad for n, p in params.items()}
    modules = _stack_modules(adapter, chosen)
    device = adapter.input_device()
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else nullcontext
    config = {
        "steps": int(steps), "lr": float(lr), "stacks": chosen, "batch_size": int(batch_size), "seed": int(seed),
        "weight_decay": float(weight_decay), "warmup_steps": n_warm, "schedule": "linear warm-up, cosine decay",
        "optimizer": "AdamW(betas=(0.9, 0.98), eps=1e-6)", "max_grad_norm": max_grad_norm, "autocast_bf16": autocast,
        "data": data.name, "samples": len(data), "trained_parameters": sum(p.numel() for p in trained.values()),
        "masked_layers": len(keep), "kept_zeros": int(sum((~m).sum() for m in keep.values())),
        "dense": masks is not None and not keep,
    }
    result = FinetuneResult(config=config, masks={k: v.cpu() for k, v in keep.items()})
    used = {p.device for p in trained.values()} | {device}  # every GPU a dispatched model computes on
    rng_devices = sorted({d.index or 0 for d in used if d.type == "cuda"})

    def enforce() -> None:
        with torch.no_grad():
            for n, m in keep.items():
                trained[n].masked_fill_(~m, 0.0)

    def run_eval(step: int) -> None:
        t = time.perf_counter()
        model.eval()
        metrics = dict(eval_fn(step, adapter))
        result.evals.append({"step": step, **metrics})
        for mod in modules:
            mod.train()
        result.eval_s += time.perf_counter() - t

    t0 = time.perf_counter()
    bar = None
    try:
        for p in params.values():
            p.requires_grad_(False)
        for p in trained.values():
            p.requires_grad_(True)
        enforce()
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
        model.eval()
        for mod in modules:
            mod.train()
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)
            order = _index_stream(len(data), torch.Generator().manual_seed(seed))
            if eval_fn is not None:
                run_eval(0)
            bar = tqdm(range(steps), desc="finetune", disable=_disable(progress), leave=False)
            for step in bar:
                rate = lr_at(step, steps, lr, n_warm)
                for g in opt.param_groups:
                    g["lr"] = rate
                drawn = [data.samples[next(order)] for _ in range(batch_size)]
                batch = to_device(data.batch(adapter, drawn), device)
                with amp():
                    loss = task_loss(adapter, batch, labels=_labels_of(drawn), vision_grad=vision_grad)
                if not torch.isfinite(loss):
                    raise UserError(f"the fine-tuning loss became {loss.item()} at step {step + 1}: lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    for n, m in keep.items():
                        g = trained[n].grad
                        if g is not None:
                            g.masked_fill_(~m, 0.0)
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(list(trained.values()), max_grad_norm)
                opt.step()
                enforce()
                result.losses.append(float(loss.detach()))
                result.lrs.append(rate)
                if step % max(1, log_every) == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
                done = step + 1
                if eval_fn is not None and eval_every and done % eval_every == 0 and done != steps:
                    run_eval(done)
            if eval_fn is not None:
                run_eval(steps)
    finally:
        result.wall_s = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        for p in trained.values():
            p.grad = None
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.eval()
    result.config["final_loss"] = result.final_loss
    result.config["initial_loss"] = result.initial_loss
    result.config["wall_s"] = round(result.wall_s, 3)
    return result


def eval_callback(task: str | None = None, data: Any = None, *, limit: int | None = None,
                  **evaluate_kw) -> Callable[[int, ModelAdapter], dict[str, float]]:
    """An ``eval_fn`` for :func:`finetune`: ``evaluate.evaluate(adapter, task, data, limit=..., **evaluate_kw)``
    reduced to its numeric metrics (for example ``vqa_accuracy`` and ``n``), without progress bars.

    ``finetune(adapter, steps=150, lr=3e-4, eval_fn=eval_callback("vqav2", limit=200, num_beams=1),
    eval_every=25).evals`` is an accuracy-against-steps curve on the held-out set.
    """
    from .evaluate import evaluate, split_metrics

    def run(step: int, adapter: ModelAdapter) -> dict[str, float]:
        nums, _ = split_metrics(evaluate(adapter, task, data, limit=limit, progress=False, **evaluate_kw))
        return nums

    return run


def zero_pattern(adapter: ModelAdapter, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """``{weight name: weight == 0}`` for the prunable weights (all of them, or ``names``), on the CPU."""
    chosen = adapter.layer_names(adapter.stacks()) if names is None else list(names)
    with torch.no_grad():
        return {n: (weight_tensor(adapter.model, n) == 0).cpu() for n in chosen}


# --------------------------------------------------------------------------- the command
@contextmanager
def _quiet_hub_bars() -> Iterator[None]:
    """Hide transformers' loading bars: the command's stderr holds its own progress bar or one error line."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _is_run(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / "pruning_config.json").is_file()


def _is_dense_config(cfg: Mapping[str, Any]) -> bool:
    return not cfg.get("method") or not cfg.get("actual_sparsity")


def run_finetune(*, model: str, steps: int, out: str | os.PathLike, lr: float = 1e-4, data: str | None = None,
                 annotations: str | None = None, image_root: str | None = None,
                 stacks: str | Sequence[str] | None = None,
                 batch_size: int = 16, weight_decay: float = 0.0, warmup: float | int = 0.1, seed: int = 0,
                 dense: bool = False, device: str = "cpu", autocast: bool = False, overwrite: bool = False,
                 progress: bool | None = None, device_map: str | dict | None = None,
                 max_memory: dict | None = None) -> dict[str, Any]:
    """The ``finetune`` command: load a pruned run, fine-tune it (masked) and write a run like ``prune``'s.

    Writes (atomically) ``model/`` or ``model.safetensors``, ``pruning_config.json`` (the input's settings
    plus a ``"finetune"`` entry), ``sparsity_report.csv`` (the input's, unchanged: the zeros are kept), the
    input's ``sparsity_dict.json`` / ``scores.json`` when present, ``resources.json`` (the input's stages plus
    ``finetune``) and ``loss_curve.json``. Every check on the input happens before anything is written.
    ``device_map`` / ``max_memory`` spread the model over devices (``models.load_model``; disk is refused).
    """
    from .io import atomic_dir, check_out_dir, library_versions, read_json, save_pruned, write_json_atomic
    from .measure import Resources
    from .models import load_model

    _check_number(steps, "--steps", positive=True, integer=True)
    _check_number(lr, "--lr", positive=True)
    _check_number(batch_size, "--batch-size", positive=True, integer=True)
    _check_number(weight_decay, "--weight-decay", positive=False)
    warmup_steps(warmup, steps)
    from .models.devices import check_device_map

    check_device_map(device_map)
    src = Path(model)
    is_run = _is_run(src)
    cfg_in: dict[str, Any] = read_json(src / "pruning_config.json") if is_run else {}
    if is_run and not isinstance(cfg_in, dict):
        raise UserError(f"{src / 'pruning_config.json'} is not a run's configuration (expected a JSON object)")
    if dense:
        if is_run and not _is_dense_config(cfg_in):
            raise UserError(f"{model} is a pruned run ({cfg_in.get('method')}, sparsity "
                            f"{cfg_in.get('actual_sparsity')}); --dense is for dense models: drop --dense to "
                            "fine-tune it with its zeros kept")
    elif not is_run:
        if src.is_dir():
            raise UserError(f"{model} is not a pruned run (no pruning_config.json): pass the --out folder of "
                            "`python -m ecoflap_utils prune`, or --dense to fine-tune a dense model")
        raise UserError(f"{model} is a dense model, not a pruned run: prune it first (python -m ecoflap_utils "
                        "prune --model ... --out RUN) and pass --model RUN, or pass --dense to fine-tune it densely")
    elif _is_dense_config(cfg_in):
        raise UserError(f"{model} holds a dense model (its pruning_config.json records no pruning): pass --dense "
                        "to fine-tune it densely")
    for path, flag in ((data, "--data"), (annotations, "--annotations"), (image_root, "--image-root")):
        if path is not None and not Path(path).exists():
            raise UserError(f"{flag} {path} does not exist: check the path (see data/BENCHMARKS.md)")
    check_out_dir(out, overwrite)
    rows = None
    if data is not None and cfg_in.get("family"):  # a bad file fails before the model loads
        rows = read_finetune_rows(cfg_in["family"], data, annotations=annotations, image_root=image_root)

    with _quiet_hub_bars():
        adapter = load_model(str(model), device=device, dtype=cfg_in.get("dtype", "float32"), device_map=device_map,
                             max_memory=max_memory)
    chosen = resolve_stacks(adapter, stacks)
    if data is not None and rows is None:
        rows = read_finetune_rows(adapter.family, data, annotations=annotations, image_root=image_root)
    fdata = finetune_data_from_rows(adapter, *rows) if rows is not None else None
    fdata = as_finetune_data(adapter, fdata, steps * batch_size, seed)

    res_in = read_json(src / "resources.json") if is_run and (src / "resources.json").is_file() else {}
    stages = dict(res_in.get("stages", {})) if isinstance(res_in, dict) else {}
    stage = "finetune"
    k = 2
    while stage in stages:
        stage, k = f"finetune_{k}", k + 1
    res = Resources(device)
    with atomic_dir(out, overwrite) as tmp:
        with res.stage(stage):
            result = finetune(adapter, fdata, steps=steps, lr=lr, stacks=chosen, batch_size=batch_size, seed=seed,
                              weight_decay=weight_decay, warmup=warmup, masks={} if dense else None,
                              autocast=autocast, progress=progress)
        entry = {**{k: result.config[k] for k in ("steps", "lr", "stacks", "batch_size", "seed", "weight_decay",
                                                  "warmup_steps", "max_grad_norm", "autocast_bf16", "data",
                                                  "samples", "trained_parameters", "masked_layers", "kept_zeros")},
                 "dense": bool(dense), "input": str(model), "device": str(device),
                 "initial_loss": result.initial_loss, "final_loss": result.final_loss,
                 "seconds_per_step": round(result.seconds_per_step or 0.0, 4)}
        if "finetune" in cfg_in:
            entry["previous"] = cfg_in["finetune"]
        cfg = {**cfg_in, "finetune": entry}
        if is_run:
            cfg["versions"] = library_versions()
        with _quiet_hub_bars():
            save_pruned(adapter, tmp, None, config=cfg, _inplace=True)
        if is_run:
            for name in ("sparsity_report.csv", "sparsity_dict.json", "scores.json"):
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
        stages[stage] = res.stages[stage]
        total = sum(float(s.get("wall_s", 0.0)) for s in stages.values())
        peak = max((float(s.get("peak_mb", 0.0)) for s in stages.values()), default=0.0)
        write_json_atomic(tmp / "resources.json", {"stages": stages, "total_wall_s": round(total, 4),
                                                    "peak_mb": round(peak, 2)})
        write_json_atomic(tmp / "loss_curve.json", result.curve())
    return {"result": result, "adapter": adapter, "config": cfg, "stage": stage}
