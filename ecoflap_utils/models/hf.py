"""Adapters for Hugging Face models: causal LMs (LLaMA family, OPT) and BLIP-2.

Blocks are found from the model's own attributes, so any LLaMA-like or OPT-like checkpoint works.
"""
from __future__ import annotations

import random
from typing import Any, Callable

import torch
from torch import nn

from .base import Block, ModelAdapter, chunked_causal_lm_loss, prunable_weight_names


def _find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of transformer layers of a causal LM (``model.layers`` or ``model.decoder.layers``)."""
    for path in ("model.layers", "model.decoder.layers", "layers", "decoder.layers", "transformer.h", "gpt_neox.layers"):
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return path, mod
    raise ValueError(
        f"cannot find the transformer layers of {type(model).__name__}: expected model.layers (LLaMA family) "
        "or model.decoder.layers (OPT)"
    )


def _blocks_from_list(path: str, layers: nn.ModuleList, stack: str, modality: str, prunable: bool = True) -> list[Block]:
    return [
        Block(name=f"{stack}.{i}", stack=stack, modality=modality, module=layer,
              weights=prunable_weight_names(layer, f"{path}.{i}"), prunable=prunable)
        for i, layer in enumerate(layers)
    ]


# --------------------------------------------------------------------------- causal LMs
class CausalLMAdapter(ModelAdapter):
    """A Hugging Face causal LM; the calibration loss is next-token cross-entropy on text windows."""

    family = "causal_lm"
    default_stacks = ("lm",)

    def __init__(self, model, name, *, tokenizer=None, sample_fn: Callable[[int, int], list[list[int]]] | None = None,
                 seq_len: int = 128, calibration_name: str = "generated", **kw):
        super().__init__(model, name, **kw)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self._sample_fn = sample_fn
        self._calibration_name = calibration_name

    def build_blocks(self) -> list[Block]:
        path, layers = _find_decoder_layers(self.model)
        return _blocks_from_list(path, layers, "lm", "language")

    def calibration_samples(self, n: int, seed: int = 0) -> list[list[int]]:
        """``n`` token windows of ``seq_len`` tokens: from the bundled text when there is one, else generated."""
        if self._sample_fn is not None:
            return self._sample_fn(n, seed)
        return generated_token_windows(n, self.seq_len, self.model.config.vocab_size, seed)

    def collate(self, samples):
        ids = torch.tensor(samples, dtype=torch.long, device=self.input_device())
        return {"input_ids": ids}

    def loss(self, batch):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss

    def low_memory_loss(self, batch):
        """The same next-token loss with the vocabulary head run in checkpointed chunks of tokens
        (``base.chunked_causal_lm_loss``): the (tokens x vocabulary) logits never exist at once."""
        cfg = self.model.config
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
            return self.loss(batch)  # heads that rescale logits: keep the model's own loss
        return chunked_causal_lm_loss(self.model, batch["input_ids"])


def generated_token_windows(n: int, seq_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Token windows from a seeded first-order Markov chain: structured enough that a loss has a signal."""
    g = torch.Generator().manual_seed(seed)
    v = min(vocab, 512)
    # a sparse random transition table: each token has 4 likely successors
    succ = torch.randint(0, v, (v, 4), generator=torch.Generator().manual_seed(1234))
    out = []
    for _ in range(n):
        tok = int(torch.randint(0, v, (1,), generator=g))
        seq = [tok]
        for _ in range(seq_len - 1):
            if torch.rand(1, generator=g).item() < 0.8:
                tok = int(succ[tok, torch.randint(0, 4, (1,), generator=g)])
            else:
                tok = int(torch.randint(0, v, (1,), generator=g))
            seq.append(tok)
        out.append(seq)
    return out


