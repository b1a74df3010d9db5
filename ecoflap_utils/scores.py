"""Coarse stage: one global importance score per group of weights, from the whole model's loss.

ECoFLaP Sec. 3.2. The zeroth-order score of a group is the two-point estimate of a directional
derivative of the calibration loss, g_hat = (L(W + eps z) - L(W - eps z)) / (2 eps), with seeded
Gaussian z, accumulated as |g_hat| over batches (E|z . g| = sqrt(2/pi) ||g||_2, so it tracks the
group's gradient norm) — no backward pass, the memory of a forward pass.

How this is faster than the paper's code without changing the estimator:
* *cached prefixes*: the dense outputs of every block are computed once per batch; a perturbed
  forward replaces every block before the perturbed one by its cached output, so it runs only
  from the perturbed block onwards (perturbing the language model never reruns the vision encoder);
* ``perturb="group"`` perturbs all of a group's tensors at once: one estimate per group per batch
  instead of one per tensor (``perturb="tensor"`` is the paper's per-tensor estimator).

z is regenerated from its seed, never stored (the MeZO trick), and W is restored exactly from a
copy of the one tensor or group being perturbed, so after scoring the weights are bit-identical.
"""
from __future__ import annotations

import math
import zlib
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from tqdm.auto import tqdm

from .capture import hooks, replaced_forward
from .errors import CalibrationError, UserError
from .models.base import Block, ModelAdapter

SCORE_METHODS = ("zeroth", "first", "jvp", "magnitude")
GRANULARITIES = ("layer", "block", "module")
PERTURBS = ("tensor", "group")
FIRST_ORDER_VARIANTS = ("grad", "weight_grad", "grad_norm")


# --------------------------------------------------------------------------- groups
def score_groups(adapter: ModelAdapter, granularity: str = "block", stacks: Sequence[str] | None = None
                 ) -> dict[str, list[str]]:
    """``{group: [weight names]}`` in model order: one per weight (``layer``), per block, or per stack (``module``)."""
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    blocks = adapter.pruned_blocks(stacks)
    groups: dict[str, list[str]] = {}
    for b in blocks:
        if granularity == "layer":
            for w in b.weights:
                groups[w] = [w]
        elif granularity == "block":
            groups[b.name] = list(b.weights)
        else:
            groups.setdefault(b.stack, []).extend(b.weights)
    return groups


def group_info(adapter: ModelAdapter, groups: Mapping[str, Sequence[str]]) -> dict[str, dict[str, Any]]:
    """Size (weights), stack and modality of each group."""
    block_of = adapter.block_of()
    out = {}
    for g, ws in groups.items():
        b = block_of[ws[0]]
        stacks = sorted({block_of[w].stack for w in ws})
        out[g] = {"size": sum(adapter.model.get_parameter(w).numel() for w in ws),
                  "stack": stacks[0] if len(stacks) == 1 else ",".join(stacks), "modality": b.modality}
    return out


