"""Saving and loading a pruned model with its configuration; atomic writes of results.

Nothing half-written: files are written to a temporary name and renamed; a run's output directory
is assembled in a temporary sibling folder and moved into place only when complete.
"""
from __future__ import annotations

import csv
import io as _io
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .atomic import read_json, write_json_atomic, write_text_atomic  # noqa: F401 (re-exported)
from .compressed import (SAVE_FORMATS, _save_compressed, check_save_format, decompress_checkpoint,  # noqa: F401
                         disk_usage, sparse_format)
from .errors import UserError

RUN_MARKERS = ("pruning_config.json", "results.json", "resources.json")
REPORT_FIELDS = ("name", "block", "stack", "modality", "params", "target_sparsity", "actual_sparsity")


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output directory that already holds a run (or any files) unless ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory: choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        held = [m for m in RUN_MARKERS if (out / m).exists()]
        what = f"a run ({', '.join(held)})" if held else "files"
        raise UserError(f"output directory {out} already holds {what}: choose another --out or pass --overwrite")
    return out


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out_dir``; on success it replaces ``out_dir``, on error it is removed."""
    out = check_out_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def report_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(REPORT_FIELDS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "open_clip_torch", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:  # pragma: no cover
            pass
    try:
        out["ecoflap_utils"] = md.version("ecoflap_utils")
    except md.PackageNotFoundError:  # pragma: no cover
        out["ecoflap_utils"] = "source"
    return out


def save_pruned(adapter, out_dir: str | os.PathLike, result=None, *, config: Mapping[str, Any] | None = None,
                overwrite: bool = False, format: str = "dense", _inplace: bool = False) -> Path:
    """Write the model's weights, ``pruning_config.json`` and ``sparsity_report.csv`` to ``out_dir``.

    Hugging Face models are written with ``save_pretrained`` (folder ``model/``); CLIP models as
    ``model.safetensors``. ``result`` is the ``PruneResult`` of ``prune``; ``config`` adds keys.
    ``format="compressed"`` stores the pruned layers of a Hugging Face model sparse, in compressed-tensors'
    ``sparse-bitmask`` layout (``sparse-24-bitmask`` for a 2:4 run): see :func:`compress_state_dict`.
    """
    check_save_format(format, family=adapter.family, name=adapter.name)
    if _inplace:
        return _save_into(adapter, Path(out_dir), result, config, format)
    with atomic_dir(out_dir, overwrite) as tmp:
        _save_into(adapter, tmp, result, config, format)
    return Path(out_dir)


def _save_into(adapter, out: Path, result, config, format: str = "dense") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    compression = None
    if adapter.family == "clip":
        from safetensors.torch import save_model

        save_model(adapter.model, str(out / "model.safetensors"))
    else:
        if format == "compressed":
            compression = _save_compressed(adapter, out / "model", result)
        else:
            adapter.model.save_pretrained(out / "model")
        if getattr(adapter, "tokenizer", None) is not None and hasattr(adapter.tokenizer, "save_pretrained"):
            adapter.tokenizer.save_pretrained(out / "model")
    report = result.report if result is not None else []
    cfg = {
        "model": adapter.name,
        "family": adapter.family,
        "dtype": str(adapter.dtype).replace("torch.", ""),
        **(result.config if result is not None else {}),
        "target_sparsity": _weighted(report, "target_sparsity"),
        "actual_sparsity": _weighted(report, "actual_sparsity"),
        "per_layer_sparsity": {r["name"]: r["target_sparsity"] for r in report},
        "versions": library_versions(),
        **(dict(config) if config else {}),
    }
    cfg.pop("compression", None)  # a config copied from a compressed run describes that run's files, not these
    cfg["save_format"] = format
    if compression is not None:
        cfg["compression"] = compression
    write_json_atomic(out / "pruning_config.json", cfg)
    write_text_atomic(out / "sparsity_report.csv", report_csv(report))
    return out


def _weighted(rows, key) -> float | None:
    total = sum(r["params"] for r in rows)
    return round(sum(r[key] * r["params"] for r in rows) / total, 6) if total else None


def load_pruned(out_dir: str | os.PathLike, *, device="cpu", dtype=None):
    """Load a model written by ``save_pruned``: the same adapter, with the pruned weights. This is
    ``models.load_run`` (``load_model(out_dir)`` does the same), which reads both formats: a compressed run is
    decompressed into a temporary dense folder first (``compressed.decompress_checkpoint``)."""
    from .models import load_run

    return load_run(out_dir, device=device, dtype=dtype)