# --------------------------------------------------------------------------- BLIP-2
class Blip2Adapter(ModelAdapter):
    """``Blip2ForConditionalGeneration`` with an OPT, LLaMA-family or Flan-T5 language model.

    Stacks: ``vision`` (ViT layers), ``qformer`` (not pruned by default, as in the paper),
    then ``lm`` for decoder-only LMs or ``text_encoder`` and ``text_decoder`` for T5.
    A calibration sample is ``{"pixel_values": (3, H, W), "prefix_ids": [...], "target_ids": [...]}``;
    the loss is the captioning loss on ``target_ids``. For T5 the prefix goes to the encoder with the
    query tokens and the target is the decoder's label (BLIP-2's prefix-LM split, Sec. 3.3).
    """

    family = "blip2"

    def __init__(self, model, name, *, tokenizer=None, sample_fn: Callable[[int, int], list[dict]] | None = None,
                 calibration_name: str = "generated", **kw):
        super().__init__(model, name, **kw)
        cfg = model.config
        if getattr(cfg, "image_token_index", None) is None:
            raise ValueError(
                f"{name}: config.image_token_index is not set; transformers 5 needs it to place the query "
                "tokens. Set model.config.image_token_index to the id of the processor's image token."
            )
        self.tokenizer = tokenizer
        self._sample_fn = sample_fn
        self._calibration_name = calibration_name
        self.is_t5 = not cfg.use_decoder_only_language_model
        self.default_stacks = ("vision", "text_encoder", "text_decoder") if self.is_t5 else ("vision", "lm")

    @property
    def num_query_tokens(self) -> int:
        return self.model.config.num_query_tokens

    @property
    def pad_id(self) -> int:
        pid = getattr(self.model.config.text_config, "pad_token_id", None)
        return 0 if pid is None else int(pid)

    @property
    def eos_id(self) -> int | None:
        return getattr(self.model.config.text_config, "eos_token_id", None)

    def build_blocks(self) -> list[Block]:
        blocks = _blocks_from_list("vision_model.encoder.layers", self.model.vision_model.encoder.layers, "vision", "vision")
        blocks += _blocks_from_list("qformer.encoder.layer", self.model.qformer.encoder.layer, "qformer", "bridge",
                                    prunable=False)
        lm = self.model.language_model
        if self.is_t5:
            blocks += _blocks_from_list("language_model.encoder.block", lm.encoder.block, "text_encoder", "language")
            blocks += _blocks_from_list("language_model.decoder.block", lm.decoder.block, "text_decoder", "language")
        else:
            path, layers = _find_decoder_layers(lm)
            blocks += _blocks_from_list(f"language_model.{path}", layers, "lm", "language")
        return blocks

    def calibration_samples(self, n: int, seed: int = 0) -> list[dict]:
        if self._sample_fn is not None:
            return self._sample_fn(n, seed)
        return generated_image_text_samples(
            n, seed, image_size=self.model.config.vision_config.image_size,
            vocab=self.model.config.text_config.vocab_size - 1,  # the last id is the image token
        )

    def samples_from_pairs(self, pairs: list[dict], seed: int = 0, *, max_txt_len: int = 32) -> list[dict]:
        """Calibration samples from real image-caption pairs ``[{"image", "caption"[, "id"]}]`` (paths, PIL
        images or preprocessed tensors), with BLIP-2's pretraining losses as LAVIS computes them.

        Captions go through LAVIS's ``blip_caption`` processor. Images go through the model's own
        preprocessing (``models.images.image_transform``: ``adapter.preprocess``, an HF image processor, or
        BLIP-2's eval transform; LAVIS's ``blip2_image_train`` augmentation is left out, so samples are
        deterministic). Text is cut at ``max_txt_len`` tokens (LAVIS's default, 32).

        * Flan-T5 (prefix LM, ``PrefixLanguagePretrainingDataset``): the caption is split at a random
          *character* position ``randint(1, len(caption) // 2)`` (seeded); the prefix goes to the encoder
          after the query tokens, followed by T5's ``</s>``, and the rest is the decoder's target.
        * decoder-only LMs (``blip2_opt``): the caption plus ``"\\n"``, tokenized with the tokenizer's special
          tokens (OPT's BOS), is the target after the query tokens; the prompt is empty as in pretraining.
        """
        from ..data.calibration import blip_caption
        from ..data.formats import load_image
        from ..errors import UserError
        from .images import image_transform as _image_transform

        tok = self.tokenizer
        if tok is None:
            raise UserError(f"{self.name} has no tokenizer: load it from a folder that holds the tokenizer files")
        rng = random.Random(seed)
        transform = None
        out = []
        for p in pairs:
            image = load_image(p["image"])
            if not isinstance(image, torch.Tensor):
                transform = transform or _image_transform(self)
                image = transform(image)
            caption = blip_caption(p["caption"])
            if self.is_t5:
                split = rng.randint(1, max(1, len(caption) // 2))
                eos = [int(self.eos_id)] if self.eos_id is not None else []
                prefix = _encode(tok, caption[:split], special=False)[: max_txt_len - len(eos)] + eos
                target = _encode(tok, caption[split:], special=False)[: max_txt_len - len(eos)]  # collate adds eos
            else:
                prefix, target = [], _encode(tok, caption + "\n", special=True)[:max_txt_len]
            sample = {"pixel_values": image, "prefix_ids": prefix, "target_ids": target, "caption": caption}
            if "id" in p:
                sample["id"] = p["id"]
            out.append(sample)
        return out

    def collate(self, samples: list[dict]) -> dict[str, Any]:
        dev = self.input_device()
        q = self.num_query_tokens
        img = self.model.config.image_token_index
        pixel = torch.stack([s["pixel_values"] for s in samples]).to(dev, self.vision_dtype())
        eos = [self.eos_id] if (self.is_t5 and self.eos_id is not None) else []
        if self.is_t5:
            enc = [[img] * q + list(s["prefix_ids"]) for s in samples]
            tgt = [list(s["target_ids"]) + eos for s in samples]
            ids, mask = _pad(enc, self.pad_id)
            labels, _ = _pad(tgt, -100)
            return {"pixel_values": pixel, "input_ids": ids.to(dev), "attention_mask": mask.to(dev),
                    "labels": labels.to(dev)}
        full = [[img] * q + list(s["prefix_ids"]) + list(s["target_ids"]) for s in samples]
        lab = [[-100] * (q + len(s["prefix_ids"])) + list(s["target_ids"]) for s in samples]
        ids, mask = _pad(full, self.pad_id)
        labels, _ = _pad(lab, -100)
        return {"pixel_values": pixel, "input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev)}

    def vision_dtype(self) -> torch.dtype:
        return self.model.vision_model.embeddings.patch_embedding.weight.dtype

    def loss(self, batch):
        return self.model(**batch, use_cache=False).loss

    def training_loss(self, batch, *, vision_grad: bool = True):
        """``loss`` for a decoder-only LM computed the same way except that the ViT runs without gradients
        unless ``vision_grad`` and the LM head is applied only at the positions that predict a target token
        (``labels != -100``); T5 and LMs without a separate head use :meth:`loss`."""
        model = self.model
        lm = model.language_model
        if self.is_t5 or lm.base_model is lm or lm.get_output_embeddings() is None:
            return self.loss(batch)
        with torch.set_grad_enabled(vision_grad and torch.is_grad_enabled()):
            image = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
        queries = model.qformer(query_embeds=model.query_tokens.expand(image.shape[0], -1, -1),
                                encoder_hidden_states=image,
                                encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long,
                                                                  device=image.device)).last_hidden_state
        visual = model.language_projection(queries.to(image.dtype))
        ids = batch["input_ids"]
        embeds = lm.get_input_embeddings()(ids)
        slots = (ids == model.config.image_token_index).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, visual.to(embeds.dtype))
        hidden = lm.base_model(inputs_embeds=embeds, attention_mask=batch.get("attention_mask"),
                               use_cache=False).last_hidden_state
        target = batch["labels"][:, 1:]
        where = target != -100
        logits = lm.get_output_embeddings()(hidden[:, :-1][where])
        return torch.nn.functional.cross_entropy(logits.float(), target[where])


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=special)
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]


def _pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence; returns (ids, attention mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def generated_image_text_samples(n: int, seed: int, *, image_size: int, vocab: int) -> list[dict]:
    """Seeded synthetic (image, caption) pairs whose caption tokens depend on the image.

    Each image is a coloured pattern from one of 8 classes; the caption is a class-specific
    token sequence, so the captioning loss of a model depends on what its vision side sees.
    """
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    protos = torch.randn(8, 3, image_size, image_size, generator=torch.Generator().manual_seed(77))
    words = torch.randint(2, max(vocab, 3), (8, 6), generator=torch.Generator().manual_seed(78)).tolist()
    out = []
    for _ in range(n):
        c = rng.randrange(8)
        img = protos[c] + 0.5 * torch.randn(3, image_size, image_size, generator=g)
        caption = words[c][: rng.randint(3, 6)]
        split = rng.randint(1, len(caption) - 1)
        out.append({"pixel_values": img, "prefix_ids": caption[:split], "target_ids": caption[split:], "label": c})
    return out