# --------------------------------------------------------------------------- cached prefixes
class PrefixCache:
    """Start a forward pass at any block, holding one hidden state per batch (not one per block).

    One dense forward per batch records how every block is called and the *shape* of what it
    returns (a tensor, or a tuple such as T5's ``(hidden, position_bias, ...)``), plus the full
    output of the last block of each stack (what later stacks read). ``advance(b)`` replays blocks
    densely until ``hidden[batch]`` is the input of block ``b``. Inside ``prefix(batch, b)`` every block
    before ``b`` returns instead of computing: the block just before ``b`` returns the dense output
    (which is block ``b``'s input), the others a stand-in of the right structure that the next stubbed
    block ignores. Blocks must be visited in model order (``b`` never decreases).
    """

    def __init__(self, adapter: ModelAdapter, batches: Sequence[dict]):
        from .capture import Call

        self.adapter = adapter
        self.blocks = adapter.blocks
        n = len(self.blocks)
        self.stack_start = [i == 0 or self.blocks[i].stack != self.blocks[i - 1].stack for i in range(n)]
        self.stack_last = [i == n - 1 or self.blocks[i].stack != self.blocks[i + 1].stack for i in range(n)]
        self.calls: list[list[Any]] = []
        self.shape: list[list[Any]] = []  # output with the hidden states removed
        self.last_out: list[dict[int, Any]] = []
        for batch in batches:
            calls: list[Any] = [None] * n
            shapes: list[Any] = [None] * n
            lasts: dict[int, Any] = {}

            def pre(i):
                def hook(module, args, kwargs):
                    c = Call(tuple(args), dict(kwargs))
                    calls[i] = c if self.stack_start[i] else c.without_hidden()
                return hook

            def post(i):
                def hook(module, args, output):
                    if self.stack_last[i]:
                        lasts[i] = output
                    shapes[i] = (None,) + tuple(output[1:]) if isinstance(output, tuple) else None
                return hook

            with ExitStack() as es:
                for i, b in enumerate(self.blocks):
                    es.enter_context(hooks(b.module.register_forward_pre_hook(pre(i), with_kwargs=True)))
                    es.enter_context(hooks(b.module.register_forward_hook(post(i))))
                with torch.no_grad():
                    adapter.forward(batch)
            self.calls.append(calls)
            self.shape.append(shapes)
            self.last_out.append(lasts)
        self.pos = 0
        self.hidden = [c[0].hidden() for c in self.calls]  # input of block self.pos, per batch

    def advance(self, block: int) -> None:
        from .capture import first_output, run_block

        if block < self.pos:
            raise RuntimeError(f"PrefixCache visits blocks in model order; asked for {block} after {self.pos}")
        while self.pos < block:
            i = self.pos
            nxt = i + 1
            for bi in range(len(self.calls)):
                if nxt < len(self.blocks) and self.stack_start[nxt]:
                    self.hidden[bi] = self.calls[bi][nxt].hidden()
                else:
                    with torch.no_grad():
                        self.hidden[bi] = first_output(run_block(self.blocks[i], self.calls[bi][i], self.hidden[bi]))
            self.pos = nxt

    def _stand_in(self, bi: int, j: int) -> Any:
        if self.stack_last[j]:
            return self.last_out[bi][j]
        shape = self.shape[bi][j]
        return self.hidden[bi] if shape is None else (self.hidden[bi],) + shape[1:]

    @contextmanager
    def prefix(self, batch_index: int, first_block: int) -> Iterator[None]:
        self.advance(first_block)
        with ExitStack() as es:
            for j in range(first_block):
                out = self._stand_in(batch_index, j)
                es.enter_context(replaced_forward(self.blocks[j].module, lambda *a, _o=out, **k: _o))
            yield


def _first_block_index(adapter: ModelAdapter, weights: Sequence[str]) -> int:
    block_of = adapter.block_of()
    names = [b.name for b in adapter.blocks]
    return min(names.index(block_of[w].name) for w in weights)


# --------------------------------------------------------------------------- noise
def _noise_seed(seed: int, batch: int, unit: int, k: int) -> int:
    return zlib.crc32(f"{seed}/{batch}/{unit}/{k}".encode())


def _noise(shape, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32, device="cpu").to(device)


