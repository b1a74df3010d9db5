"""Helpers for the lessons of notebooks 01-03: exact gradient references, estimator comparisons, the
cost of every score method, allocations under two estimators, and local (layer-wise) pruning scores.

Each returns plain values (rows as lists of dicts, dicts), so a notebook cell calls one function and shows
a table or a figure.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .errors import UserError
from .measure import track
from .models.base import ModelAdapter
from .scores import ScoreResult, count_units, estimate_scores, group_info, score_groups

#: names of the two exact references of notebook 02
SUM_OF_TENSOR_NORMS = "Σ_t ‖g_t‖"
GROUP_NORM = "‖g_block‖"


# --------------------------------------------------------------------------- notebook 02: references
def exact_gradient_norms(adapter: ModelAdapter, calibration: Sequence[Any], *, batch_size: int = 8,
                         granularity: str = "block") -> dict[str, list[dict[str, float]]]:
    """Per calibration batch, the exact targets of the two zeroth-order estimators, by plain autograd.

    Returns ``{SUM_OF_TENSOR_NORMS: [{group: sum_t ||g_t||} per batch], GROUP_NORM: [{group: ||g_group||} per
    batch]}``, where g_t is the gradient of the batch's loss with respect to weight tensor t of the group.
    ``perturb="tensor"`` tracks the first (E|z_t . g_t| = sqrt(2/pi) ||g_t||, summed over t), ``perturb="group"``
    the second. Batches are ``adapter.batches(calibration, batch_size)``, the ones the estimators see.
    """
    groups = score_groups(adapter, granularity)
    model = adapter.model
    names = [w for ws in groups.values() for w in ws]
    params = [model.get_parameter(w) for w in names]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    out: dict[str, list[dict[str, float]]] = {SUM_OF_TENSOR_NORMS: [], GROUP_NORM: []}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for batch in adapter.batches(list(calibration), batch_size):
            loss = adapter.loss(batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            sq = {w: float(g.detach().float().pow(2).sum()) if g is not None else 0.0 for w, g in zip(names, grads)}
            out[SUM_OF_TENSOR_NORMS].append({g: sum(math.sqrt(sq[w]) for w in ws) for g, ws in groups.items()})
            out[GROUP_NORM].append({g: math.sqrt(sum(sq[w] for w in ws)) for g, ws in groups.items()})
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    return out


def prefix_sum(per_batch: Sequence[Mapping[str, float]], n_batches: int) -> dict[str, float]:
    """The score from the first ``n_batches`` batches: the sum of their per-batch contributions."""
    if not 1 <= n_batches <= len(per_batch):
        raise UserError(f"asked for the first {n_batches} batches of {len(per_batch)}")
    return {g: float(sum(pb[g] for pb in per_batch[:n_batches])) for g in per_batch[0]}


def spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Spearman rank correlation of two ``{group: score}`` over their common groups (nan when undefined)."""
    from scipy.stats import spearmanr

    keys = [k for k in a if k in b]
    if len(keys) < 2:
        return float("nan")
    rho = spearmanr([a[k] for k in keys], [b[k] for k in keys])[0]
    return float(rho) if rho is not None and math.isfinite(rho) else float("nan")


