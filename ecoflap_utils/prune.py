"""Fine stage: layer-wise pruning (Wanda, SparseGPT, magnitude), unstructured or N:M, block by block.

ECoFLaP Sec. 3.3 ("layer-wise unstructured pruning"): each linear layer is pruned at the sparsity its
group was given, with Wanda's score |W_ij| * ||X_j||_2 (Sun et al., 2024, Eq. 1) or SparseGPT's
OBS update (Frantar & Alistarh, 2023, Alg. 1). Blocks are processed in model order; each block's
inputs are the *pruned* outputs of the block before it.

Masks returned here are *keep* masks: ``True`` where a weight survives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .capture import StopForward, capture_calls, first_output, intra_op_threads, run_block, stack_groups
from .errors import CalibrationError, UserError
from .models.base import ModelAdapter
from .models.devices import weight_tensor
from .stats import input_statistics, wanda_scores

METHODS = ("wanda", "sparsegpt", "magnitude")
COMPARISONS = ("row", "matrix")
#: one threshold over every pruned weight of the model (magnitude only): the official BLIP-2 magnitude baseline
GLOBAL = "global"


# --------------------------------------------------------------------------- input validation
def parse_nm(nm: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): prune N of every M consecutive input weights of a row."""
    if nm is None or nm == "":
        return None
    if isinstance(nm, str):
        try:
            n, m = (int(x) for x in nm.split(":"))
        except ValueError:
            raise UserError(f"N:M pattern {nm!r} is not of the form N:M (for example 2:4)") from None
    else:
        n, m = nm
    if not (0 < n <= m) or n == m:
        raise UserError(f"N:M pattern {n}:{m} needs 0 < N < M (for example 2:4 or 4:8)")
    return n, m


def check_sparsity(value: float, what: str = "sparsity") -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise UserError(f"{what} must be in [0, 1), got {value!r}: pass a fraction such as 0.5")
    return float(value)


def resolve_sparsity(adapter: ModelAdapter, sparsity: float | Mapping[str, float] | None,
                     nm: tuple[int, int] | None, stacks: Sequence[str] | None = None) -> dict[str, float]:
    """Turn one float or a dict into ``{weight name: sparsity}`` over the layers to prune, with checks."""
    if sparsity is None:
        if nm is None:
            raise UserError("give a sparsity (for example 0.5) or an N:M pattern")
        sparsity = nm[0] / nm[1]
    if isinstance(sparsity, Mapping):
        known = set(adapter.layer_names(adapter.stacks()))
        unknown = [k for k in sparsity if k not in known]
        if unknown:
            sample = ", ".join(sorted(known)[:3])
            raise UserError(
                f"sparsity dict names {len(unknown)} layer(s) that {adapter.name} does not have "
                f"(first: {unknown[0]!r}); keys must be parameter names such as {sample}"
            )
        per_layer = {k: check_sparsity(v, f"sparsity of {k}") for k, v in sparsity.items()}
    else:
        s = check_sparsity(sparsity)
        per_layer = {name: s for name in adapter.layer_names(stacks)}
    if nm is not None:
        target = nm[0] / nm[1]
        bad = [k for k, v in per_layer.items() if v > 0 and abs(v - target) > 1e-9]
        if bad:
            raise UserError(
                f"N:M {nm[0]}:{nm[1]} prunes exactly {target:g} of each layer, but {bad[0]} asks for "
                f"{per_layer[bad[0]]:g}: use --sparsity {target:g} (or leave it out) with --nm"
            )
    return per_layer


