"""Pruned checkpoints in compressed-tensors' sparse layouts (``prune --save-format compressed``): writing,
reading and decompressing them. Imports neither ``io`` nor ``models``, so both can use it."""
from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .atomic import read_json, write_json_atomic
from .errors import UserError

# --------------------------------------------------------------------------- compressed (sparse) checkpoints
# compressed-tensors' sparse layouts, written for the pruned nn.Linear weights of a Hugging Face checkpoint:
#   sparse-bitmask     {p}.compressed (1-D nonzeros, row-major), {p}.bitmask (uint8, rows x ceil(cols/8), bit j of
#                      byte k = column 8k+j), {p}.shape (int64 [rows, cols]), {p}.row_offsets (int64, per row)
#   sparse-24-bitmask  {p}.compressed (rows x cols/2: the 2 kept of every 4), {p}.bitmask, {p}.shape ([[rows], [cols]])
# with p the module name (".weight" dropped) and quantization_config.sparsity_config in config.json. These are the
# layouts of compressed-tensors' BitmaskCompressor / Sparse24BitMaskCompressor, tensor for tensor (checked against
# 0.14.0.1). compressed-tensors >= 0.15 (the only line that installs beside transformers 5) dropped those
# compressors, and transformers >= 5 no longer decompresses a sparsity_config: read these folders with
# load_pruned or decompress_checkpoint. The config classes (BitmaskConfig, Sparse24BitMaskConfig) still ship and
# write the sparsity_config here.
SAVE_FORMATS = ("dense", "compressed")
BITMASK, BITMASK_24 = "sparse-bitmask", "sparse-24-bitmask"
_PARTS = {BITMASK: ("shape", "compressed", "bitmask", "row_offsets"), BITMASK_24: ("shape", "compressed", "bitmask")}
_CLIP_NAMES = ("tiny-clip", "mini-clip")
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def check_save_format(format: str, *, family: str | None = None, name: str | None = None) -> str:
    """Refuse an unknown save format, or ``compressed`` for a model compressed-tensors cannot hold (CLIP)."""
    if format not in SAVE_FORMATS:
        raise UserError(f"unknown save format {format!r}: choose dense (plain safetensors) or compressed "
                        "(compressed-tensors sparse bitmask)")
    if format == "compressed" and (family or _family_of_name(name)) == "clip":
        raise UserError(f"--save-format compressed cannot hold {name or 'this model'}: compressed-tensors stores "
                        "Hugging Face checkpoints and an open_clip CLIP model is not one; use --save-format dense")
    return format


def _family_of_name(name) -> str | None:
    """The family a model name will load as, where the name alone says so (without loading it)."""
    if name is None:
        return None
    name = str(name)
    if name.startswith("open_clip:") or name in _CLIP_NAMES:
        return "clip"
    cfg = Path(name) / "pruning_config.json"
    if cfg.is_file():
        try:
            return json.loads(cfg.read_text()).get("family")
        except (OSError, json.JSONDecodeError):
            return None
    return None


def _pack_bits(keep: torch.Tensor) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))


def _unpack_bits(bits: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.unpackbits(bits.numpy(), axis=-1, count=shape[-1], bitorder="little")
                            .reshape(shape).astype(bool))


def is_24(w: torch.Tensor) -> bool:
    """At most 2 nonzeros in every 4 consecutive weights of each row: what sparse-24-bitmask holds exactly."""
    return w.dim() == 2 and w.shape[1] % 4 == 0 and bool(((w != 0).reshape(-1, 4).sum(1) <= 2).all())