def unit_noise(params: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """The Gaussian direction for a perturbation unit, regenerated from its seed (float32)."""
    gen = torch.Generator().manual_seed(seed)
    return [_noise(p.shape, gen, p.device) for p in params]


@contextmanager
def perturbed(params: Sequence[torch.Tensor], seed: int, scale: float) -> Iterator[None]:
    """Set W <- W + scale * z in place (z from ``seed``); restore W bit-exactly from a copy on exit."""
    saved = [p.detach().clone() for p in params]
    try:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p, w0 in zip(params, saved):
                p.copy_((w0.float() + scale * _noise(p.shape, gen, p.device)).to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, w0 in zip(params, saved):
                p.copy_(w0)


# --------------------------------------------------------------------------- scores
def compute_scores(adapter: ModelAdapter, method: str = "zeroth", calibration: Sequence[Any] | None = None, *,
                   granularity: str = "block", eps: float = 1e-3, num_noise: int = 1, seed: int = 0,
                   aggregate: str = "sum", perturb: str = "group", samples: int = 32, batch_size: int = 8,
                   stacks: Sequence[str] | None = None, variant: str = "grad", cache: bool = True,
                   units: Sequence[int] | None = None, per_batch: list | None = None,
                   progress: bool | None = None) -> dict[str, float]:
    """Global importance ``{group: score}`` (ECoFLaP Sec. 3.2 and Table 1).

    ``zeroth``: sum over batches of |g_hat| (mean over ``num_noise`` directions); with ``perturb="tensor"``
    a group's score is the sum over its tensors (the paper's estimator). ``jvp``: the same directional
    derivative computed exactly by forward-mode autodiff with the same z. ``first``: autograd, with
    ``variant`` ``grad`` (sum |g|), ``weight_grad`` (sum |W * g|) or ``grad_norm`` (||g||_2 per batch).
    ``magnitude``: sum |W|, no data. ``cache=False`` reruns the whole model for every perturbation, as
    the paper's code does (for comparison only). Every group sees the same calibration batches.
    ``units`` restricts the work to those perturbation units (indices in model order; for timing
    samples in bench/); ``per_batch``, when a list, receives one ``{group: contribution}`` per batch.
    """
    if method not in SCORE_METHODS:
        raise UserError(f"unknown score method {method!r}; choose one of {', '.join(SCORE_METHODS)}")
    if perturb not in PERTURBS:
        raise UserError(f"unknown perturbation scope {perturb!r}; choose tensor or group")
    if aggregate not in ("sum", "mean"):
        raise UserError(f"unknown aggregate {aggregate!r}; choose sum or mean")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise UserError(f"eps must be a positive number, got {eps!r}")
    if num_noise < 1:
        raise UserError(f"num_noise must be >= 1, got {num_noise}")
    if variant not in FIRST_ORDER_VARIANTS:
        raise UserError(f"unknown first-order variant {variant!r}; choose one of {', '.join(FIRST_ORDER_VARIANTS)}")
    groups = score_groups(adapter, granularity, stacks)
    model = adapter.model
    if method == "magnitude":
        return {g: float(sum(model.get_parameter(w).detach().float().abs().sum() for w in ws))
                for g, ws in groups.items()}
    if calibration is None:
        calibration = adapter.calibration_samples(samples, seed)
    batches = adapter.batches(list(calibration), batch_size)
    show = None if progress in (None, True) else True
    if per_batch is not None:
        per_batch[:] = [{g: 0.0 for g in groups} for _ in batches]
    if method == "first":
        return _first_order(adapter, groups, batches, variant, show, per_batch)
    all_units: list[tuple[str, list[str]]] = []  # (group, weights perturbed together)
    for g, ws in groups.items():
        all_units += [(g, [w]) for w in ws] if perturb == "tensor" else [(g, list(ws))]
    all_units.sort(key=lambda u: _first_block_index(adapter, u[1]))  # model order, for the prefix cache
    chosen = sorted(set(units)) if units is not None else range(len(all_units))
    prefix = PrefixCache(adapter, batches) if cache else None
    scores = {g: 0.0 for g in groups}
    count = {g: 0 for g in groups}
    bar = tqdm(total=len(chosen) * len(batches), desc=f"{method} scores", disable=show, leave=False)
    with _math_attention(adapter, method == "jvp"):
        for u in chosen:
            g, ws = all_units[u]
            params = [model.get_parameter(w) for w in ws]
            start = _first_block_index(adapter, ws) if cache else 0
            count[g] += 1
            for bi, batch in enumerate(batches):
                est = 0.0
                for k in range(num_noise):
                    s = _noise_seed(seed, bi, u, k)
                    ctx = prefix.prefix(bi, start) if prefix is not None else _null()
                    with ctx:
                        if method == "zeroth":
                            d = _two_point(adapter, batch, params, s, eps)
                        else:
                            d = _jvp(adapter, batch, ws, s)
                    est += abs(d)
                scores[g] += est / num_noise
                if per_batch is not None:
                    per_batch[bi][g] += est / num_noise
                bar.update(1)
    bar.close()
    if aggregate == "mean":
        scores = {g: v / count[g] for g, v in scores.items()}
    bad = [g for g, v in scores.items() if not math.isfinite(v)]
    if bad:
        raise CalibrationError(f"non-finite scores for groups {bad[:5]}: run in float32 or lower eps")
    return scores


@contextmanager
def _null() -> Iterator[None]:
    yield


def _loss_value(adapter: ModelAdapter, batch) -> float:
    loss = adapter.loss(batch)
    v = float(loss.detach().float())
    if not math.isfinite(v):
        raise CalibrationError(f"the calibration loss of {adapter.name} is {v}: run in float32 or check the data")
    return v


def _two_point(adapter, batch, params, seed: int, eps: float) -> float:
    with torch.no_grad():
        with perturbed(params, seed, eps):
            lp = _loss_value(adapter, batch)
        with perturbed(params, seed, -eps):
            lm = _loss_value(adapter, batch)
    return (lp - lm) / (2 * eps)


@contextmanager
def swapped_parameters(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily replace parameters by plain tensors (for example forward-AD duals); restored on exit."""
    saved = []
    try:
        for name, t in tensors.items():
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            saved.append((mod, attr, mod._parameters[attr]))
            del mod._parameters[attr]
            setattr(mod, attr, t)
        yield
    finally:
        for mod, attr, p in reversed(saved):
            if attr in mod.__dict__:
                delattr(mod, attr)
            mod._parameters[attr] = p


def _jvp(adapter, batch, weights: Sequence[str], seed: int) -> float:
    """Exact directional derivative dL/dW . z by forward-mode autodiff, with the same z as ``zeroth``."""
    model = adapter.model
    params = [model.get_parameter(w) for w in weights]
    z = unit_noise(params, seed)
    with torch.no_grad(), fwAD.dual_level():
        duals = {w: fwAD.make_dual(p.detach(), t.to(p.dtype)) for w, p, t in zip(weights, params, z)}
        with swapped_parameters(model, duals):
            loss = adapter.loss(batch)
        tangent = fwAD.unpack_dual(loss).tangent
    if tangent is None:
        raise RuntimeError("forward-mode AD lost the tangent: the model uses a kernel without forward AD support")
    return float(tangent.float())


@contextmanager
def _math_attention(adapter: ModelAdapter, needed: bool) -> Iterator[None]:
    """Forward-mode AD needs math attention: eager attention in transformers, no MHA fast path."""
    if not needed:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    old_fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    kernel = sdpa_kernel(SDPBackend.MATH)
    kernel.__enter__()
    model = adapter.model
    old_impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switched = False
    if old_impl not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
        switched = True
    try:
        yield
    finally:
        kernel.__exit__(None, None, None)
        torch.backends.mha.set_fastpath_enabled(old_fast)
        if switched:
            model.set_attn_implementation(old_impl)


@contextmanager
def _grads_only_for(model: nn.Module, names: set[str]) -> Iterator[None]:
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None


def count_units(adapter: ModelAdapter, granularity: str = "block", perturb: str = "group",
                stacks: Sequence[str] | None = None) -> int:
    """How many perturbation units ``compute_scores`` walks through (tensors or groups)."""
    groups = score_groups(adapter, granularity, stacks)
    return sum(len(ws) for ws in groups.values()) if perturb == "tensor" else len(groups)


def _first_order(adapter, groups, batches, variant, show, per_batch=None) -> dict[str, float]:
    model = adapter.model
    names = {w for ws in groups.values() for w in ws}
    scores = {g: 0.0 for g in groups}
    with _grads_only_for(model, names):
        for bi, batch in enumerate(tqdm(batches, desc="first-order scores", disable=show, leave=False)):
            for w in names:
                model.get_parameter(w).grad = None
            loss = adapter.loss(batch)
            if not torch.isfinite(loss):
                raise CalibrationError(f"the calibration loss of {adapter.name} is {float(loss)}: run in float32")
            loss.backward()
            for g, ws in groups.items():
                ps = [model.get_parameter(w) for w in ws]
                if variant == "grad":
                    v = sum(p.grad.float().abs().sum() for p in ps)
                elif variant == "weight_grad":
                    v = sum((p.detach().float() * p.grad.float()).abs().sum() for p in ps)
                else:
                    v = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in ps))
                scores[g] += float(v)
                if per_batch is not None:
                    per_batch[bi][g] += float(v)
    return scores


# --------------------------------------------------------------------------- OWL
def owl_outlier_ratios(adapter: ModelAdapter, calibration: Sequence[Any] | None = None, *, m: float = 5.0,
                       granularity: str = "block", samples: int = 32, batch_size: int = 8, seed: int = 0,
                       stacks: Sequence[str] | None = None) -> dict[str, float]:
    """OWL's layer-wise outlier ratio (Yin et al., 2024, Eq. 3): the fraction of Wanda scores
    |W_ij| * ||X_j|| in a group above ``m`` times the group's mean score, from a dense forward pass."""
    from .stats import input_statistics, wanda_scores

    groups = score_groups(adapter, granularity, stacks)
    if calibration is None:
        calibration = adapter.calibration_samples(samples, seed)
    names = [w for ws in groups.values() for w in ws]
    with input_statistics(adapter.model, names, "wanda") as stats:
        with torch.no_grad():
            for batch in adapter.batches(list(calibration), batch_size):
                adapter.forward(batch)
    out = {}
    for g, ws in groups.items():
        sc = torch.cat([wanda_scores(adapter.model.get_parameter(w), stats[w].sq).flatten() for w in ws])
        out[g] = float((sc > m * sc.mean()).float().mean())
    return out
