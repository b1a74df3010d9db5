"""ECoFLaP's coarse stage end to end: scores -> allocation -> per-layer sparsity for ``prune``."""
from __future__ import annotations

from typing import Any, Sequence

from .allocate import allocate_sparsity, expand_to_layers
from .measure import Resources
from .scores import compute_scores, group_info, owl_outlier_ratios, score_groups


def coarse_stage(adapter, *, target: float, allocation: str = "ecoflap", scores: str = "zeroth",
                 granularity: str = "block", perturb: str = "group", eps: float = 1e-3, num_noise: int = 1,
                 samples: int = 32, batch_size: int = 8, seed: int = 0, max_sparsity: float | None = None,
                 stacks: Sequence[str] | None = None, owl_lambda: float = 0.08, owl_m: float = 5.0,
                 variant: str = "grad", calibration=None, resources: Resources | None = None,
                 progress: bool | None = None) -> dict[str, Any]:
    """Run the coarse stage (ECoFLaP Sec. 3.2, Alg. 1 lines 1-8).

    Returns ``layer_sparsity`` (for ``prune``), ``group_sparsity``, ``scores``, ``table`` (one entry per
    group: score, size, stack, modality, sparsity — written as scores.json) and ``config``.
    """
    res = resources or Resources(str(adapter.input_device()))
    groups = score_groups(adapter, granularity, stacks)
    info = group_info(adapter, groups)
    if calibration is None:
        calibration = adapter.calibration_samples(samples, seed)
    with res.stage("scores"):
        if allocation == "owl":
            sc = owl_outlier_ratios(adapter, calibration, m=owl_m, granularity=granularity, batch_size=batch_size,
                                    stacks=stacks)
        else:
            sc = compute_scores(adapter, scores, calibration, granularity=granularity, eps=eps, num_noise=num_noise,
                                seed=seed, perturb=perturb, batch_size=batch_size, stacks=stacks, variant=variant,
                                progress=progress)
    with res.stage("allocation"):
        sizes = {g: info[g]["size"] for g in groups}
        group_sparsity = allocate_sparsity(sc, sizes, target, method=allocation, max_sparsity=max_sparsity,
                                           owl_lambda=owl_lambda)
        layer_sparsity = expand_to_layers(group_sparsity, groups)
    table = {g: {"score": sc[g], **info[g], "sparsity": group_sparsity[g]} for g in groups}
    config = {"allocation": allocation, "scores": scores if allocation != "owl" else "owl_outlier_ratio",
              "granularity": granularity, "perturb": perturb, "eps": eps, "num_noise": num_noise,
              "first_stage_samples": len(calibration), "first_stage_batch_size": batch_size,
              "max_sparsity": max_sparsity if max_sparsity is not None else min(target + 0.1, 1.0),
              "owl_lambda": owl_lambda, "owl_m": owl_m, "variant": variant, "seed": seed}
    return {"layer_sparsity": layer_sparsity, "group_sparsity": group_sparsity, "scores": sc, "table": table,
            "config": config}