def compress_weight(w: torch.Tensor, format: str = BITMASK) -> dict[str, torch.Tensor]:
    """One 2-D weight in ``format``: local names ``shape``, ``compressed``, ``bitmask`` (and ``row_offsets``)."""
    w = w.detach().cpu()
    rows, cols = w.shape
    if format == BITMASK_24:
        groups = w.reshape(-1, 4)  # the two largest |w| of each 4 are kept, as compressed-tensors' get_24_bytemasks
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
        keep = keep.reshape(rows, cols)
        return {"shape": torch.tensor([rows, cols]).reshape(-1, 1),
                "compressed": w[keep].reshape(rows, cols // 2), "bitmask": _pack_bits(keep)}
    keep = w != 0
    counts = keep.sum(dim=-1)
    return {"shape": torch.tensor([rows, cols]), "compressed": w[keep], "bitmask": _pack_bits(keep),
            "row_offsets": torch.cumsum(counts, 0) - counts}


def decompress_weight(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight back from :func:`compress_weight`'s parts (either format)."""
    shape = [int(x) for x in parts["shape"].flatten().tolist()]
    keep = _unpack_bits(parts["bitmask"], shape)
    values = parts["compressed"].flatten()
    if int(keep.sum()) != values.numel():
        raise UserError(f"a compressed weight of shape {shape} has {values.numel()} values for {int(keep.sum())} "
                        "bitmask entries: the checkpoint is damaged; prune again")
    w = torch.zeros(shape, dtype=values.dtype)
    w[keep] = values
    return w


def compress_state_dict(state_dict: Mapping[str, torch.Tensor], names: Sequence[str],
                        format: str = BITMASK) -> dict[str, torch.Tensor]:
    """``state_dict`` with each weight in ``names`` (``....weight`` of an nn.Linear) replaced by its parts."""
    targets = set(names)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in targets:
            prefix = key[: -len(".weight")]
            out.update({f"{prefix}.{part}": t for part, t in compress_weight(value, format).items()})
        else:
            out[key] = value
    return out


def _save_compressed(adapter, folder: Path, result) -> dict[str, Any]:
    """``save_pretrained`` with the pruned Linear weights stored sparse, and the sparsity_config in config.json."""
    import compressed_tensors
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    model = adapter.model
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    pruned = [r["name"] for r in result.report] if result is not None else adapter.layer_names()
    names = [n for n in dict.fromkeys(pruned) if n in linear]
    state = model.state_dict()
    meta = [n for n in names if state[n].is_meta]
    if meta:
        raise UserError(f"{meta[0]} has no data here (offloaded by a device map): save with --save-format dense, "
                        "or load the model without offloading")
    fmt = BITMASK_24 if names and all(is_24(state[n]) for n in names) else BITMASK
    zeros = sum(int((state[n] == 0).sum()) for n in names)
    total = sum(state[n].numel() for n in names)
    model.save_pretrained(folder, state_dict=compress_state_dict(state, names, fmt))
    config_cls = Sparse24BitMaskConfig if fmt == BITMASK_24 else BitmaskConfig
    sparsity = config_cls(global_sparsity=round(zeros / total, 6) if total else 0.0, targets=["Linear"],
                          ignore=sorted(n[: -len(".weight")] for n in linear - set(names))).model_dump()
    cfg_path = folder / "config.json"
    data = json.loads(cfg_path.read_text())
    data["quantization_config"] = {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
                                   "sparsity_config": sparsity, "transform_config": {}}
    write_json_atomic(cfg_path, data)
    return {"format": fmt, "layers": len(names), "global_sparsity": sparsity["global_sparsity"],
            "layout": "compressed-tensors sparse compressors (<= 0.14.0.1); read with load_pruned"}


def sparse_format(model_dir: str | os.PathLike) -> str | None:
    """``sparse-bitmask`` or ``sparse-24-bitmask`` for a folder written with ``format="compressed"``, else None."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        q = json.loads(path.read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(q, dict) or q.get("quant_method") != "compressed-tensors":
        return None
    fmt = (q.get("sparsity_config") or {}).get("format")
    if fmt in (None, "dense"):
        return None
    if fmt not in _PARTS or q.get("config_groups"):
        raise UserError(f"{path} describes a compressed-tensors checkpoint ({fmt}"
                        f"{', quantized' if q.get('config_groups') else ''}) that load_pruned cannot read: it reads "
                        f"{BITMASK} and {BITMASK_24} without quantization")
    return fmt


def _weight_files(model_dir: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name of a ``save_pretrained`` folder."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return dict(read_json(index)["weight_map"])
    from safetensors import safe_open

    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{model_dir} holds no model.safetensors: the run is incomplete; prune again")
    with safe_open(str(single), framework="pt") as f:
        return {k: single.name for k in f.keys()}


def decompress_checkpoint(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Write ``dest``, a plain dense ``save_pretrained`` folder (what transformers >= 5 and vLLM load), from the
    compressed folder ``src`` (a run's ``model/``): the same tensors bit for bit, the same other files, and
    config.json without its ``quantization_config``. One safetensors shard is decoded at a time."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dest = Path(src), Path(dest)
    fmt = sparse_format(src)
    if fmt is None:
        raise UserError(f"{src} is not a compressed checkpoint (no sparsity_config in its config.json)")
    where = _weight_files(src)
    parts = _PARTS[fmt]
    prefixes = {k[: -len(".compressed")] for k in where if k.endswith(".compressed")}
    dest.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for file in sorted(set(where.values())):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(src / file), framework="pt") as f:
            for key in f.keys():
                prefix, _, part = key.rpartition(".")
                if prefix in prefixes and part in parts:
                    if part == "compressed":
                        got = {}
                        for p in parts:
                            name = f"{prefix}.{p}"
                            if name not in where:
                                raise UserError(f"{src} lacks {name}: the checkpoint is damaged; prune again")
                            if where[name] == file:
                                got[p] = f.get_tensor(name)
                            else:
                                with safe_open(str(src / where[name]), framework="pt") as g:
                                    got[p] = g.get_tensor(name)
                        tensors[f"{prefix}.weight"] = decompress_weight(got)
                    continue
                tensors[key] = f.get_tensor(key)
        save_file(tensors, str(dest / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in tensors})
        del tensors
    index = src / "model.safetensors.index.json"
    if index.is_file():
        meta = dict(read_json(index).get("metadata", {}))
        meta.pop("total_size", None)
        write_json_atomic(dest / index.name, {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))})
    for other in src.iterdir():
        if other.is_file() and other.suffix != ".safetensors" and other.name not in ("config.json", index.name):
            shutil.copy2(other, dest / other.name)
    config = read_json(src / "config.json")
    config.pop("quantization_config", None)
    write_json_atomic(dest / "config.json", config)
    return dest


def disk_usage(run_dir: str | os.PathLike) -> dict[str, Any]:
    """What a run's weights take on disk (``model_bytes``), the bytes of the same tensors stored dense
    (``dense_model_bytes``, headers aside) and their ratio; for ``resources.json``."""
    from safetensors import safe_open

    run = Path(run_dir)
    model = run / "model"
    fmt = sparse_format(model) if model.is_dir() else None
    files = sorted(model.glob("*.safetensors")) if model.is_dir() else sorted(run.glob("*.safetensors"))
    shapes: dict[str, tuple[list[int], str]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                shapes[k] = (list(sl.get_shape()), sl.get_dtype())
    prefixes = {k[: -len(".compressed")] for k in shapes if fmt and k.endswith(".compressed")}
    where = _weight_files(model) if prefixes else {}
    dense = 0
    for k, (shape, dt) in shapes.items():
        prefix, _, part = k.rpartition(".")
        if prefix in prefixes and part in _PARTS[fmt]:
            if part == "compressed":  # the dense weight: rows x cols of the values' dtype
                with safe_open(str(model / where[f"{prefix}.shape"]), framework="pt") as f:
                    shape = [int(x) for x in f.get_tensor(f"{prefix}.shape").flatten().tolist()]
                dense += math.prod(int(d) for d in shape) * _ST_BYTES.get(dt, 4)
            continue
        dense += math.prod(int(d) for d in shape) * _ST_BYTES.get(dt, 4)
    stored = sum(f.stat().st_size for f in files)
    total = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    return {"save_format": "compressed" if fmt else "dense", "sparse_format": fmt, "model_bytes": stored,
            "dense_model_bytes": dense, "ratio_to_dense": round(stored / dense, 4) if dense else None,
            "run_bytes": total}


# --------------------------------------------------------------------------- transformers, inside a ``with``
#: the parts of one pruned weight in the bitmask layouts, as the ends of checkpoint keys (regular expressions)
_PART_PATTERNS = {rf"\.{part}$": part for part in ("compressed", "bitmask", "shape", "row_offsets")}


@contextmanager
def transformers_reads_sparse():
    """Inside the ``with``, ``transformers``' ``from_pretrained`` reads a ``--save-format compressed`` folder back to
    exactly the pruned weights.

    transformers 5 hands a ``sparsity_config`` to compressed-tensors, which since 0.15 keeps only quantization
    (``compressed_tensors/compressors/model_compressors/model_compressor.py`` ``from_compression_config``), so the
    ``.compressed/.bitmask/.shape`` parts are left unexpected and the weights re-initialised. This registers, for
    the ``with`` only, one many-to-one weight converter in transformers' own checkpoint-conversion registry
    (``transformers.conversion_mapping.register_checkpoint_conversion_mapping``, its "legacy" list, which every model
    gets) that rebuilds each ``weight`` from its parts with :func:`decompress_weight`; the registry is put back on
    exit. Those are transformers 5 internals (tested with 5.25): ``tests/test_compressed.py`` pins the behaviour.
    vLLM and processes without this package still need :func:`decompress_checkpoint`.
    """
    from transformers import conversion_mapping as cm
    from transformers.core_model_loading import ConversionOps, WeightConverter

    class Decompress(ConversionOps):
        def convert(self, input_dict, source_patterns, target_patterns, full_layer_name=None, **kwargs):
            parts = {}
            for pattern, value in input_dict.items():
                parts[_PART_PATTERNS[pattern]] = value[0] if isinstance(value, list) else value
            if not {"compressed", "bitmask", "shape"} <= parts.keys():
                raise ValueError(f"{full_layer_name}: sparse-bitmask parts missing, found {sorted(parts)}")
            if parts["bitmask"].is_floating_point() or parts["shape"].is_floating_point():
                raise ValueError(f"{full_layer_name}: the bitmask parts were cast on loading")
            dense = decompress_weight({k: v.cpu() for k, v in parts.items()})
            return {full_layer_name: dense.to(parts["compressed"].device)}

    class LoadOnly(WeightConverter):
        def was_used(self) -> bool:  # not recorded on the model: save_pretrained writes plain dense weights
            return False

    before = cm.get_checkpoint_conversion_mapping("legacy")
    converter = LoadOnly(source_patterns=list(_PART_PATTERNS), target_patterns=".weight", operations=[Decompress()])
    cm.register_checkpoint_conversion_mapping("legacy", list(before or []) + [converter], overwrite=True)
    try:
        yield
    finally:
        cm.register_checkpoint_conversion_mapping("legacy", list(before or []), overwrite=True)
