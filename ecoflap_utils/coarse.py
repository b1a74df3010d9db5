"""ECoFLaP's coarse stage end to end: scores -> allocation -> per-layer sparsity for ``prune``."""
from __future__ import annotations

from typing import Any, Sequence

from .allocate import allocate_sparsity, expand_to_layers
from .measure import Resources
from .scores import estimate_scores, group_info, owl_outlier_ratios, score_groups


def coarse_stage(adapter, *, target: float, allocation: str = "ecoflap", scores: str = "zeroth",
                 granularity: str = "block", perturb: str = "tensor", difference: str = "forward",
                 eps: float = 1e-3, num_noise: int | str = 1, stability: float = 0.9, max_noise: int = 16,
                 samples: int = 32, batch_size: int = 8, seed: int = 0, max_sparsity: float | None = None,
                 stacks: Sequence[str] | None = None, owl_lambda: float = 0.08, owl_m: float = 5.0,
                 variant: str = "grad", memory: str = "plain", calibration=None,
                 resources: Resources | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Run the coarse stage (ECoFLaP Sec. 3.2, Alg. 1 lines 1-8).

    Returns ``layer_sparsity`` (for ``prune``), ``group_sparsity``, ``scores``, ``result`` (the
    :class:`~ecoflap_utils.scores.ScoreResult`, with standard errors and split-half stability; None for OWL),
    ``table`` (written as scores.json: ``{"stability", "split", "groups": {group: score, stderr, size, stack,
    modality, sparsity}, "config"}``) and ``config``.
    """
    res = resources or Resources(str(adapter.input_device()))
    groups = score_groups(adapter, granularity, stacks)
    info = group_info(adapter, groups)
    if calibration is None:
        calibration = adapter.calibration_samples(samples, seed)
    result = None
    with res.stage("scores"):
        if allocation == "owl":
            sc = owl_outlier_ratios(adapter, calibration, m=owl_m, granularity=granularity, batch_size=batch_size,
                                    stacks=stacks)
        else:
            result = estimate_scores(adapter, scores, calibration, granularity=granularity, eps=eps,
                                     num_noise=num_noise, seed=seed, perturb=perturb, difference=difference,
                                     batch_size=batch_size, stacks=stacks, variant=variant, memory=memory,
                                     stability=stability, max_noise=max_noise, progress=progress)
            sc = result.scores
    with res.stage("allocation"):
        sizes = {g: info[g]["size"] for g in groups}
        group_sparsity = allocate_sparsity(sc, sizes, target, method=allocation, max_sparsity=max_sparsity,
                                           owl_lambda=owl_lambda)
        layer_sparsity = expand_to_layers(group_sparsity, groups)
    config = {"allocation": allocation, "scores": scores if allocation != "owl" else "owl_outlier_ratio",
              "granularity": granularity, "first_stage_samples": len(calibration),
              "first_stage_batch_size": batch_size,
              "max_sparsity": max_sparsity if max_sparsity is not None else min(target + 0.1, 1.0),
              "seed": seed}
    if allocation == "owl":
        config.update(owl_lambda=owl_lambda, owl_m=owl_m)
    elif scores in ("zeroth", "jvp"):
        config.update({k: result.config.get(k) for k in ("perturb", "difference", "eps", "num_noise",
                                                          "num_noise_requested", "forwards")})
        if num_noise == "auto":
            config.update(stability_target=stability, max_noise=max_noise)
    elif scores == "first":
        config.update(variant=variant, memory=memory)
    stderr = result.stderr if result is not None else {}
    table = {"stability": result.stability if result is not None else None,
             "split": result.split if result is not None else None,
             "groups": {g: {"score": sc[g], "stderr": stderr.get(g), **info[g], "sparsity": group_sparsity[g]}
                        for g in groups},
             "config": config}
    return {"layer_sparsity": layer_sparsity, "group_sparsity": group_sparsity, "scores": sc, "result": result,
            "table": table, "config": config}
