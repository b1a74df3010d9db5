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
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from tqdm.auto import tqdm

from .capture import hooks, replaced_forward
from .errors import CalibrationError, UserError
from .models.base import ModelAdapter
from .models.devices import offloaded_names, weight_tensor

SCORE_METHODS = ("zeroth", "first", "jvp", "magnitude")
GRANULARITIES = ("layer", "block", "module")
PERTURBS = ("tensor", "group")
DIFFERENCES = ("forward", "central")
MEMORY_MODES = ("plain", "low")
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
    block ignores. Blocks must be visited in model order (``b`` never decreases); ``rewind()`` starts a
    new pass from block 0. ``losses[batch]`` is the dense loss of each batch from that same forward, which
    the forward difference takes as its L(W) instead of running another forward.
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
        self.losses: list[float] = []
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
                    out = adapter.forward(batch)
            self.losses.append(_checked_loss(adapter, out) if torch.is_tensor(out) and out.numel() == 1
                               else float("nan"))
            self.calls.append(calls)
            self.shape.append(shapes)
            self.last_out.append(lasts)
        self.rewind()

    def rewind(self) -> None:
        """Go back to block 0 (a new pass over the units, e.g. another round of ``--num-noise auto``)."""
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
@dataclass
class ScoreResult:
    """What :func:`estimate_scores` returns: the group scores and how much to trust them.

    ``scores``: ``{group: score}``. ``per_batch``: one ``{group: contribution}`` per calibration batch (they
    sum to ``scores`` for ``aggregate="sum"``). ``draws``: for zeroth order and jvp, the per-batch,
    per-direction contributions ``draws[group][batch][k]`` (first order: one per batch). ``stderr``: per
    group, the standard error of its score from those draws. ``stability``: split-half rank stability, the
    Spearman correlation of the scores from two disjoint halves of the draws (``split`` says which halves:
    even/odd noise directions when there are at least two per batch, else even/odd batches); ``None``
    when there are fewer than three groups or two draws. ``config``: the settings and the forward count.
    """

    scores: dict[str, float]
    per_batch: list[dict[str, float]] = field(default_factory=list)
    draws: dict[str, list[list[float]]] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    stability: float | None = None
    split: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def table(self) -> dict[str, dict[str, Any]]:
        """``{group: {"score", "stderr"}}`` for scores.json."""
        return {g: {"score": v, "stderr": self.stderr.get(g)} for g, v in self.scores.items()}


#: below this split-half stability the CLI and notebooks warn
STABILITY_WARNING = 0.8


def stability_message(result: ScoreResult) -> str:
    """One line on how reliable the scores are, with what to raise when they are not."""
    if result.stability is None:
        return "split-half stability: not available (needs >= 3 groups and >= 2 draws)"
    line = f"split-half rank stability of the block scores: {result.stability:.2f} ({result.split})"
    if result.stability < STABILITY_WARNING:
        line += (f" - below {STABILITY_WARNING}: the allocation is close to random within the cap; raise "
                 "--num-noise (or use --num-noise auto) or --first-stage-samples, or use --scores first")
    return line


def compute_scores(adapter: ModelAdapter, method: str = "zeroth", calibration: Sequence[Any] | None = None, *,
                   per_batch: list | None = None, **kw) -> dict[str, float]:
    """Global importance ``{group: score}`` (ECoFLaP Sec. 3.2 and Table 1): :func:`estimate_scores` without
    the noise statistics. ``per_batch``, when a list, receives one ``{group: contribution}`` per batch."""
    res = estimate_scores(adapter, method, calibration, **kw)
    if per_batch is not None:
        per_batch[:] = res.per_batch
    return res.scores


