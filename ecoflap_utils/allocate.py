"""Scores -> per-group sparsity: ECoFLaP, uniform and OWL. Pure functions; no model is touched.

ECoFLaP (Sec. 3.2, "sparsity ratio from global importance"): keep K = floor(N (1 - p)) weights in
total; every group first keeps ceil(n_g (1 - cap)) so that none is pruned beyond the cap (default
p + 0.1), the rest of the budget is handed out in proportion to the scores, a full group passes what
it cannot take to the others, and integer rounding hands out the last weights by largest remainder,
so the total kept is exact.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import UserError

ALLOCATIONS = ("ecoflap", "uniform", "owl")


def _check_scores(scores: Mapping[str, float], sizes: Mapping[str, int]) -> None:
    if set(scores) != set(sizes):
        missing = sorted(set(sizes) - set(scores))[:3] + sorted(set(scores) - set(sizes))[:3]
        raise UserError(f"scores and sizes name different groups (for example {missing})")
    bad = [g for g, s in scores.items() if not math.isfinite(float(s)) or float(s) < 0]
    if bad:
        raise UserError(f"non-finite or negative scores for groups {bad[:5]}: check the calibration loss "
                        "(run in float32, or lower --eps)")
    if all(float(s) == 0 for s in scores.values()):
        raise UserError(f"all {len(scores)} group scores are zero (for example {list(scores)[:3]}): the loss does "
                        "not depend on these weights; check the calibration data or use --scores first")


def allocate_sparsity(scores: Mapping[str, float], sizes: Mapping[str, int], target: float, *,
                      method: str = "ecoflap", max_sparsity: float | None = None, owl_lambda: float = 0.08
                      ) -> dict[str, float]:
    """Per-group sparsity from per-group scores (ECoFLaP Sec. 3.2; OWL, Yin et al. 2024, Sec. 4).

    ``scores``: importance per group (for ``owl``: the group's outlier ratio); ``sizes``: weights per
    group; ``target``: overall sparsity p. ``max_sparsity`` caps any group (default p + 0.1).
    """
    if method not in ALLOCATIONS:
        raise UserError(f"unknown allocation {method!r}; choose one of {', '.join(ALLOCATIONS)}")
    if not 0 <= target < 1:
        raise UserError(f"target sparsity must be in [0, 1), got {target}")
    groups = list(sizes)
    if method == "uniform":
        return {g: float(target) for g in groups}
    _check_scores(scores, sizes)
    if method == "owl":
        return owl_sparsity(scores, sizes, target, owl_lambda=owl_lambda)
    cap = target + 0.1 if max_sparsity is None else max_sparsity
    if cap < target:
        raise UserError(f"max_sparsity {cap:g} is below the target {target:g}: raise it (default: target + 0.1)")
    cap = min(cap, 1.0)
    keep = ecoflap_keep(np.array([float(scores[g]) for g in groups]), np.array([int(sizes[g]) for g in groups]),
                        target, cap)
    return {g: 1.0 - k / int(sizes[g]) for g, k in zip(groups, keep)}


def ecoflap_keep(scores: np.ndarray, sizes: np.ndarray, target: float, cap: float) -> np.ndarray:
    """Integer weights to keep per group (see the module docstring); sums to floor(N (1 - target))."""
    N = int(sizes.sum())
    K = math.floor(N * (1 - target))
    base = np.minimum(np.ceil(sizes * (1 - cap) - 1e-9).astype(np.int64), sizes)
    if base.sum() > K:  # only when cap == target and ceil overshoots: trim from the largest groups
        base = np.floor(sizes * (1 - cap)).astype(np.int64)
    room = (sizes - base).astype(float)
    budget = float(K - base.sum())
    extra = np.zeros(len(sizes))
    active = room > 0
    # water-filling: proportional to scores, groups that fill up pass the rest on
    while budget > 1e-9 and active.any():
        s = np.where(active, scores, 0.0)
        if s.sum() <= 0:  # only zero-score groups have room left: spread by room
            s = np.where(active, room - extra, 0.0)
        share = budget * s / s.sum()
        free = room - extra
        full = active & (share >= free)
        if not full.any():
            extra += share
            budget = 0.0
            break
        extra[full] = room[full]
        budget -= free[full].sum()
        active &= ~full
    keep = base + np.floor(extra + 1e-9).astype(np.int64)
    # largest remainder for the last few weights, never past a group's size
    short = K - int(keep.sum())
    frac = extra - np.floor(extra + 1e-9)
    for i in np.argsort(-frac, kind="stable"):
        if short <= 0:
            break
        if keep[i] < sizes[i]:
            keep[i] += 1
            short -= 1
    return keep


def owl_sparsity(outlier_ratio: Mapping[str, float], sizes: Mapping[str, int], target: float, *,
                 owl_lambda: float = 0.08) -> dict[str, float]:
    """OWL (Yin et al., 2024): density rises linearly with a group's outlier ratio within +-lambda.

    The ratios are rescaled to [0, 2 lambda] and shifted so that the *size-weighted* mean sparsity is
    the target (OWL centres the plain mean, which equals it when blocks have equal sizes).
    """
    groups = list(sizes)
    r = np.array([float(outlier_ratio[g]) for g in groups])
    n = np.array([float(sizes[g]) for g in groups])
    span = r.max() - r.min()
    scaled = (r - r.min()) / span * (2 * owl_lambda) if span > 0 else np.zeros_like(r)
    density = scaled - np.average(scaled, weights=n) + (1 - target)
    density = np.clip(density, 1e-6, 1.0)
    return {g: float(1 - d) for g, d in zip(groups, density)}


def expand_to_layers(group_sparsity: Mapping[str, float], members: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Group sparsity -> ``{weight name: sparsity}`` for ``prune`` (every member of a group gets its value)."""
    return {w: float(s) for g, s in group_sparsity.items() for w in members[g]}


def kept_weights(group_sparsity: Mapping[str, float], sizes: Mapping[str, int]) -> int:
    return int(round(sum((1 - group_sparsity[g]) * sizes[g] for g in sizes)))


def save_sparsity_dict(path: str | Path, layer_sparsity: Mapping[str, float]) -> None:
    from .io import write_json_atomic

    write_json_atomic(path, dict(layer_sparsity))


def load_sparsity_dict(path: str | Path, adapter=None) -> dict[str, float]:
    """Read ``{parameter name: sparsity}`` from JSON or YAML; with ``adapter``, check every name exists."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"sparsity dict {p} does not exist: pass the sparsity_dict.json of an earlier run")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise UserError(f"cannot read sparsity dict {p}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise UserError(f"sparsity dict {p} must map parameter names to numbers")
    if adapter is not None:
        known = set(adapter.layer_names(adapter.stacks()))
        unknown = [k for k in data if k not in known]
        if unknown:
            raise UserError(f"sparsity dict {p} names {len(unknown)} layer(s) that {adapter.name} does not have "
                            f"(first: {unknown[0]!r}): was it written for another model?")
    return {k: float(v) for k, v in data.items()}
