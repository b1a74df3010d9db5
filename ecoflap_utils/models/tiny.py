"""Tiny randomly initialised models built from configs, for tests and quick runs.

A name always gives the same weights: each builder seeds torch from the name before construction.
Attention is eager (math) so that forward-mode autodiff works on them.
"""
from __future__ import annotations

import zlib

import torch

from .tokenizers import ByteTokenizer, TinyClipTokenizer

TINY_MODELS = ("tiny-llama", "tiny-opt", "tiny-blip2-opt", "tiny-blip2-t5", "tiny-clip")


def _seed_for(name: str) -> int:
    return zlib.crc32(name.encode())


def _llama_config(**over):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)
    cfg.update(over)
    return LlamaConfig(**cfg)


def _opt_config(**over):
    from transformers import OPTConfig

    cfg = dict(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
               max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2, eos_token_id=2,
               do_layer_norm_before=True)
    cfg.update(over)
    return OPTConfig(**cfg)


def _t5_config(**over):
    from transformers import T5Config

    cfg = dict(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_decoder_layers=3, num_heads=4,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=32,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
    cfg.update(over)
    return T5Config(**cfg)


def _blip2_config(text_config):
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    # initializer_range: BLIP-2's vision default (1e-10) assumes pretrained weights; a random tiny model
    # needs ordinary scales, or its vision tower outputs nothing the loss can see
    vision = Blip2VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                               image_size=32, patch_size=8, initializer_range=0.02)
    qformer = Blip2QFormerConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 encoder_hidden_size=48, cross_attention_frequency=1, vocab_size=128,
                                 max_position_embeddings=64)
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                       text_config=text_config.to_dict(), num_query_tokens=4,
                       image_token_index=text_config.vocab_size - 1)


def build_tiny(name: str, *, device="cpu", dtype=torch.float32, weights: str | None = None):
    """Build the tiny model called ``name``; ``weights`` is a ``save_pretrained`` folder to load instead."""
    from .hf import Blip2Adapter, CausalLMAdapter
    from .openclip import CLIPAdapter

    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")
    torch.manual_seed(_seed_for(name))
    if name in ("tiny-llama", "tiny-opt"):
        from transformers import LlamaForCausalLM, OPTForCausalLM

        cls, cfg = (LlamaForCausalLM, _llama_config()) if name == "tiny-llama" else (OPTForCausalLM, _opt_config())
        cfg._attn_implementation = "eager"
        model = cls.from_pretrained(weights, attn_implementation="eager") if weights else cls(cfg)
        model = model.to(device=device, dtype=dtype)
        c = model.config
        tok = ByteTokenizer(c.vocab_size, reserved=0, pad_id=c.pad_token_id, bos_id=c.bos_token_id, eos_id=c.eos_token_id)
        return _attach_eval(CausalLMAdapter(model, name, tokenizer=tok, device=device, dtype=dtype, seq_len=32))
    if name.startswith("tiny-blip2"):
        from transformers import Blip2ForConditionalGeneration

        text = _opt_config(num_hidden_layers=3) if name.endswith("opt") else _t5_config()
        cfg = _blip2_config(text)
        if weights:
            model = Blip2ForConditionalGeneration.from_pretrained(weights, attn_implementation="eager")
        else:
            model = Blip2ForConditionalGeneration._from_config(cfg, attn_implementation="eager")
        model = model.to(device=device, dtype=dtype)
        t = model.config.text_config
        tok = ByteTokenizer(t.vocab_size, reserved=1, pad_id=t.pad_token_id, bos_id=getattr(t, "bos_token_id", None) or 0,
                            eos_id=t.eos_token_id)
        return _attach_eval(Blip2Adapter(model, name, tokenizer=tok, device=device, dtype=dtype))
    # tiny-clip
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=3, width=48, head_width=12, mlp_ratio=2.0, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=128, width=32, heads=4, layers=3, mlp_ratio=2.0),
    )
    if weights:
        from safetensors.torch import load_model

        load_model(model, weights)
    model = model.to(device=device, dtype=dtype)
    return _attach_eval(CLIPAdapter(model, name, tokenizer=TinyClipTokenizer(128, 16), preprocess=tiny_preprocess(32),
                                    device=device, dtype=dtype, arch="tiny-clip"))


def tiny_preprocess(size: int):
    """PIL image -> normalised (3, size, size) tensor, the tiny CLIP's image transform."""
    from torchvision import transforms as T

    return T.Compose([T.Lambda(lambda im: im.convert("RGB")), T.Resize(size), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


TINY_TEXT = (
    "Pruning removes weights from a trained network. A layer-wise pruner compares the weights inside one "
    "layer, while a global view compares whole blocks through the loss of the model. Vision and language "
    "modules of a multimodal model respond differently to the same sparsity. "
)


def tiny_eval_data(adapter, task: str):
    """Generated held-out sets for the tiny models (seed 10_000, disjoint from calibration seeds):
    perplexity text, an 8-class zero-shot set, a VQA set. A random model scores about chance on them."""
    from ..errors import UserError
    from .hf import generated_image_text_samples
    from .openclip import generated_clip_samples

    if task == "perplexity" and adapter.family == "causal_lm":
        return TINY_TEXT * 12
    if task == "zeroshot" and adapter.family == "clip":
        samples = generated_clip_samples(64, 10_000, image_size=adapter.image_size,
                                         context_length=adapter.context_length, vocab=int(adapter.model.vocab_size))
        return {"images": [s["image"] for s in samples], "labels": [s["label"] for s in samples],
                "classnames": [f"pattern {c}" for c in range(8)], "templates": ["a photo of {}.", "{}"]}
    if task in ("vqav2", "caption") and adapter.family == "blip2":
        samples = generated_image_text_samples(32, 10_000, image_size=adapter.model.config.vision_config.image_size,
                                               vocab=adapter.model.config.text_config.vocab_size - 1)
        if task == "caption":
            return [{"image": s["pixel_values"], "references": [f"pattern {s['label']}"]} for s in samples]
        return [{"image": s["pixel_values"], "question": "which pattern is this?", "answers": [str(s["label"])] * 10}
                for s in samples]
    raise UserError(f"{adapter.name} has no bundled set for task {task!r}")


def _attach_eval(adapter):
    import types

    adapter.default_task = {"causal_lm": "perplexity", "clip": "zeroshot", "blip2": "vqav2"}[adapter.family]
    adapter.bundled_eval_data = types.MethodType(tiny_eval_data, adapter)
    return adapter
