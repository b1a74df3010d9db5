"""Models spread over several devices by accelerate: where a module runs and where a weight's values live.

``load_model(..., device_map=...)`` hands a model to accelerate (``transformers``' ``from_pretrained`` for
Hugging Face checkpoints, :func:`dispatch` for the other families). accelerate's ``dispatch_model`` gives every
module that holds tensors an ``AlignDevicesHook`` whose ``execution_device`` is where the module computes: its
pre-forward moves the inputs there. A module mapped to ``"cpu"`` next to a GPU is *offloaded*: its parameters
sit on the ``meta`` device between forwards and their values live in the hook's ``weights_map`` (CPU tensors,
copied to the execution device at each forward). So:

* a block's inputs and statistics go to :func:`execution_device` of the block or layer (the device of its
  weights when nothing is offloaded, which is also how locuslab/wanda ``lib/prune.py`` lines 142-144 pick a
  layer's device from ``model.hf_device_map``);
* masks and weight updates are written into :func:`weight_tensor`, the tensor that holds the values (the
  parameter itself, or the offloaded CPU copy that the next forward reads);
* disk offload is refused (:func:`check_device_map`): a weight on disk is read afresh at every forward, so an
  in-place mask would be lost.

Nothing here imports accelerate unless a model uses it.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..errors import UserError

#: the string device maps accelerate computes itself (``load_checkpoint_and_dispatch``)
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks on ``module`` (a ``SequentialHook`` holds several)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _as_device(dev) -> torch.device:
    return dev if isinstance(dev, torch.device) else torch.device(dev)


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: the ``execution_device`` of the first accelerate hook on it or inside it
    (``dispatch_model`` hooks every module that holds tensors, the root with the main device), else the device
    of its first parameter that is not on ``meta``, else the CPU."""
    for m in module.modules():
        for h in _hooks(m):
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return _as_device(dev)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def is_offloaded(model: nn.Module, name: str) -> bool:
    """Whether the parameter ``name`` is offloaded by accelerate (on ``meta`` between forwards)."""
    return model.get_parameter(name).device.type == "meta"


def offloaded_names(model: nn.Module, names: Iterable[str]) -> list[str]:
    return [n for n in names if is_offloaded(model, n)]


def weight_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor that holds the values of parameter ``name``: the parameter, or for a weight accelerate
    offloaded, the CPU tensor in its ``AlignDevicesHook.weights_map`` that the hook copies to the execution
    device at every forward (so an in-place write there is what the next forward computes with). transformers
    finds an offloaded weight the same way to save it (``integrations/accelerate.py``,
    ``load_offloaded_parameter``), so a pruned offloaded model saves its pruned values."""
    p = model.get_parameter(name)
    if p.device.type != "meta":
        return p
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):  # attach_align_device_hook hooks the module that holds the tensor
        mod = model.get_submodule(".".join(parts[:i]))
        for h in _hooks(mod):
            if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
                return _stored(h.weights_map, ".".join(parts[i:]), name)
    raise UserError(f"{name} is on the meta device and no accelerate hook holds its values: load the model with "
                    "its weights (load_model) before pruning or scoring it")


def module_tensor(module: nn.Module, attr: str) -> torch.Tensor | None:
    """The values of ``module``'s own tensor ``attr`` (None when unset): the attribute itself, or for one
    accelerate offloaded, the copy in the ``weights_map`` of the module's own hook (see :func:`weight_tensor`)."""
    t = getattr(module, attr)
    if t is None or t.device.type != "meta":
        return t
    for h in _hooks(module):
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return _stored(h.weights_map, attr, f"{type(module).__name__}.{attr}")
    raise UserError(f"{type(module).__name__}.{attr} is on the meta device and no accelerate hook holds its values: "
                    "load the model with its weights (load_model) before pruning or scoring it")


def _stored(weights_map: Mapping, key: str, name: str) -> torch.Tensor:
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    base, full = weights_map, key
    if isinstance(base, PrefixedDataset):
        base, full = base.dataset, base.prefix + key
    if isinstance(base, OffloadedWeightsLoader) and full not in base.state_dict:
        raise UserError(f"{name} is offloaded to disk, where a mask written in place would be lost: use a device "
                        "map without 'disk' (more max_memory for the GPUs or the CPU)")
    return weights_map[key]


def check_device_map(device_map, offload_folder=None) -> None:
    """Refuse what cannot be pruned in place: disk offload (``"disk"`` in the map, or an ``offload_folder``)."""
    if offload_folder is not None:
        raise UserError(f"offload_folder={str(offload_folder)!r} offloads weights to disk, where pruning cannot write "
                        "its masks: drop it and give the GPUs or the CPU enough max_memory")
    if isinstance(device_map, Mapping):
        disk = [k or "(the whole model)" for k, v in device_map.items() if str(v) == "disk"]
        if disk:
            raise UserError(f"the device map offloads {disk[0]} to disk, where pruning cannot write its masks: map "
                            "it to a GPU or 'cpu' (or give max_memory room for it there)")
    elif isinstance(device_map, str) and device_map == "disk":
        raise UserError("device_map='disk' offloads the model to disk, where pruning cannot write its masks: use "
                        "'auto', a device or a dict without 'disk'")