def batches_for(sample_counts: Sequence[int], batch_size: int) -> list[int]:
    """How many batches each sample count is; every count must be a positive multiple of ``batch_size``."""
    bad = [n for n in sample_counts if not isinstance(n, int) or n < batch_size or n % batch_size]
    if bad:
        raise UserError(f"sample counts {bad} are not positive multiples of the batch size {batch_size}: "
                        f"use for example {[batch_size * k for k in (1, 2, 4)]}")
    return [n // batch_size for n in sample_counts]


def compare_estimators(adapter: ModelAdapter, calibration: Sequence[Any], sample_counts: Sequence[int], *,
                       batch_size: int = 8, eps: float = 1e-3, seed: int = 0,
                       perturbs: Sequence[str] = ("tensor", "group")) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rank agreement of the per-tensor and per-group zeroth-order estimators with both exact references.

    Every estimator runs once on all of ``calibration`` (forward differences, one direction per unit and
    batch); the score for ``n`` samples is the sum over the first ``n / batch_size`` batches, so each
    sample count sees the first ``n`` samples and the same noise draws. Rows: ``{"estimator", "reference",
    "samples", "spearman"}``, plus one row per sample count comparing the two references with each other.
    Also returns ``{"exact": ..., perturb: ScoreResult, "cost": {name: track result}}``.
    """
    counts = batches_for(sample_counts, batch_size)
    if max(counts) * batch_size > len(calibration):
        raise UserError(f"{len(calibration)} calibration samples but the largest sample count is {max(sample_counts)}")
    calibration = list(calibration)[: max(counts) * batch_size]
    dev = str(adapter.input_device())
    runs: dict[str, Any] = {"cost": {}}
    with track(dev) as r:
        runs["exact"] = exact_gradient_norms(adapter, calibration, batch_size=batch_size)
    runs["cost"]["exact"] = dict(r)
    for p in perturbs:
        with track(dev) as r:
            runs[p] = estimate_scores(adapter, "zeroth", calibration, perturb=p, eps=eps, seed=seed,
                                      batch_size=batch_size, progress=False)
        runs["cost"][p] = dict(r)
    rows = []
    for n, nb in zip(sample_counts, counts):
        refs = {k: prefix_sum(v, nb) for k, v in runs["exact"].items()}
        rows.append({"estimator": f"exact {GROUP_NORM}", "reference": SUM_OF_TENSOR_NORMS, "samples": n,
                     "spearman": spearman(refs[GROUP_NORM], refs[SUM_OF_TENSOR_NORMS])})
        for p in perturbs:
            est = prefix_sum(runs[p].per_batch, nb)
            for ref, values in refs.items():
                rows.append({"estimator": f"zeroth per {p}", "reference": ref, "samples": n,
                             "spearman": spearman(est, values)})
    return rows, runs


def difference_agreement(adapter: ModelAdapter, calibration: Sequence[Any], eps_values: Sequence[float], *,
                         perturb: str = "tensor", batch_size: int = 8, seed: int = 0,
                         forward: ScoreResult | None = None) -> tuple[list[dict[str, Any]], dict[str, ScoreResult]]:
    """Forward difference (L(W + eps z) - L(W)) / eps against central (L(W + eps z) - L(W - eps z)) / 2 eps at
    the same noise draws (same seed, batches and units), for each eps. Rows: ``{"perturb", "eps", "spearman",
    "max_rel_diff", "forwards (forward)", "forwards (central)"}``: the rank correlation of the two score
    vectors, the largest relative difference of a group's score, and each run's forward passes (perturbed
    plus unperturbed, from ``ScoreResult.config["forwards"]``). ``forward``: an existing forward-difference
    result on the same calibration, perturb and seed at ``eps_values[0]``, reused instead of rerun.
    Also returns the results, keyed ``"forward eps=..."`` and ``"central eps=..."``.
    """
    out, rows = {}, []
    for i, eps in enumerate(eps_values):
        res = {}
        for diff in ("forward", "central"):
            if diff == "forward" and forward is not None and i == 0:
                res[diff] = forward
            else:
                res[diff] = estimate_scores(adapter, "zeroth", calibration, perturb=perturb, difference=diff, eps=eps,
                                            seed=seed, batch_size=batch_size, progress=False)
            out[f"{diff} eps={eps:g}"] = res[diff]
        fw, ce = res["forward"], res["central"]
        rows.append({"perturb": perturb, "eps": eps, "spearman": spearman(fw.scores, ce.scores),
                     "max_rel_diff": max_relative_difference(fw.scores, ce.scores),
                     "forwards (forward)": forward_count(fw), "forwards (central)": forward_count(ce)})
    return rows, out


def forward_count(result: ScoreResult) -> int:
    """Forward passes a zeroth-order or jvp run made: perturbed plus unperturbed, the prefix cache's dense ones
    included (``config["forwards"]``)."""
    f = result.config.get("forwards") or {}
    return int(f.get("perturbed", 0) + f.get("base", 0) + f.get("dense", 0))


def max_relative_difference(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """max over groups of |a - b| / max(|a|, |b|) (0 where both are 0)."""
    worst = 0.0
    for k in a:
        den = max(abs(a[k]), abs(b[k]))
        if den > 0:
            worst = max(worst, abs(a[k] - b[k]) / den)
    return worst


# --------------------------------------------------------------------------- notebook 02: cost
def cost_of_methods(adapter: ModelAdapter, calibration: Sequence[Any], *, batch_size: int = 8, eps: float = 1e-3,
                    seed: int = 0, paper_units: int = 6) -> tuple[list[dict[str, Any]], dict[str, ScoreResult]]:
    """Wall time and peak memory of every coarse-stage score method on the same calibration batches.

    Methods: zeroth per tensor (forward difference, cached prefixes: the default), zeroth per group, jvp per
    group (the exact directional derivative), first order plain and low-memory (``memory="low"``), and the
    paper's implementation (per tensor, central difference, the whole model rerun for every perturbation:
    ``cache=False``) timed on ``paper_units`` evenly spaced tensors and scaled to all of them (its peak memory
    is as measured). Memory is :func:`ecoflap_utils.measure.track`'s: process RSS above the start on a CPU
    (sampled), CUDA peak allocation on a GPU. Rows: ``{"method", "wall_s", "peak_delta_mb", "memory_kind",
    "passes", "timed_units", "units"}``; also returns the results by method name.
    """
    dev = str(adapter.input_device())
    specs = {
        "zeroth per tensor (forward)": dict(method="zeroth", perturb="tensor"),
        "zeroth per group (forward)": dict(method="zeroth", perturb="group"),
        "jvp per group": dict(method="jvp", perturb="group"),
        "first (plain)": dict(method="first", variant="grad_norm"),
        "first (low memory)": dict(method="first", variant="grad_norm", memory="low"),
    }
    total = count_units(adapter, "block", "tensor")
    k = max(1, min(paper_units, total))
    units = sorted({round(i * (total - 1) / max(k - 1, 1)) for i in range(k)})
    specs["paper's code (per tensor, central, no cache)"] = dict(method="zeroth", perturb="tensor",
                                                                 difference="central", cache=False, units=units)
    rows, results = [], {}
    for name, kw in specs.items():
        with track(dev) as r:
            res = estimate_scores(adapter, calibration=calibration, eps=eps, seed=seed, batch_size=batch_size,
                                  progress=False, **kw)
        scale = total / len(units) if "units" in kw else 1.0
        passes = (f"{res.config['backward_passes']} fwd+bwd" if kw["method"] == "first"
                  else f"{forward_count(res) * scale:.0f} fwd")
        rows.append({"method": name, "wall_s": r["wall_s"] * scale, "peak_delta_mb": r["peak_delta_mb"],
                     "memory_kind": r["memory_kind"], "passes": passes,
                     "timed_units": f"{len(units)} of {total} (time scaled)" if "units" in kw else "all"})
        results[name] = res
    return rows, results


def cost_scatter(ax, rows: Sequence[Mapping[str, Any]], *, x: str = "wall_s", y: str = "peak_delta_mb"):
    """Time against peak memory, one labelled point per method (rows of :func:`cost_of_methods`)."""
    from .plots import OKABE_ITO

    for i, r in enumerate(rows):
        ax.scatter(r[x], max(r[y], 0.0), s=60, color=OKABE_ITO[i % len(OKABE_ITO)], zorder=3)
        ax.annotate(r["method"], (r[x], max(r[y], 0.0)), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("wall time (s, log scale)")
    ax.set_ylabel("peak memory above start (MB)")
    return ax


# --------------------------------------------------------------------------- notebook 03
def allocation_by_estimator(adapter: ModelAdapter, scores: Mapping[str, Mapping[str, float]], target: float, *,
                            max_sparsity_margin: float = 0.1, granularity: str = "block") -> list[dict[str, Any]]:
    """ECoFLaP's per-group sparsity at ``target`` from each estimator's scores (``{estimator: {group: score}}``).

    Rows: ``{"estimator", "group", "stack", "modality", "size", "score", "sparsity"}``, the cap at
    ``target + max_sparsity_margin`` as in :func:`ecoflap_utils.experiments.allocation_table`.
    """
    from .allocate import allocate_sparsity

    info = group_info(adapter, score_groups(adapter, granularity))
    sizes = {g: v["size"] for g, v in info.items()}
    rows = []
    for est, sc in scores.items():
        sp = allocate_sparsity(sc, sizes, target, method="ecoflap", max_sparsity=min(target + max_sparsity_margin, 0.99))
        rows += [{"estimator": est, "group": g, "stack": info[g]["stack"], "modality": info[g]["modality"],
                  "size": sizes[g], "score": sc[g], "sparsity": sp[g]} for g in info]
    return rows


def modality_sparsity(rows: Sequence[Mapping[str, Any]], by: str = "estimator") -> dict[str, dict[str, float]]:
    """Per ``by`` value and modality, the size-weighted mean sparsity (the module's overall sparsity)."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        cell = acc.setdefault(r[by], {}).setdefault(r["modality"], [0.0, 0.0])
        cell[0] += r["sparsity"] * r["size"]
        cell[1] += r["size"]
    return {k: {m: s / n for m, (s, n) in mods.items()} for k, mods in acc.items()}


# --------------------------------------------------------------------------- notebook 01: local scores
_LAVIS_VISION = re.compile(r"^visual_encoder\.blocks\.(\d+)\.")
_LAVIS_T5 = re.compile(r"^t5_model\.(encoder|decoder)\.block\.(\d+)\.")


def lavis_modality(name: str) -> tuple[str, str, int]:
    """``(modality, stack, block index)`` of a LAVIS BLIP-2 Flan-T5 parameter name."""
    m = _LAVIS_VISION.match(name)
    if m:
        return "vision", "visual_encoder", int(m.group(1))
    m = _LAVIS_T5.match(name)
    if m:
        return "language", f"t5_{m.group(1)}", int(m.group(2))
    raise UserError(f"{name} is neither a vision (visual_encoder.blocks.N) nor a language (t5_model.encoder/decoder) weight")


def official_local_scores(method: str = "wanda", path: str | Path | None = None) -> list[dict[str, Any]]:
    """The authors' per-tensor local scores of BLIP-2 Flan-T5-XL (data/official/, MIT), one row per weight in the
    layer order of their LAVIS/plot.py (vision blocks, then T5 encoder, then decoder; file order within a block):
    ``{"name", "modality", "stack", "block", "layer", "score"}``."""
    from .lavis import official_score_file

    path = Path(path) if path is not None else official_score_file(method)
    raw = json.loads(path.read_text())
    scores = raw.get("scores", raw)
    rows = []
    for i, (name, v) in enumerate(scores.items()):
        mod, stack, block = lavis_modality(name)
        rows.append({"name": name, "modality": mod, "stack": stack, "block": block, "score": float(v), "_i": i})
    order = {"visual_encoder": 0, "t5_encoder": 1, "t5_decoder": 2}
    rows.sort(key=lambda r: (order[r["stack"]], r["block"], r["_i"]))  # plot.py's compare(), stable
    for j, r in enumerate(rows):
        r["layer"] = j
        del r["_i"]
    return rows


def local_wanda_scores(adapter: ModelAdapter, calibration: Sequence[Any], *, sparsity: float = 0.5,
                       batch_size: int = 8, comparison: Any = "row") -> dict[str, float]:
    """The official "local score of Wanda" of every pruned weight tensor: mean_ij |W_ij| sqrt(scaler_row_j).

    As in the authors' LAVIS code (``wanda_pruner.py``: ``WrappedGPT.add_batch`` and ``W_metric``, which their
    ``LAVIS/plot.py`` plots from ``importance_scores/*.pth``), scaler_row_j is the sum over calibration tokens
    of x_j^2 divided by the number of calibration samples, and the statistics of each block are gathered
    while pruning block by block with uniform Wanda at ``sparsity`` (their files: 0.5), so a block's inputs
    come from the pruned blocks before it (``batch_size`` and ``comparison`` as in ``prune``: the official
    BLIP-2 code compares per matrix on the vision encoder, ``experiments.prune_settings(adapter, "paper")``).
    The model's weights are restored afterwards. Returns ``{weight name: score}`` in model order.
    """
    from .experiments import restored
    from .prune import prune

    if not 0 < sparsity < 1:
        raise UserError(f"sparsity must be in (0, 1), got {sparsity!r}")
    sink: dict[str, float] = {}
    root_n = math.sqrt(len(calibration))

    def record(name: str, score: torch.Tensor) -> None:
        # the official scaler_row is sum_tokens x_j^2 / n_samples, so sqrt(scaler_row) = ||X_j|| / sqrt(n_samples)
        sink[name] = float(score.mean()) / root_n

    with restored(adapter):
        prune(adapter, sparsity, method="wanda", calibration=list(calibration), batch_size=batch_size,
              comparison=comparison, return_masks=False, progress=False, on_scores=record)
    return {w: sink[w] for w in adapter.layer_names() if w in sink}


def local_score_rows(adapter: ModelAdapter, scores: Mapping[str, float]) -> list[dict[str, Any]]:
    """Rows like :func:`official_local_scores` for a model of ours: ``{"name", "modality", "stack", "block",
    "layer", "score"}`` in model order."""
    block_of = adapter.block_of()
    index = {b.name: i for i, b in enumerate(adapter.blocks)}
    rows = []
    for j, (w, v) in enumerate(scores.items()):
        b = block_of[w]
        rows.append({"name": w, "modality": b.modality, "stack": b.stack, "block": index[b.name], "layer": j,
                     "score": float(v)})
    return rows


def modality_medians(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """``{"<modality>_median": median score}`` per modality, and ``"vision_over_language"``: the ratio of the
    vision median to the language median (when both exist)."""
    out = {}
    for mod in dict.fromkeys(r["modality"] for r in rows):
        out[f"{mod}_median"] = float(np.median([r["score"] for r in rows if r["modality"] == mod]))
    if out.get("language_median") and "vision_median" in out:
        out["vision_over_language"] = out["vision_median"] / out["language_median"]
    return out

def notebook02_records(model: str, agreement: Sequence[Mapping[str, Any]], differences: Sequence[Mapping[str, Any]],
                       costs: Sequence[Mapping[str, Any]], default: ScoreResult, *, samples: int,
                       low_memory_diff: float | None = None,
                       calibration: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Notebook 02's results records: ``score_agreement`` (spearman by samples, one method per estimator and
    reference), ``finite_difference`` (forward vs central by eps), ``cost`` (wall_s, peak_delta_mb per method;
    the low-memory first order also carries its ``max_rel_diff`` to plain) and ``stability`` (the default run's
    split-half stability, when it has one). Non-finite values are left out. ``calibration``: where the samples
    came from (``experiments.calibration_for``'s record; None: generated), kept as ``sparsity_sweep`` keeps a coarse
    stage's: under ``config.calibration.first_stage``."""
    from .experiments import record

    def finite(d: Mapping[str, Any]) -> dict[str, float]:
        return {k: float(v) for k, v in d.items() if v is not None and math.isfinite(float(v))}

    out = []
    for r in agreement:
        out.append(record(model, f"{r['estimator']} vs {r['reference']}", 0.0, "score_agreement",
                          finite({"spearman": r["spearman"]}), config={"samples": int(r["samples"])}))
    for r in differences:
        out.append(record(model, f"forward vs central (per {r['perturb']})", 0.0, "finite_difference",
                          finite({"spearman": r["spearman"], "max_rel_diff": r["max_rel_diff"],
                                  "forwards_forward": r["forwards (forward)"], "forwards_central": r["forwards (central)"]}),
                          config={"eps": float(r["eps"]), "samples": samples}))
    for r in costs:
        m = {"wall_s": r["wall_s"], "peak_delta_mb": r["peak_delta_mb"]}
        if r["method"] == "first (low memory)" and low_memory_diff is not None:
            m["max_rel_diff"] = low_memory_diff
        out.append(record(model, r["method"], 0.0, "cost", finite(m),
                          config={"samples": samples, "memory_kind": r["memory_kind"], "passes": r["passes"],
                                  "timed_units": r["timed_units"]}))
    if default.stability is not None:
        out.append(record(model, "zeroth per tensor", 0.0, "stability", {"stability": default.stability},
                          config={"split": default.split, "batches": len(default.per_batch)}))
    if calibration is not None:
        for r in out:
            r["config"]["calibration"] = {"first_stage": dict(calibration)}
    return out
