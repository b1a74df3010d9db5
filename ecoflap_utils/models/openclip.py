"""Adapter for open_clip CLIP models (and CLIP-shaped bundled models with the same interface).

Stacks: ``vision`` (``visual.transformer.resblocks``) then ``text_encoder`` (``transformer.resblocks``),
the order in which ``CLIP.forward`` runs them. Attention keeps q, k, v packed in
``nn.MultiheadAttention.in_proj_weight``; it is pruned in place (its rows share one input).
The calibration loss is CLIP's symmetric contrastive loss over a batch of image-caption pairs, or, for
samples of a labelled set made with ``samples_from_classes(..., objective="classes")``, the cross-entropy
of each image against the prompts of all classes.
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

    def samples_from_pairs(self, pairs: list[dict], seed: int = 0) -> list[dict]:
        """Calibration samples from real image-caption pairs ``[{"image", "caption"[, "id"]}]``: images through
        ``adapter.preprocess``, captions through the model's tokenizer; the loss is the symmetric contrastive
        loss over each batch. ``seed`` is unused (nothing here is random); it keeps the BLIP-2 signature."""
        texts = self._tokenize([p["caption"] for p in pairs])
        out = []
        for k, p in enumerate(pairs):
            sample = {"image": self._pixels(p["image"]), "text": texts[k], "caption": p["caption"]}
            if "id" in p:
                sample["id"] = p["id"]
            out.append(sample)
        return out

    def samples_from_classes(self, items: list[dict], classnames: list[str], template: str = "a photo of a {}.",
                             *, objective: str = "contrastive") -> list[dict]:
        """Calibration samples from a labelled train split ``[{"image", "label"[, "id"]}]``.

        The class prompts are ``template`` filled with each class name. ``objective="contrastive"`` pairs each
        image with the prompt of its own class and keeps the symmetric in-batch contrastive loss (what
        ECoFLaP's CoOp ``zsclip.py`` computes while pruning); ``"classes"`` scores each image against the
        prompts of *all* classes (cross-entropy over classes with ``logit_scale``, zero-shot CLIP's classifier):
        every sample then carries the same ``class_text`` tensor, and ``batches``/``loss`` use it.
        """
        from ..data.calibration import CLIP_OBJECTIVES, fill_template
        from ..errors import UserError

        if objective not in CLIP_OBJECTIVES:
            raise UserError(f"unknown CLIP calibration objective {objective!r}: use one of "
                            f"{', '.join(CLIP_OBJECTIVES)}")
        if not classnames:
            raise UserError("no class names: a labelled calibration set needs them")
        prompts = [fill_template(template, c) for c in classnames]
        class_text = self._tokenize(prompts)
        out = []
        for it in items:
            label = int(it["label"])
            if not 0 <= label < len(classnames):
                raise UserError(f"label {label} is outside the {len(classnames)} class names")
            sample = {"image": self._pixels(it["image"]), "label": label}
            if objective == "classes":
                sample["class_text"] = class_text  # one shared tensor, not a copy per sample
            else:
                sample["text"] = class_text[label]
                sample["caption"] = prompts[label]
            if "id" in it:
                sample["id"] = it["id"]
            out.append(sample)
        return out

    def _tokenize(self, texts: list[str]) -> torch.Tensor:
        from ..errors import UserError

        if self.tokenizer is None:
            raise UserError(f"{self.name} has no tokenizer: load it with open_clip.get_tokenizer's files")
        out = self.tokenizer(list(texts))
        if isinstance(out, dict):
            out = out["input_ids"]
        return torch.as_tensor(out, dtype=torch.long)

    def _pixels(self, image) -> torch.Tensor:
        from ..data.formats import load_image

        image = load_image(image)
        if isinstance(image, torch.Tensor):
            return image
        if self.preprocess is not None:
            return self.preprocess(image)
        from .images import image_transform as _image_transform

        return _image_transform(self)(image)

    def _image_dtype(self) -> torch.dtype:
        vd = getattr(self, "vision_dtype", None)
        return vd() if callable(vd) else next(self.model.visual.parameters()).dtype

    def batches(self, samples: list[Any], batch_size: int) -> list[dict[str, Any]]:
        # class-prompt samples collate here, whatever ``collate`` a subclass defines for image-caption pairs
        if samples and isinstance(samples[0], dict) and "class_text" in samples[0]:
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            return [self._collate_classes(samples[i: i + batch_size]) for i in range(0, len(samples), batch_size)]
        return super().batches(samples, batch_size)

    def _collate_classes(self, samples: list[dict]) -> dict[str, Any]:
        dev = self.input_device()
        class_text = samples[0]["class_text"]
        if any(s["class_text"] is not class_text and not torch.equal(s["class_text"], class_text) for s in samples):
            raise ValueError("a batch mixes samples with different class prompts")
        images = torch.stack([s["image"] for s in samples]).to(dev, self._image_dtype())
        labels = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long, device=dev)
        return {"image": images, "class_text": torch.as_tensor(class_text, dtype=torch.long).to(dev), "labels": labels}

    def collate(self, samples: list[dict]) -> dict[str, Any]:
        if samples and "class_text" in samples[0]:
            return self._collate_classes(samples)
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
        if "class_text" in batch:  # each image against the prompts of all classes
            logits = self.model.logit_scale.exp() * img @ self.encode_text(batch["class_text"]).T
            if getattr(self.model, "logit_bias", None) is not None:
                logits = logits + self.model.logit_bias
            return F.cross_entropy(logits.float(), batch["labels"])
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
