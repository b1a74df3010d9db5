"""Adapter for open_clip CLIP models (and CLIP-shaped bundled models with the same interface).

Stacks: ``vision`` (``visual.transformer.resblocks``) then ``text_encoder`` (``transformer.resblocks``),
the order in which ``CLIP.forward`` runs them. Attention keeps q, k, v packed in
``nn.MultiheadAttention.in_proj_weight``; it is pruned in place (its rows share one input).
The calibration loss is CLIP's symmetric contrastive loss.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from .base import Block, ModelAdapter, prunable_weight_names


class CLIPAdapter(ModelAdapter):
    family = "clip"
    default_stacks = ("vision", "text_encoder")

    def __init__(self, model, name, *, tokenizer=None, preprocess=None,
                 sample_fn: Callable[[int, int], list[dict]] | None = None,
                 calibration_name: str = "generated", arch: str | None = None, **kw):
        super().__init__(model, name, **kw)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.arch = arch
        self._sample_fn = sample_fn
        self._calibration_name = calibration_name

    def build_blocks(self) -> list[Block]:
        vis = self.model.visual.transformer.resblocks
        txt = self.model.transformer.resblocks
        blocks = [Block(f"vision.{i}", "vision", "vision", m, prunable_weight_names(m, f"visual.transformer.resblocks.{i}"))
                  for i, m in enumerate(vis)]
        blocks += [Block(f"text_encoder.{i}", "text_encoder", "language", m,
                         prunable_weight_names(m, f"transformer.resblocks.{i}"))
                   for i, m in enumerate(txt)]
        return blocks

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    def calibration_samples(self, n: int, seed: int = 0) -> list[dict]:
        if self._sample_fn is not None:
            return self._sample_fn(n, seed)
        return generated_clip_samples(n, seed, image_size=self.image_size, context_length=self.context_length,
                                      vocab=int(self.model.vocab_size))

    def collate(self, samples: list[dict]) -> dict[str, Any]:
        dev = self.input_device()
        dtype = next(self.model.visual.parameters()).dtype
        images = torch.stack([s["image"] for s in samples]).to(dev, dtype)
        text = torch.stack([torch.as_tensor(s["text"], dtype=torch.long) for s in samples]).to(dev)
        return {"image": images, "text": text}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=True)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(text, normalize=True)

    def loss(self, batch):
        img = self.encode_image(batch["image"])
        txt = self.encode_text(batch["text"])
        logits = self.model.logit_scale.exp() * img @ txt.T
        if getattr(self.model, "logit_bias", None) is not None:
            logits = logits + self.model.logit_bias
        target = torch.arange(len(img), device=logits.device)
        return 0.5 * (F.cross_entropy(logits.float(), target) + F.cross_entropy(logits.float().T, target))


def generated_clip_samples(n: int, seed: int, *, image_size: int, context_length: int, vocab: int) -> list[dict]:
    """Seeded (image, caption) pairs from 8 classes: a class pattern plus noise, and a class token sequence."""
    g = torch.Generator().manual_seed(seed)
    rng = torch.Generator().manual_seed(seed + 1)
    protos = torch.randn(8, 3, image_size, image_size, generator=torch.Generator().manual_seed(91))
    words = torch.randint(1, vocab - 2, (8, 5), generator=torch.Generator().manual_seed(92))
    out = []
    for _ in range(n):
        c = int(torch.randint(0, 8, (1,), generator=rng))
        img = protos[c] + 0.5 * torch.randn(3, image_size, image_size, generator=g)
        text = torch.zeros(context_length, dtype=torch.long)
        text[0] = vocab - 2  # start token
        text[1:6] = words[c]
        text[6] = vocab - 1  # end token: the highest id, where open_clip's argmax pooling looks
        out.append({"image": img, "text": text, "label": c})
    return out
