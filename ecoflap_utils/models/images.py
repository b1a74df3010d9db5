"""A model's own image preprocessing, shared by evaluation, calibration and fine-tuning.

``image_transform(adapter)`` is the adapter's ``preprocess`` (open_clip, bundled models), its Hugging Face
``image_processor``, or BLIP-2's evaluation transform (bicubic resize to the vision tower's size, OpenAI
CLIP's mean and std, as ``BlipImageProcessor`` does); ``image_batch`` stacks images on the model's image
device and dtype.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..data import formats
from ..errors import UserError

# BLIP-2's image processor normalises with OpenAI CLIP's statistics.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _first_float_param(module: torch.nn.Module) -> torch.nn.Parameter | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p
    return None


def _image_device_dtype(adapter) -> tuple[torch.device, torch.dtype]:
    """Where the image side of the model lives and which dtype its inputs need."""
    if hasattr(adapter, "vision_dtype"):
        return adapter.input_device(), adapter.vision_dtype()
    model = adapter.model
    p = _first_float_param(getattr(model, "visual", model))
    p = p if p is not None else _first_float_param(model)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, p.dtype


def image_transform(adapter):
    """PIL -> tensor: the adapter's ``preprocess``, its HF ``image_processor``, or BLIP-2's transform."""
    pre = getattr(adapter, "preprocess", None)
    if pre is not None:
        return pre
    proc = getattr(adapter, "image_processor", None)
    if proc is not None:
        return lambda im: proc(images=im, return_tensors="pt")["pixel_values"][0]
    cfg = getattr(getattr(adapter.model, "config", None), "vision_config", None)
    if cfg is None:
        raise UserError(f"{adapter.name} has no image transform (adapter.preprocess): pass preprocessed tensors")
    from torchvision import transforms as T

    size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
    return T.Compose([T.Lambda(lambda im: im.convert("RGB")),
                      T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
                      T.ToTensor(), T.Normalize(_CLIP_MEAN, _CLIP_STD)])


_image_transform = image_transform


def image_batch(adapter, images: Sequence[Any]) -> torch.Tensor:
    """Stack images (paths, PIL images or preprocessed tensors) on the model's image device and dtype."""
    transform = None
    out = []
    for im in images:
        im = formats.load_image(im)
        if not isinstance(im, torch.Tensor):
            transform = transform or image_transform(adapter)
            im = transform(im)
        out.append(im)
    device, dtype = _image_device_dtype(adapter)
    return torch.stack(out).to(device=device, dtype=dtype)
