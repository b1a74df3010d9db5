"""Per-layer calibration statistics shared by the fine stage (Wanda, SparseGPT) and OWL's outlier ratios.

A forward pass inside :func:`input_statistics` accumulates, for every named weight, what its matmul
sees: the sum of squares of each input feature (Wanda's ||X_j||_2^2, Sun et al. 2024, Eq. 1) and, for
SparseGPT, X^T X (Frantar & Alistarh 2023, Sec. 3). Neither stage owns these numbers: ``prune`` (fine
stage) and ``scores.owl_outlier_ratios`` (coarse stage) both read them from here.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .capture import StopForward, hooks
from .errors import CalibrationError, UserError
from .models.base import to_device
from .models.devices import execution_device, module_tensor


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's importance |W_ij| * ||X_j||_2 (Sun et al., 2024, Eq. 1), in float32, on the device of ``sq_norms``
    (where the statistics were gathered; an offloaded weight is brought there)."""
    return weight.detach().to(sq_norms.device).float().abs() * sq_norms.float().sqrt().unsqueeze(0)


class _Stats:
    """Per-layer calibration statistics: sum of squares per input feature (Wanda) or X^T X (SparseGPT).

    Plain float32 sums over the calibration tokens. The reference codes keep float32 running means instead:
    Wanda's ``scaler_row`` (locuslab/wanda ``lib/layerwrapper.py`` L31-35) and SparseGPT's H, rescaled by
    n/(n+b) and fed sqrt(2/n)-scaled inputs (IST-DASLab/sparsegpt ``sparsegpt.py`` L43-46). A positive scale
    changes neither Wanda's ranking nor SparseGPT's masks and updates (its damping is relative to mean diag H),
    only the rounding. Across thread counts these sums were bit-identical when their inputs were (mini-blip2's
    ViT at 1 vs 2 threads); ``prune`` runs them at one thread anyway (``prune``'s ``threads``)."""

    def __init__(self, name: str, cols: int, kind: str, device):
        self.name, self.kind, self.tokens = name, kind, 0
        self.sq = torch.zeros(cols, dtype=torch.float32, device=device)
        self.H = torch.zeros(cols, cols, dtype=torch.float32, device=device) if kind == "sparsegpt" else None

    def add(self, x: torch.Tensor, memo: dict | None = None) -> None:
        """Add the inputs ``x`` (..., cols). ``memo``: one entry shared by the hooks of one ``input_statistics``;
        layers fed the very same tensor (a LLaMA block's q/k/v, gate/up) add the sums computed for the first of
        them, so X^T X is formed once per input, not once per layer. The sums added are the same numbers."""
        key = (self.sq.device, self.H is not None)
        if memo is not None and x.is_inference():  # no version counter to tell an in-place change: no sharing
            memo = None
        if memo is not None and memo.get("x") is x and memo["version"] == x._version and memo["key"] == key:
            tokens, sq, H = memo["sums"]
        else:
            flat = x.detach().reshape(-1, x.shape[-1]).float().to(self.sq.device)
            tokens, sq = flat.shape[0], (flat * flat).sum(0)
            if not torch.isfinite(sq).all():  # a NaN or an infinity anywhere in x reaches its column's sum
                raise CalibrationError(
                    f"non-finite activations reach {self.name} during calibration; run in float32 "
                    "(--dtype float32) or check the calibration data"
                )
            H = flat.T @ flat if self.H is not None else None
            if memo is not None:  # holding x keeps its memory from being reused by another tensor meanwhile
                memo.update(x=x, version=x._version, key=key, sums=(tokens, sq, H))
        self.tokens += tokens
        self.sq += sq
        if self.H is not None:
            self.H += H