def block_classes(blocks) -> list[str]:
    """The class names of the adapter's blocks: accelerate never splits one of them over two devices."""
    return sorted({type(b.module).__name__ for b in blocks})


def dispatch(model: nn.Module, device_map, *, no_split: Iterable[str] = (), max_memory: Mapping | None = None,
             dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Spread ``model`` (built on the CPU) over devices with accelerate and return the device map used.

    ``device_map``: a dict ``{module name: device}`` or one of ``auto``, ``balanced``, ``balanced_low_0``,
    ``sequential``, computed as accelerate's ``load_checkpoint_and_dispatch`` does (``get_balanced_memory``
    then ``infer_auto_device_map`` within ``max_memory``, never splitting a class in ``no_split`` nor in
    ``model._no_split_modules``). Then ``dispatch_model`` with ``force_hooks=True``: the hooks are attached
    even when the map names one device, so one code path serves every map; ``nn.MultiheadAttention`` is a
    preload class (it uses ``out_proj.weight`` without calling ``out_proj``, accelerate's documented case). The map is kept as
    ``model.hf_device_map``, as ``from_pretrained`` does. A map that needs disk is refused before anything moves.
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    check_device_map(device_map)
    classes = sorted(set(no_split) | set(getattr(model, "_no_split_modules", None) or ()))
    if isinstance(device_map, str):
        if device_map not in AUTO_MAPS:
            try:
                device_map = {"": torch.device(device_map)}
            except RuntimeError:
                raise UserError(f"device_map {device_map!r} is neither a device nor one of {', '.join(AUTO_MAPS)}: "
                                "pass for example 'auto' or a dict {module name: device}") from None
        else:
            if device_map != "sequential":
                max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=classes,
                                                 dtype=dtype, low_zero=device_map == "balanced_low_0")
            device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=classes,
                                               dtype=dtype)
    elif not isinstance(device_map, Mapping):
        raise UserError(f"device_map must be a dict {{module name: device}} or one of {', '.join(AUTO_MAPS)}, "
                        f"got {device_map!r}")
    device_map = dict(device_map)
    check_device_map(device_map)
    # nn.MultiheadAttention reads out_proj.weight without calling out_proj: an offloaded one loads all its weights
    preload = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.MultiheadAttention)})
    # with no accelerator in the map nothing is offloaded, though dispatch_model warns that "cpu" modules are
    quiet = all(str(v) == "cpu" for v in device_map.values())
    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    try:
        if quiet:
            log.setLevel(logging.ERROR)
        dispatch_model(model, device_map=device_map, force_hooks=True, preload_module_classes=preload or None)
    except ValueError as e:  # an incomplete map (check_device_map of accelerate)
        raise UserError(f"device map: {str(e).splitlines()[0]}") from None
    finally:
        log.setLevel(level)
    model.hf_device_map = device_map
    return device_map


def parse_device_map(text: str | None):
    """``--device-map`` from the command line: ``auto``, ``balanced``, ``balanced_low_0``, ``sequential``, a device
    (``cuda:0``), a JSON object ``{"module": device}`` or the path of a JSON file holding one. ``UserError``
    (one line) for anything else; a disk map is refused by :func:`check_device_map`."""
    import json
    from pathlib import Path

    if text is None:
        return None
    text = str(text).strip()
    if text in ("auto", "balanced", "balanced_low_0", "sequential", "disk") or re.fullmatch(r"(cpu|cuda(:\d+)?|mps|\d+)", text):
        value = text
    else:
        source = Path(text).read_text() if text.endswith(".json") and Path(text).is_file() else text
        try:
            value = json.loads(source)
        except json.JSONDecodeError:
            raise UserError(f"--device-map {text!r} is neither auto/balanced/sequential, a device, a JSON object nor a "
                            "JSON file: write e.g. --device-map auto or '{\"model.layers.0\": 0, \"lm_head\": \"cpu\"}'"
                            ) from None
        if not isinstance(value, dict):
            raise UserError(f"--device-map {text!r} must be a JSON object {{module: device}}, got "
                            f"{type(value).__name__}")
    check_device_map(value)
    return value


def parse_max_memory(text: str | None):
    """``--max-memory`` from the command line: ``0=20GiB,1=20GiB,cpu=64GiB`` (GPU index or ``cpu`` = a size
    accelerate reads) or a JSON object; ``UserError`` (one line) otherwise."""
    import json

    if text is None:
        return None
    text = str(text).strip()
    if text.startswith("{"):
        try:
            pairs = list(json.loads(text).items())
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"--max-memory {text!r} is not a JSON object: write e.g. 0=20GiB,cpu=64GiB") from None
    else:
        pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise UserError(f"--max-memory {text!r} is not DEVICE=SIZE pairs: write e.g. 0=20GiB,cpu=64GiB")
    out = {}
    for k, v in pairs:
        k = str(k).strip()
        if k == "disk":
            raise UserError("--max-memory gives room on disk, where pruning cannot write its masks: name GPUs and cpu")
        if not (k == "cpu" or k.isdigit()):
            raise UserError(f"--max-memory names device {k!r}: use a GPU index (0, 1, ...) or cpu")
        if not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", str(v).strip(), flags=re.I):
            raise UserError(f"--max-memory gives {k} the size {v!r}: write e.g. 20GiB or 64GB")
        out[int(k) if k.isdigit() else k] = str(v).strip()
    return out