def estimate_scores(adapter: ModelAdapter, method: str = "zeroth", calibration: Sequence[Any] | None = None, *,
                    granularity: str = "block", eps: float = 1e-3, num_noise: int | str = 1, seed: int = 0,
                    aggregate: str = "sum", perturb: str = "tensor", difference: str = "forward",
                    samples: int = 32, batch_size: int = 8, stacks: Sequence[str] | None = None,
                    variant: str = "grad", memory: str = "plain", cache: bool = True,
                    units: Sequence[int] | None = None, stability: float = 0.9, max_noise: int = 16,
                    progress: bool | None = None) -> ScoreResult:
    """Global importance per group with its noise statistics (ECoFLaP Sec. 3.2, Table 1).

    ``zeroth``: per batch, |g_hat| along seeded Gaussian directions z, averaged over ``num_noise``
    directions and summed over batches. ``perturb="tensor"`` (default, the paper's estimator) draws one
    direction per weight tensor and sums the tensors' |g_hat| over the group: E|z.g_t| = sqrt(2/pi) ||g_t||,
    so the score tracks sum_t ||g_t||. ``perturb="group"`` perturbs all of a group's tensors along one joint
    direction: a cheaper, *different* estimator that tracks ||g_group|| (between sum_t ||g_t|| / sqrt(T)
    and sum_t ||g_t|| for T tensors). ``difference="central"`` is the paper's two-point estimate
    (L(W + eps z) - L(W - eps z)) / 2 eps; ``"forward"`` is (L(W + eps z) - L(W)) / eps with L(W) computed
    once per batch and shared by every unit: half the perturbed forwards, the same ranks (tests).
    ``num_noise="auto"`` draws pairs of directions per batch until the split-half stability reaches
    ``stability`` or ``max_noise`` directions per batch are spent.

    ``jvp``: the same directional derivative, exact, by forward-mode autodiff with the same z. ``first``:
    autograd, ``variant`` ``grad`` (sum |g|), ``weight_grad`` (sum |W * g|; at batch size 1 this is the
    paper's BLIP-2 first-order score, |W| * |g| summed over samples) or ``grad_norm`` (||g||_2 per batch);
    ``memory="low"`` recomputes each block during the backward pass (block checkpointing) and reduces each
    gradient to its score as soon as it is accumulated, then frees it: the same numbers near the memory of
    a forward pass (BLIP-2 Flan-T5-XL on a CPU: 1.02x a no-grad forward's peak RSS at batch 1, 1.20x at
    batch 8, of which all but 1.04x is freed memory glibc keeps: ``MALLOC_MMAP_THRESHOLD_=1048576`` returns
    it; plain autograd 2.03x at batch 1: bench/results/paper_scale*.md). ``magnitude``: sum |W|, no data. ``cache=False`` reruns the whole model for every
    perturbation, as the paper's code does (for comparison only). Every group sees the same calibration
    batches. ``units`` restricts the work to those perturbation units (indices in model order; for timing
    samples in bench/).

    On a model accelerate spread over devices (``load_model(..., device_map=...)``) every forward runs through
    its hooks, blocks replay on their own devices (``capture.run_block``) and a perturbation is written where
    the weight's values live (``models.devices.weight_tensor``; z is drawn on the CPU, so it is the same on
    any device): the scores equal a single-device run's. ``first`` and ``jvp`` refuse weights accelerate
    offloaded to the CPU (they exist as parameters only during their own forward).
    """
    if method not in SCORE_METHODS:
        raise UserError(f"unknown score method {method!r}; choose one of {', '.join(SCORE_METHODS)}")
    if perturb not in PERTURBS:
        raise UserError(f"unknown perturbation scope {perturb!r}; choose tensor or group")
    if difference not in DIFFERENCES:
        raise UserError(f"unknown finite difference {difference!r}; choose {' or '.join(DIFFERENCES)}")
    if memory not in MEMORY_MODES:
        raise UserError(f"unknown memory mode {memory!r}; choose {' or '.join(MEMORY_MODES)}")
    if aggregate not in ("sum", "mean"):
        raise UserError(f"unknown aggregate {aggregate!r}; choose sum or mean")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise UserError(f"eps must be a positive number, got {eps!r}")
    auto = num_noise == "auto"
    if auto:
        check_stability(stability)
        if max_noise < 2:
            raise UserError(f"--num-noise auto needs a budget of at least 2 directions per batch (two halves), "
                            f"got {max_noise}: raise --max-noise")
    elif not isinstance(num_noise, int) or num_noise < 1:
        raise UserError(f"num_noise must be an integer >= 1 or 'auto', got {num_noise!r}")
    if variant not in FIRST_ORDER_VARIANTS:
        raise UserError(f"unknown first-order variant {variant!r}; choose one of {', '.join(FIRST_ORDER_VARIANTS)}")
    groups = score_groups(adapter, granularity, stacks)
    model = adapter.model
    config: dict[str, Any] = {"method": method, "granularity": granularity}
    if method == "magnitude":
        sc = {g: float(sum(weight_tensor(model, w).detach().float().abs().sum().cpu() for w in ws))
              for g, ws in groups.items()}
        return ScoreResult(sc, config=config)
    if method in ("first", "jvp"):
        off = offloaded_names(model, [w for ws in groups.values() for w in ws])
        if off:
            raise UserError(f"{method} scores differentiate through every weight, but accelerate offloaded {len(off)} "
                            f"of them ({off[0]} first) to the CPU, where they exist only during their forward: use "
                            "--scores zeroth (or magnitude), or a device map that keeps the scored weights on GPUs")
    if calibration is None:
        calibration = adapter.calibration_samples(samples, seed)
    batches = adapter.batches(list(calibration), batch_size)
    show = None if progress in (None, True) else True
    if method == "first":
        draws = _first_order(adapter, groups, batches, variant, show, memory)
        config.update(variant=variant, memory=memory, backward_passes=len(batches))
        return _finish(draws, aggregate, {g: 1 for g in groups}, config)
    all_units: list[tuple[str, list[str]]] = []  # (group, weights perturbed together)
    for g, ws in groups.items():
        all_units += [(g, [w]) for w in ws] if perturb == "tensor" else [(g, list(ws))]
    all_units.sort(key=lambda u: _first_block_index(adapter, u[1]))  # model order, for the prefix cache
    chosen = sorted(set(units)) if units is not None else list(range(len(all_units)))
    count = {g: 0 for g in groups}
    for u in chosen:
        count[all_units[u][0]] += 1
    # draws[g][batch][k]: the group's contribution of direction k on that batch (summed over its units)
    draws: dict[str, list[list[float]]] = {g: [[] for _ in batches] for g in groups}
    # forwards run: "dense" fill the prefix cache (and give L(W)), "base" compute L(W) without one
    forwards = {"perturbed": 0, "base": 0, "dense": 0}
    # one dense forward per batch, shared by every pass: the prefix cache records L(W) as it fills
    prefix = PrefixCache(adapter, batches) if cache else None
    forwards["dense"] = len(batches) if cache else 0
    base = None
    if method == "zeroth" and difference == "forward":
        if prefix is not None and all(math.isfinite(v) for v in prefix.losses):
            base = list(prefix.losses)
        else:
            with torch.no_grad():
                base = [_loss_value(adapter, b) for b in batches]
            forwards["base"] = len(batches)
    k_done = 0
    k_next = 2 if auto else num_noise
    while True:
        _zeroth_pass(adapter, method, batches, all_units, chosen, range(k_done, k_next), draws, seed=seed, eps=eps,
                     difference=difference, base=base, prefix=prefix, show=show, forwards=forwards)
        k_done = k_next
        if not auto:
            break
        res = _finish(draws, aggregate, count, {})
        if res.stability is None or res.stability >= stability or k_done + 2 > max_noise:
            break
        k_next = k_done + 2
    config.update(perturb=perturb, difference=difference if method == "zeroth" else None, eps=eps,
                  num_noise=k_done, num_noise_requested=num_noise, units=len(chosen), forwards=forwards,
                  cache=cache)
    if auto:
        config.update(stability_target=stability, max_noise=max_noise)
    return _finish(draws, aggregate, count, config)


