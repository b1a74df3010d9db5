"""Bundled CPU models that run offline: ``smollm2-135m``, ``mini-clip``, ``mini-blip2``.

Each entry is a loader ``load(device="cpu", dtype=torch.float32, weights=None, **kw) -> ModelAdapter``,
imported only when asked for. Pretrained language models come from their packages; only what was
trained here ships under ``data/`` (see data/README.md).
"""
from __future__ import annotations

import importlib

_LOADERS = {
    "smollm2-135m": "ecoflap_utils.zoo.smollm:load",
    "mini-clip": "ecoflap_utils.zoo.miniclip:load",
    "mini-blip2": "ecoflap_utils.zoo.miniblip2:load",
}


def _lazy(spec: str):
    def load(**kw):
        mod, _, fn = spec.partition(":")
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            from ..errors import ModelNotAvailable

            raise ModelNotAvailable(f"bundled model loader {mod} is not available ({e})") from None
        return getattr(module, fn)(**kw)

    return load


BUNDLED = {name: _lazy(spec) for name, spec in _LOADERS.items()}