def _mha_attention_input(mha: nn.MultiheadAttention, args, kwargs) -> torch.Tensor:
    """What ``mha.out_proj`` sees: attention output before the output projection.

    ``nn.MultiheadAttention`` applies ``out_proj.weight`` inside a functional call, so a hook on
    ``out_proj`` never fires; we recompute the attention with an identity output projection. On a model
    accelerate dispatched, this runs before accelerate's own hook: the inputs are moved to the module's
    execution device here, and an offloaded projection is read from where its values live
    (``devices.module_tensor``).
    """
    dev = execution_device(mha)
    names = ("query", "key", "value")
    q, k, v = (to_device(args[i] if len(args) > i else kwargs.get(n), dev) for i, n in enumerate(names))
    if mha.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    w = {a: to_device(module_tensor(mha, a), dev) for a in ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v",
                                                            "q_proj_weight", "k_proj_weight", "v_proj_weight")}
    eye = torch.eye(mha.embed_dim, dtype=q.dtype, device=q.device)
    attn_mask, padding = (to_device(kwargs.get(a), dev) for a in ("attn_mask", "key_padding_mask"))
    out, _ = F.multi_head_attention_forward(
        q, k, v, mha.embed_dim, mha.num_heads, w["in_proj_weight"], w["in_proj_bias"], w["bias_k"], w["bias_v"],
        mha.add_zero_attn, 0.0, eye, None, training=False, key_padding_mask=padding,
        need_weights=False, attn_mask=attn_mask, is_causal=kwargs.get("is_causal", False) and attn_mask is None,
        use_separate_proj_weight=not mha._qkv_same_embed_dim, q_proj_weight=w["q_proj_weight"],
        k_proj_weight=w["k_proj_weight"], v_proj_weight=w["v_proj_weight"])
    return out


def input_tap(model: nn.Module, weight_name: str) -> tuple[nn.Module, Callable]:
    """The module to hook and a function (args, kwargs) -> the input of ``weight_name``'s matmul."""
    owner_name, _, attr = weight_name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if isinstance(owner, nn.MultiheadAttention):
        pos = {"in_proj_weight": 0, "q_proj_weight": 0, "k_proj_weight": 1, "v_proj_weight": 2}[attr]
        key = ("query", "key", "value")[pos]
        return owner, lambda a, kw: a[pos] if len(a) > pos else kw[key]
    parent_name, _, child = owner_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return parent, lambda a, kw: _mha_attention_input(parent, a, kw)
    if isinstance(owner, nn.Linear) and attr == "weight":
        return owner, lambda a, kw: a[0] if a else kw["input"]
    raise UserError(f"{weight_name} is not a weight this pruner knows how to feed (Linear or MultiheadAttention)")


@contextmanager
def input_statistics(model: nn.Module, names: Sequence[str], kind: str = "wanda", *,
                     stop_when_seen: bool = False) -> Iterator[dict[str, _Stats]]:
    """Within the ``with``, every forward accumulates the inputs of each weight in ``names`` into its
    :class:`_Stats` (``kind`` "wanda": squared norms per input feature; "sparsegpt": also X^T X).
    Yields {name: _Stats}; the hooks are removed on exit, also on error.

    ``stop_when_seen``: once every weight in ``names`` has seen its input, the forward is cut short by raising
    ``capture.StopForward`` (the caller catches it), so what comes after the last of them is never computed: in
    the fine stage's statistics pass over a block, whose output is thrown away, that is the last layer's matmul
    (``down_proj``, a quarter of a LLaMA block) and anything after it. Each weight must be called once per pass.

    Each weight's statistics live where its matmul runs (``devices.execution_device`` of the hooked module):
    on a model accelerate spread over devices that is the weight's own device, or the GPU an offloaded
    weight is copied to at each forward, so the inputs never travel to be counted."""
    stats: dict[str, _Stats] = {}
    pending, memo = set(names), {}

    def seen(name: str) -> None:
        pending.discard(name)
        if not pending:
            pending.update(names)
            raise StopForward

    with ExitStack() as es:
        for w in names:
            mod, get = input_tap(model, w)
            param = model.get_parameter(w)
            st = stats[w] = _Stats(w, param.shape[1], kind, execution_device(mod))

            def hook(m, a, kw, st=st, get=get, w=w):
                st.add(get(a, kw), memo)
                if stop_when_seen:
                    seen(w)
            es.enter_context(hooks(mod.register_forward_pre_hook(hook, with_kwargs=True)))
        yield stats