def check_stability(value) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
        raise UserError(f"--stability must be in (0, 1], got {value!r}: for example 0.9")
    return float(value)


def _zeroth_pass(adapter, method, batches, all_units, chosen, directions, draws, *, seed, eps, difference, base,
                 prefix, show, forwards) -> None:
    """One pass over the units (model order) for noise directions ``directions``; adds to ``draws``."""
    model = adapter.model
    directions = list(directions)
    if prefix is not None:
        prefix.rewind()
    bar = tqdm(total=len(chosen) * len(batches), desc=f"{method} scores", disable=show, leave=False)
    with _math_attention(adapter, method == "jvp"):
        for u in chosen:
            g, ws = all_units[u]
            params = [weight_tensor(model, w) for w in ws]  # an offloaded weight: its CPU copy, read at each forward
            start = _first_block_index(adapter, ws) if prefix is not None else 0
            for bi, batch in enumerate(batches):
                row = draws[g][bi]
                while len(row) < directions[-1] + 1:
                    row.append(0.0)
                for k in directions:
                    s = _noise_seed(seed, bi, u, k)
                    ctx = prefix.prefix(bi, start) if prefix is not None else _null()
                    with ctx:
                        if method == "jvp":
                            d = _jvp(adapter, batch, ws, s)
                            forwards["perturbed"] += 1
                        elif difference == "forward":
                            d = _one_point(adapter, batch, params, s, eps, base[bi])
                            forwards["perturbed"] += 1
                        else:
                            d = _two_point(adapter, batch, params, s, eps)
                            forwards["perturbed"] += 2
                    row[k] += abs(d)
                bar.update(1)
    bar.close()


