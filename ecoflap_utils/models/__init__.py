"""Model adapters and ``load_model``: one adapter per family, found by name.

Names:
* ``tiny-llama``, ``tiny-opt``, ``tiny-blip2-opt``, ``tiny-blip2-t5``, ``tiny-clip``: seeded random tiny models;
* bundled defaults registered in ``ecoflap_utils.zoo`` (for example ``smollm2-135m``);
* ``open_clip:ARCH/PRETRAINED`` (``PRETRAINED`` may be a local weights file);
* any Hugging Face id or local folder of a BLIP-2 or causal LM checkpoint;
* a folder written by ``save_pruned`` (it holds ``pruning_config.json``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ModelNotAvailable, UserError
from .base import Block, ModelAdapter, prunable_weight_names
from .devices import block_classes, check_device_map, dispatch
from .tiny import TINY_MODELS, build_tiny

__all__ = ["Block", "ModelAdapter", "load_model", "load_run", "prunable_weight_names", "TINY_MODELS", "known_models"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose float32, float16 or bfloat16")
    return DTYPES[dtype]


def _bundled() -> dict:
    try:
        from ..zoo import BUNDLED
    except ImportError:  # pragma: no cover
        return {}
    return BUNDLED


def known_models() -> list[str]:
    return list(TINY_MODELS) + list(_bundled())


def load_model(name: str, *, device: str | torch.device = "cpu", dtype="float32", device_map=None,
               max_memory: dict | None = None, weights: str | None = None, **kwargs) -> ModelAdapter:
    """Load a model by name and return its adapter (see the module docstring for names).

    ``weights`` points at a ``save_pretrained`` folder (or a safetensors file for CLIP) to load instead
    of the named model's own weights. ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict
    ``{module name: device}``) spreads the model over devices with accelerate, within ``max_memory``
    (``{0: "20GiB", "cpu": "60GiB"}``): Hugging Face checkpoints through ``from_pretrained``, the other
    families through :func:`devices.dispatch`, which never splits a block. Modules mapped to ``"cpu"`` next to
    a GPU are offloaded (run on the GPU, weights kept in CPU memory). ``prune``, the coarse stage and
    ``finetune`` work on the result (``models.devices``); disk offload is refused.
    """
    device_map = device_map or None
    check_device_map(device_map, kwargs.pop("offload_folder", None))
    if device_map is None and max_memory is not None:
        raise UserError("max_memory bounds what a device map puts on each device: give device_map='auto' with it")
    dtype = parse_dtype(dtype)
    name = str(name)
    if name in TINY_MODELS:
        return _dispatched(build_tiny(name, device="cpu" if device_map else device, dtype=dtype, weights=weights),
                           device_map, max_memory)
    if name in _bundled():
        adapter = _bundled()[name](device="cpu" if device_map else device, dtype=dtype, weights=weights, **kwargs)
        return _dispatched(adapter, device_map, max_memory)
    if os.path.isdir(name) and (Path(name) / "pruning_config.json").exists():
        return load_run(name, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory)
    if name.startswith("open_clip:"):
        return _dispatched(_load_open_clip(name, device="cpu" if device_map else device, dtype=dtype, weights=weights),
                           device_map, max_memory)
    if "/" in name or os.path.isdir(name):
        return _load_hf(name, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory,
                        weights=weights)
    raise UserError(
        f"unknown model {name!r}: use one of {', '.join(known_models())}, a Hugging Face id such as "
        "Salesforce/blip2-flan-t5-xl, open_clip:ViT-B-16/openai, or a local folder"
    )


def _dispatched(adapter: ModelAdapter, device_map, max_memory) -> ModelAdapter:
    """``adapter`` with its model spread by :func:`devices.dispatch` (blocks kept whole), when a map is given."""
    if device_map is not None:
        dispatch(adapter.model, device_map, no_split=block_classes(adapter.blocks), max_memory=max_memory,
                 dtype=adapter.dtype)
    return adapter


def load_run(folder: str | os.PathLike, *, device: str | torch.device = "cpu", dtype=None, device_map=None,
             max_memory: dict | None = None) -> ModelAdapter:
    """Load a run folder written by ``io.save_pruned`` (it holds ``pruning_config.json``): the same adapter,
    with the run's weights, and ``adapter.pruning_config`` set. ``io.load_pruned`` is this function.
    ``device_map`` and ``max_memory`` spread it over devices as in :func:`load_model`."""
    import json

    out = Path(folder)
    cfg_path = out / "pruning_config.json"
    if not cfg_path.is_file():
        raise UserError(f"{out} holds no pruning_config.json: pass a folder written by prune (or save_pruned)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e}): the run is damaged; prune again") from None
    weights = out / ("model.safetensors" if cfg.get("family") == "clip" else "model")
    if not weights.exists():
        raise UserError(f"{out} has pruning_config.json but no {weights.name}: the run is incomplete; prune again")
    kw = dict(device=device, dtype=dtype or cfg.get("dtype", "float32"), device_map=device_map, max_memory=max_memory)
    from ..compressed import decompress_checkpoint, sparse_format

    if cfg.get("family") != "clip" and sparse_format(weights):  # --save-format compressed: decompressed first
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ecoflap-dense-") as tmp:
            adapter = load_model(cfg["model"], weights=str(decompress_checkpoint(weights, Path(tmp) / "model")), **kw)
        adapter.source = str(weights)
    else:
        adapter = load_model(cfg["model"], weights=str(weights), **kw)
    adapter.pruning_config = cfg
    return adapter


def _not_available(name: str, err: Exception) -> ModelNotAvailable:
    return ModelNotAvailable(
        f"cannot load {name!r} here ({type(err).__name__}: {str(err).splitlines()[0][:160]}). "
        f"Without hub access, download it elsewhere (huggingface-cli download {name} --local-dir DIR) "
        "and pass the folder DIR as the model name, or set HF_HOME to a cache that holds it"
    )


def _hf_config(name: str):
    """Read the config of a local folder or hub id, failing fast when neither is reachable."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception as local_err:  # not cached here
        if os.path.isdir(name) or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise _not_available(name, local_err) from None
    import huggingface_hub

    try:
        path = huggingface_hub.hf_hub_download(name, "config.json", etag_timeout=10)
    except Exception as err:
        raise _not_available(name, err) from None
    return AutoConfig.from_pretrained(os.path.dirname(path))