# --------------------------------------------------------------------------- masks
def select_prune_mask(scores: torch.Tensor, sparsity: float, *, nm: tuple[int, int] | None = None,
                      comparison: str = "row") -> torch.Tensor:
    """Which weights to prune (``True``) given importance ``scores`` (out x in); lowest scores go.

    ``row``: floor(s * C_in) per output row (Wanda's comparison group), plus one more in the rows whose
    next candidate scores lowest until floor(s * numel) are pruned (the same as Wanda when s * C_in is
    whole; otherwise the target is met instead of undershot by up to one weight per row); ``matrix``: exactly
    floor(s * numel) over the whole matrix; N:M: N lowest of each M consecutive inputs of a row.
    Ties are broken by position (stable sort), so a mask is reproducible.
    """
    rows, cols = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        if cols % m:
            raise UserError(f"N:M {n}:{m} needs the input size to be a multiple of {m}; this layer has {cols}")
        groups = scores.reshape(rows, cols // m, m)
        idx = torch.sort(groups, dim=-1, stable=True).indices[..., :n]
        return mask.reshape(rows, cols // m, m).scatter_(-1, idx, True).reshape(rows, cols)
    if comparison == "row":
        k = int(sparsity * cols)
        extra = int(sparsity * scores.numel()) - k * rows  # 0 when s * C_in is a whole number
        if extra <= 0:
            return _lowest_per_row(scores, k)
        # the fractional part of s * C_in: one more weight in the rows whose next candidate (position k of the
        # row's stable sort) matters least, rows in order of that value, ties by row
        if _selectable(scores):
            mask = _lowest_per_row(scores, k, selectable=True)
            nxt_val, nxt_idx = _next_per_row(scores, mask, k)
        else:  # inf, NaN or integer scores: the sort's order (NaN last) is the definition
            order = torch.sort(scores, dim=1, stable=True)
            mask.scatter_(1, order.indices[:, :k], True)
            nxt_val, nxt_idx = order.values[:, k], order.indices[:, k]
        rows_plus = torch.sort(nxt_val, stable=True).indices[:extra]
        mask[rows_plus, nxt_idx[rows_plus]] = True
        return mask
    if comparison == "matrix":  # the first floor(s * numel) of a stable sort of the flattened scores
        return _lowest_per_row(scores.reshape(1, -1), int(sparsity * scores.numel())).reshape(rows, cols)
    raise UserError(f"unknown comparison {comparison!r}; choose row or matrix")


def _lowest_per_row(scores: torch.Tensor, k: int, *, selectable: bool | None = None) -> torch.Tensor:
    """``True`` at the ``k`` lowest scores of each row, ties taken in order of position: the first ``k`` of a
    stable row sort (locuslab/wanda ``lib/prune.py`` L176, ``torch.sort(W_metric, dim=-1, stable=True)``), found with
    a selection (``kthvalue``) instead of a sort on CPU, about twice as fast on LLaMA-sized rows. ``selectable``:
    the caller's :func:`_selectable` answer, so that the scores are checked once (None: check here)."""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= scores.shape[1]:
        return torch.ones_like(scores, dtype=torch.bool)
    if not (_selectable(scores) if selectable is None else selectable):  # CUDA's kthvalue gives each row one thread
        mask = torch.zeros_like(scores, dtype=torch.bool)  # block, the sort is faster there; inf/NaN: the sort's order
        return mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
    kth = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    mask = scores < kth
    ties = scores == kth
    mask |= ties & (ties.cumsum(dim=1) <= k - mask.sum(dim=1, keepdim=True))
    return mask


def _selectable(scores: torch.Tensor) -> bool:
    """Whether the selection shortcuts give the stable sort's answer: finite floating-point scores on CPU (the
    sort puts NaN last and orders infinities, which ``kthvalue`` and a +inf fill do not reproduce)."""
    return scores.device.type == "cpu" and scores.is_floating_point() and bool(torch.isfinite(scores).all())


def _next_per_row(scores: torch.Tensor, lowest: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Value and position of each row's entry at place ``k`` of a stable row sort, given ``lowest``, the first
    ``k`` of that sort (:func:`_lowest_per_row`): the smallest score not among them, the first such position on a
    tie (``torch.min`` over a row returns the first index of its minimum). Only for :func:`_selectable` scores.
    Costs a masked copy and a row minimum instead of a full sort (which on CPU took as long as Wanda's calibration forwards
    at 0.6 on SmolLM2)."""
    if k == 0:
        return scores.min(dim=1)
    return scores.masked_fill(lowest, float("inf")).min(dim=1)


def check_comparison(comparison: str | Mapping[str, str], method: str, stacks: Sequence[str] | None = None,
                     nm: tuple[int, int] | None = None) -> str | dict[str, str]:
    """Check ``comparison``: ``"row"``, ``"matrix"``, ``"global"`` (magnitude only) or ``{stack: "row"|"matrix"}``.

    ``stacks`` are the adapter's stacks (a dict's keys must be among them; the caller checks coverage).
    """
    if isinstance(comparison, Mapping):
        bad = {k: v for k, v in comparison.items() if v not in COMPARISONS}
        if bad:
            k = next(iter(bad))
            raise UserError(f"comparison of stack {k!r} is {bad[k]!r}; per-stack comparisons are row or matrix")
        if stacks is not None:
            unknown = [k for k in comparison if k not in stacks]
            if unknown:
                raise UserError(f"per-stack comparison names stack {unknown[0]!r}, which this model does not have; "
                                f"its stacks are {', '.join(stacks)}")
        return dict(comparison)
    if comparison == GLOBAL:
        if method != "magnitude":
            raise UserError(f"comparison 'global' (one threshold over all layers) needs --method magnitude, not "
                            f"{method}: use row or matrix with {method}")
        if nm is not None:
            raise UserError("comparison 'global' cannot follow an N:M pattern: N:M picks N of every M weights of a row")
        return GLOBAL
    if comparison not in COMPARISONS:
        raise UserError(f"unknown comparison {comparison!r}; choose row, matrix, global (magnitude) or "
                        "STACK=row|matrix,... per stack")
    return comparison


def _abs_bits(w: torch.Tensor) -> torch.Tensor:
    """|w| in float32 viewed as int32: for non-negative floats the integer order is the value order."""
    return w.detach().float().abs().contiguous().view(torch.int32)


def global_magnitude_masks(weights: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Prune masks (``True`` = pruned) for one magnitude threshold over all ``weights`` together.

    Exactly floor(s * N_total) weights are pruned: those with the smallest |W|; ties at the threshold go in
    order of position (tensor order, then flattened index). The k-th smallest |W| is found by bisection on
    float32 bit patterns (about 31 counting passes), so nothing of the size of the model is concatenated or
    sorted. Ranks |W|, not signed W (the official BLIPT5GlobalMagPruner's signed ranking is a bug).
    """
    total = sum(w.numel() for w in weights)
    k = int(sparsity * total)
    masks = [torch.zeros(w.shape, dtype=torch.bool, device=w.device) for w in weights]
    if k <= 0:
        return masks
    lo, hi = 0, 0x7F800000  # 0.0 .. +inf
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(int((_abs_bits(w) <= mid).sum()) for w in weights) >= k:
            hi = mid
        else:
            lo = mid + 1
    left = k - sum(int((_abs_bits(w) < lo).sum()) for w in weights)
    for w, m in zip(weights, masks):
        bits = _abs_bits(w)
        m |= bits < lo
        if left > 0:
            ties = (bits == lo).flatten().nonzero().flatten()[:left]
            m.view(-1)[ties] = True
            left -= ties.numel()
    return masks


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, *,
                    nm: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh, 2023, Alg. 1): prune and update the remaining weights.

    ``hessian`` is sum X^T X over calibration tokens (any positive scale). Returns the new weight
    (float32) and the prune mask. Each block of ``blocksize`` columns prunes exactly
    floor(s * rows * cols_in_block) weights, chosen by w^2 / [H^-1]_jj^2.

    The factorisation is float32 as in IST-DASLab/sparsegpt ``sparsegpt.py`` L72-77 (``cholesky``,
    ``cholesky_inverse``, ``cholesky(upper=True)``), but a CPU one runs on one intra-op thread
    (``capture.intra_op_threads``): MKL's Cholesky and ``cholesky_inverse`` round differently at two threads
    (on mini-blip2's first ViT layer ``qkv``, entries of H^-1 differ by up to 1e-4 of the largest), which moved 2
    of 110,592 mask positions there at 0.7 and, through the pruned outputs, 7.5 % of the model's mask. At one
    thread the result does not depend on the process's thread count and equals what a one-thread process
    computed before. The reference code factors on the GPU, whose kernels do not depend on CPU threads.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0  # inputs never seen: no information, keep the weight's score finite
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    try:
        with intra_op_threads(1 if H.device.type == "cpu" else None):
            L = torch.linalg.cholesky(H)
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as e:  # pragma: no cover - only on degenerate statistics
        raise CalibrationError(f"SparseGPT: the Hessian is not positive definite ({e}); "
                               "use more calibration samples or a larger percdamp") from None
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if nm is None:
            tmp = W1 ** 2 / d.unsqueeze(0) ** 2
            mask1 = select_prune_mask(tmp, sparsity, comparison="matrix")
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        drop = mask1.to(W1.dtype)  # 1 where pruned (filled in per group of M columns for N:M)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                tmp = W1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]].unsqueeze(0) ** 2
                mask1[:, i:i + nm[1]] = select_prune_mask(tmp, 0.0, nm=nm)
                drop[:, i:i + nm[1]] = mask1[:, i:i + nm[1]].to(W1.dtype)
            # the pruned part of column i, scaled: err = (w - q) / [H^-1]_ii with q = w outside the mask
            err = Err1[:, i]
            torch.mul(W1[:, i], drop[:, i], out=err).div_(d[i])
            # OBS update of this and later columns; column i itself becomes q (w - err * d_i), so after the
            # loop the block holds the quantised values without a separate copy
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
        W1[mask1] = 0.0  # pruned entries are w - w/d*d: zero up to rounding; make them exact
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, mask


# --------------------------------------------------------------------------- the runner
@dataclass
class PruneResult:
    """What ``prune`` returns: keep masks by weight name, a per-layer report, and the settings used."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    report: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def actual_sparsity(self) -> float:
        """Fraction of zeros over the pruned layers, weighted by their sizes."""
        total = sum(r["params"] for r in self.report)
        zeros = sum(r["actual_sparsity"] * r["params"] for r in self.report)
        return zeros / total if total else 0.0

    @property
    def sparsity_by_layer(self) -> dict[str, float]:
        return {r["name"]: r["target_sparsity"] for r in self.report}


def prune(adapter: ModelAdapter, sparsity: float | Mapping[str, float] | None = None, *, method: str = "wanda",
          nm: str | tuple[int, int] | None = None, calibration: Sequence[Any] | None = None,
          calib_samples: int = 128, batch_size: int = 8, seed: int = 0, comparison: str = "row",
          stacks: Sequence[str] | None = None, return_masks: bool = True, blocksize: int = 128,
          percdamp: float = 0.01, progress: bool | None = None,
          on_scores: Callable[[str, torch.Tensor], None] | None = None, threads: int | None = 1) -> PruneResult:
    """Prune ``adapter``'s model in place, block by block (ECoFLaP Sec. 3.3; Wanda Alg. 1; SparseGPT Alg. 1).

    ``sparsity`` is one float for every pruned layer or ``{weight name: sparsity}`` (for example ECoFLaP's
    allocation expanded to layers). ``comparison`` (Wanda and magnitude): ``"row"``, ``"matrix"``, a dict
    ``{stack: "row"|"matrix"}`` covering every pruned stack (the official BLIP-2 code: matrix on the vision
    encoder, row on the LM), or ``"global"`` with magnitude: one |W| threshold over all pruned layers at one
    sparsity, exactly floor(s * N_total) weights. ``calibration`` is a list of samples
    (``adapter.calibration_samples``);
    when ``None``, ``calib_samples`` are drawn with ``seed``. ``stacks`` chooses what is pruned
    (default: the adapter's default stacks, the vision encoder and the language model for BLIP-2).
    ``on_scores(weight name, scores)`` (Wanda) sees each weight's importance tensor just before
    its mask is chosen, for example to keep the authors' per-tensor "local score" (``lessons``).

    ``threads``: torch intra-op threads for the calibrated fine stage (Wanda, SparseGPT): its capture forward,
    statistics, block replays and SparseGPT updates run inside ``capture.intra_op_threads(threads)``. The
    default 1 makes masks and weights bit-identical whatever thread count the process has: at two threads
    CPU matmuls with a long inner size and the Cholesky round differently, and the pruned outputs that feed
    each next block carry the difference forward (on mini-blip2 with 64 samples, 2 threads vs 1 changed 3.5 %
    of SparseGPT's and 0.13 % of Wanda's mask positions at 0.5, 7.5 % and 2.3 % at 0.7). ``None`` keeps the
    process's setting: it can be faster on many idle cores (not measured here); masks then depend on the
    thread count. CUDA work is unaffected.

    A model that ``load_model(..., device_map=...)`` spread over devices with accelerate is pruned where it lies:
    each block runs on its own device with its recorded inputs moved there (``capture.run_block``), its
    statistics are gathered there (``stats.input_statistics``), and masks and SparseGPT's updates are written
    into the tensor that holds each weight (``models.devices.weight_tensor``: the parameter, or the CPU copy of
    an offloaded one). locuslab/wanda ``lib/prune.py`` does the first step by hand for LLaMA-30B/65B (lines
    64-65 and 142-144: the inputs follow ``model.hf_device_map``); the masks equal a single-device run's.
    """
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    nm_t = parse_nm(nm)
    comparison = check_comparison(comparison, method, adapter.stacks(), nm_t)
    per_layer = resolve_sparsity(adapter, sparsity, nm_t, stacks)
    to_prune = {k: v for k, v in per_layer.items() if v > 0}
    block_of = adapter.block_of()
    blocks_needed = {block_of[k].name for k in to_prune}
    if isinstance(comparison, dict):
        missing = sorted({block_of[k].stack for k in to_prune} - set(comparison))
        if missing:
            raise UserError(f"the per-stack comparison does not say how to compare stack {missing[0]!r}: "
                            f"add {missing[0]}=row or {missing[0]}=matrix")

    def comparison_of(stack: str) -> str:
        return comparison[stack] if isinstance(comparison, dict) else comparison
    result = PruneResult(config={
        "method": method, "nm": f"{nm_t[0]}:{nm_t[1]}" if nm_t else None, "comparison": comparison,
        "seed": seed, "calibration": adapter.calibration_name, "batch_size": batch_size,
    })
    model = adapter.model
    show = None if progress in (None, True) else True  # tqdm's disable: None = only on a terminal

    def apply(name: str, prune_mask: torch.Tensor, new_weight: torch.Tensor | None = None) -> None:
        p = weight_tensor(model, name)  # where the values live (an offloaded weight's CPU copy)
        with torch.no_grad():
            if new_weight is not None:
                p.copy_(new_weight.to(device=p.device, dtype=p.dtype))
            p[prune_mask.to(p.device)] = 0
        if return_masks:
            result.masks[name] = (~prune_mask).cpu()

    if method == "magnitude" and comparison == GLOBAL:
        levels = sorted(set(per_layer.values()))
        if len(levels) > 1:
            raise UserError("comparison 'global' sets one threshold at one sparsity over all layers, but the "
                            f"layers ask for {len(levels)} different sparsities: use --allocation uniform")
        if to_prune:
            names = list(to_prune)
            masks = global_magnitude_masks([weight_tensor(model, n) for n in names], levels[0])
            for name, m in zip(names, masks):
                apply(name, m)
        result.config["calib_samples"] = 0
    elif method == "magnitude":
        for name, s in tqdm(to_prune.items(), desc="magnitude", disable=show, leave=False):
            w = weight_tensor(model, name)
            apply(name, select_prune_mask(w.detach().float().abs(), s, nm=nm_t,
                                          comparison=comparison_of(block_of[name].stack)))
        result.config["calib_samples"] = 0
    else:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise UserError(f"threads must be a positive whole number or None, got {threads!r}")
        if calibration is None:
            calibration = adapter.calibration_samples(calib_samples, seed)
        result.config["calib_samples"] = len(calibration)
        result.config["threads"] = threads
        batches = adapter.batches(list(calibration), batch_size)
        chosen = [b for b in adapter.blocks if b.name in blocks_needed]
        if chosen:
            stacks_in_order = [g[0].stack for g in stack_groups(adapter.blocks)]
            for stack in stacks_in_order:
                needed = [b for b in adapter.stack_blocks(stack) if b.name in blocks_needed]
                if not needed:
                    continue
                stack_blocks = adapter.stack_blocks(stack)
                stack_blocks = stack_blocks[: stack_blocks.index(needed[-1]) + 1]  # nothing after the last needed
                with intra_op_threads(threads):
                    _prune_stack(adapter, stack_blocks, batches, to_prune, method, nm_t, comparison_of(stack),
                                 blocksize, percdamp, apply, show, on_scores)
    result.report = sparsity_report(adapter, per_layer)
    return result


def _prune_stack(adapter, blocks, batches, to_prune, method, nm_t, comparison, blocksize, percdamp, apply, show,
                 on_scores=None):
    calls = capture_calls(adapter, blocks, batches, keep_hidden="first", skip_later=True)
    hidden = [c[0].hidden() for c in calls]
    bar = tqdm(blocks, desc=f"{method} {blocks[0].stack}", disable=show, leave=False)
    for i, block in enumerate(bar):
        layers = [w for w in block.weights if w in to_prune]
        if layers:
            with input_statistics(adapter.model, layers, method, stop_when_seen=True) as stats:
                with torch.no_grad():
                    for b, call in enumerate(calls):
                        try:  # the block's output is not needed: stop once its last pruned layer saw its input
                            run_block(block, call[i], hidden[b])
                        except StopForward:
                            continue
                        unseen = [w for w in layers if stats[w].tokens == 0] or layers
                        raise CalibrationError(f"{block.name}'s forward never called {unseen[0]}: it cannot be "
                                               "calibrated; leave it out of the sparsity dict")
            for w in layers:
                W = weight_tensor(adapter.model, w)
                st = stats[w]  # on the device where the layer computes; the scores and updates are made there
                if method == "wanda":
                    score = wanda_scores(W, st.sq)
                    if on_scores is not None:
                        on_scores(w, score)
                    apply(w, select_prune_mask(score, to_prune[w], nm=nm_t, comparison=comparison))
                else:
                    new, mask = sparsegpt_prune(W.to(st.H.device), st.H, to_prune[w], nm=nm_t, blocksize=blocksize,
                                                percdamp=percdamp)
                    apply(w, mask, new)
                del stats[w]
        if i < len(blocks) - 1:  # the pruned outputs feed the next block
            with torch.no_grad():
                hidden = [first_output(run_block(block, call[i], hidden[b])) for b, call in enumerate(calls)]
            if not all(torch.isfinite(h).all() for h in hidden):
                raise CalibrationError(f"non-finite outputs of {block.name} after pruning; run in float32")


def sparsity_report(adapter: ModelAdapter, per_layer: Mapping[str, float]) -> list[dict[str, Any]]:
    """One row per layer: name, block, stack, modality, parameters, target and actual sparsity."""
    block_of = adapter.block_of()
    rows = []
    for name, target in per_layer.items():
        p = weight_tensor(adapter.model, name)
        b = block_of[name]
        rows.append({"name": name, "block": b.name, "stack": b.stack, "modality": b.modality,
                     "params": p.numel(), "target_sparsity": float(target),
                     "actual_sparsity": float((p == 0).sum().item() / p.numel())})
    return rows