def _finish(draws: dict[str, list[list[float]]], aggregate: str, count: Mapping[str, int],
            config: dict[str, Any]) -> ScoreResult:
    """Scores, per-batch contributions, standard errors and split-half stability from the draws."""
    groups = list(draws)
    n_batches = len(next(iter(draws.values()))) if draws else 0
    per_batch = [{g: float(np.mean(draws[g][b])) if draws[g][b] else 0.0 for g in groups} for b in range(n_batches)]
    scores = {g: sum(pb[g] for pb in per_batch) for g in groups}
    # the score is a sum of per-batch terms: SE = sqrt(B) * sd of the per-batch terms
    stderr = {g: float(np.std([pb[g] for pb in per_batch], ddof=1) * math.sqrt(n_batches)) if n_batches > 1
              else float("nan") for g in groups}
    n_dirs = min((len(draws[g][b]) for g in groups for b in range(n_batches)), default=0)
    if n_dirs >= 2:
        split = "even/odd noise directions"
        half = [{g: sum(np.mean(draws[g][b][h::2]) for b in range(n_batches)) for g in groups} for h in (0, 1)]
    elif n_batches >= 2:
        split = "even/odd batches"
        half = [{g: sum(draws[g][b][0] if draws[g][b] else 0.0 for b in range(h, n_batches, 2)) for g in groups}
                for h in (0, 1)]
    else:
        split, half = None, None
    stability = None
    if half is not None and len(groups) >= 3:
        from scipy.stats import spearmanr

        rho = spearmanr([half[0][g] for g in groups], [half[1][g] for g in groups])[0]
        stability = float(rho) if math.isfinite(rho) else None
    if aggregate == "mean":
        scores = {g: v / max(count[g], 1) for g, v in scores.items()}
        stderr = {g: v / max(count[g], 1) for g, v in stderr.items()}
    bad = [g for g, v in scores.items() if not math.isfinite(v)]
    if bad:
        raise CalibrationError(f"non-finite scores for groups {bad[:5]}: run in float32 or lower eps")
    return ScoreResult(scores, per_batch, draws, stderr, stability, split, config)


@contextmanager
def _null() -> Iterator[None]:
    yield


def _loss_value(adapter: ModelAdapter, batch) -> float:
    return _checked_loss(adapter, adapter.loss(batch))


def _checked_loss(adapter: ModelAdapter, loss: torch.Tensor) -> float:
    v = float(loss.detach().float())
    if not math.isfinite(v):
        raise CalibrationError(f"the calibration loss of {adapter.name} is {v}: run in float32 or check the data")
    return v