def _load_hf(name, *, device, dtype, device_map, weights, max_memory=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Blip2ForConditionalGeneration

    from .hf import Blip2Adapter, CausalLMAdapter

    source = weights or name
    cfg = _hf_config(source)
    kw = dict(dtype=dtype)
    if device_map:
        kw["device_map"] = device_map
        if max_memory is not None:
            kw["max_memory"] = max_memory
    try:
        if cfg.model_type in ("blip-2", "blip_2"):
            model = Blip2ForConditionalGeneration.from_pretrained(source, **kw)
            if getattr(model.config, "image_token_index", None) is None:
                model.config.image_token_index = model.config.text_config.vocab_size - 1
            cls = Blip2Adapter
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kw)
            cls = CausalLMAdapter
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except Exception:
            tok = None
    except ModelNotAvailable:
        raise
    except OSError as err:
        raise _not_available(name, err) from None
    except ValueError as err:
        if device_map and "disk" in str(err).lower():  # the map transformers computed needs disk offload
            raise UserError(f"device_map={device_map!r} needs disk offload for {name}, where pruning cannot write its "
                            "masks: raise max_memory for the GPUs or the CPU") from None
        raise
    if device_map:
        check_device_map(getattr(model, "hf_device_map", None))
    if not device_map:
        model = model.to(device)
    return cls(model, name, tokenizer=tok, device=device, dtype=dtype, source=source)


def _open_clip_weights(arch: str, pretrained: str) -> str:
    """A local file for ``pretrained``: the path itself, the hub cache, or a download (bounded wait)."""
    import huggingface_hub
    import open_clip

    if os.path.isfile(pretrained):
        return pretrained
    cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not cfg or not cfg.get("hf_hub"):
        raise UserError(f"open_clip has no pretrained weights {pretrained!r} for {arch}; "
                        "see open_clip.list_pretrained(), or pass a local weights file")
    repo, filename = os.path.split(cfg["hf_hub"].rstrip("/") + ("/" if cfg["hf_hub"].endswith("/") else ""))
    files = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    last: Exception = FileNotFoundError(f"{repo} is not in the local cache")
    for local_only in ((True,) if offline else (True, False)):
        for f in files:
            try:
                return huggingface_hub.hf_hub_download(repo, f, local_files_only=local_only, etag_timeout=10)
            except Exception as err:  # not cached, or no network
                last = err
    raise last


def _load_open_clip(name, *, device, dtype, weights):
    import open_clip

    from .openclip import CLIPAdapter

    spec = name[len("open_clip:"):]
    arch, _, pretrained = spec.partition("/")
    if arch not in open_clip.list_models():
        raise UserError(f"unknown open_clip architecture {arch!r} in {name!r}; see open_clip.list_models()")
    try:
        if weights:
            model = open_clip.create_model(arch, pretrained=None)
            from safetensors.torch import load_model as load_st

            load_st(model, weights)
            preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
        else:
            path = _open_clip_weights(arch, pretrained) if pretrained else None
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=path)
    except Exception as err:
        if isinstance(err, UserError):
            raise
        raise ModelNotAvailable(
            f"cannot load {name!r} here ({type(err).__name__}: {str(err).splitlines()[0][:160]}). Without hub "
            f"access, download the weights elsewhere and pass open_clip:{arch}/PATH/TO/open_clip_model.safetensors"
        ) from None
    model = model.to(device=device, dtype=dtype)
    return CLIPAdapter(model, name, tokenizer=open_clip.get_tokenizer(arch), preprocess=preprocess, device=device,
                       dtype=dtype, arch=arch)