def _one_point(adapter, batch, params, seed: int, eps: float, base: float) -> float:
    """Forward difference (L(W + eps z) - L(W)) / eps, with L(W) of this batch computed once beforehand."""
    with torch.no_grad():
        with perturbed(params, seed, eps):
            lp = _loss_value(adapter, batch)
    return (lp - base) / eps


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


def _reduce_grad(p: torch.Tensor, g: torch.Tensor, variant: str) -> float:
    """What a first-order score keeps of one tensor's gradient on one batch."""
    if variant == "grad":
        return float(g.float().abs().sum())
    if variant == "weight_grad":
        return float((p.detach().float() * g.float()).abs().sum())
    return float((g.float() ** 2).sum())  # grad_norm: squared norm, combined per group below


def _first_order(adapter, groups, batches, variant, show, memory="plain") -> dict[str, list[list[float]]]:
    """Per group and batch, the first-order score (one draw per batch). ``memory="low"``: block
    checkpointing plus gradients reduced and freed as they are accumulated (see :func:`low_memory_backward`)."""
    model = adapter.model
    names = [w for ws in groups.values() for w in ws]
    draws: dict[str, list[list[float]]] = {g: [] for g in groups}
    with _grads_only_for(model, set(names)):
        for batch in tqdm(batches, desc="first-order scores", disable=show, leave=False):
            per_tensor: dict[str, float] = {}
            if memory == "low":
                with low_memory_backward(adapter, names, lambda p, g, w: per_tensor.__setitem__(
                        w, per_tensor.get(w, 0.0) + _reduce_grad(p, g, variant))):
                    loss = adapter.low_memory_loss(batch)
                    _check_loss(adapter, loss)
                    loss.backward()
            else:
                for w in names:
                    model.get_parameter(w).grad = None
                loss = adapter.loss(batch)
                _check_loss(adapter, loss)
                loss.backward()
                for w in names:
                    p = model.get_parameter(w)
                    per_tensor[w] = _reduce_grad(p, p.grad, variant) if p.grad is not None else 0.0
                    p.grad = None
            for g, ws in groups.items():
                v = sum(per_tensor.get(w, 0.0) for w in ws)
                draws[g].append([math.sqrt(v) if variant == "grad_norm" else v])
    return draws


def _check_loss(adapter, loss) -> None:
    if not torch.isfinite(loss):
        raise CalibrationError(f"the calibration loss of {adapter.name} is {float(loss)}: run in float32")


@contextmanager
def low_memory_backward(adapter: ModelAdapter, names: Sequence[str], reduce) -> Iterator[None]:
    """Inside the ``with``, a backward pass keeps about the memory of a forward pass.

    * Block checkpointing: every block of ``adapter.blocks`` runs under ``torch.utils.checkpoint`` (non-reentrant),
      so only each block's input is kept and the block is recomputed during the backward pass.
    * Each weight in ``names`` gets a ``register_post_accumulate_grad_hook``: as soon as its gradient is
      accumulated, ``reduce(param, grad, name)`` keeps what the score needs and the gradient is freed.
    """
    from torch.utils.checkpoint import checkpoint

    model = adapter.model
    with ExitStack() as es:
        for b in adapter.blocks:
            fwd = b.module.forward

            def wrapped(*args, _f=fwd, **kwargs):
                return checkpoint(_f, *args, use_reentrant=False, **kwargs)

            es.enter_context(replaced_forward(b.module, wrapped))
        for w in names:
            p = model.get_parameter(w)

            def hook(param, _w=w):
                reduce(param, param.grad, _w)
                param.grad = None

            es.enter_context(hooks(p.register_post_accumulate_grad_hook(hook)))
        yield


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
        dev = stats[ws[0]].sq.device  # a stack-wide group may span devices
        sc = torch.cat([wanda_scores(weight_tensor(adapter.model, w), stats[w].sq).flatten().to(dev) for w in ws])
        out[g] = float((sc > m * sc.mean()).float().mean())
    return out
