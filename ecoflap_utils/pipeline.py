"""The whole prune run behind the CLI: validate, load, coarse stage, fine stage, write (atomically)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .errors import UserError
from .io import atomic_dir, check_out_dir, write_json_atomic
from .measure import Resources
from .prune import METHODS, check_sparsity, parse_nm, prune
from .report import format_table, summarize

ALLOCATIONS = ("uniform", "ecoflap", "owl")
SCORE_METHODS = ("zeroth", "first", "jvp", "magnitude")
GRANULARITIES = ("layer", "block", "module")
PERTURBS = ("tensor", "group")


def validate(*, method: str, sparsity, nm, allocation: str, scores: str, granularity: str, perturb: str,
             eps: float, num_noise: int, max_sparsity, sparsity_dict) -> tuple[float, tuple[int, int] | None]:
    """Check every argument before anything is loaded; returns (sparsity, nm)."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    nm_t = parse_nm(nm)
    if sparsity is None:
        if nm_t is None and sparsity_dict is None:
            raise UserError("give --sparsity (for example 0.5), an N:M pattern (--nm 2:4) or --sparsity-dict")
        sparsity = nm_t[0] / nm_t[1] if nm_t else None
    if sparsity is not None:
        check_sparsity(sparsity)
    if nm_t is not None and sparsity is not None and abs(sparsity - nm_t[0] / nm_t[1]) > 1e-9:
        raise UserError(f"N:M {nm_t[0]}:{nm_t[1]} means sparsity {nm_t[0] / nm_t[1]:g}, not {sparsity:g}: "
                        f"drop --sparsity or set it to {nm_t[0] / nm_t[1]:g}")
    if allocation not in ALLOCATIONS:
        raise UserError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if nm_t is not None and allocation != "uniform":
        raise UserError("N:M prunes every layer at N/M, so it cannot follow a non-uniform allocation: "
                        "use --allocation uniform with --nm")
    if scores not in SCORE_METHODS:
        raise UserError(f"unknown score method {scores!r}; choose one of {', '.join(SCORE_METHODS)}")
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    if perturb not in PERTURBS:
        raise UserError(f"unknown perturbation scope {perturb!r}; choose tensor or group")
    if not eps > 0:
        raise UserError(f"--eps must be > 0, got {eps}")
    if num_noise < 1:
        raise UserError(f"--num-noise must be >= 1, got {num_noise}")
    if max_sparsity is not None and sparsity is not None:
        check_sparsity(max_sparsity, "--max-sparsity")
        if max_sparsity < sparsity:
            raise UserError(f"--max-sparsity {max_sparsity:g} is below the target {sparsity:g}: no allocation "
                            "can reach the target; raise it (default: target + 0.1)")
    if sparsity_dict is not None and not Path(sparsity_dict).exists():
        raise UserError(f"sparsity dict {sparsity_dict} does not exist: pass the sparsity_dict.json of an earlier run")
    return sparsity, nm_t


def run_prune(*, model: str, method: str = "wanda", sparsity: float | None = 0.5, nm: str | None = None,
              comparison: str = "row", stacks: Sequence[str] | None = None, calib_samples: int = 128,
              batch_size: int = 8, seed: int = 0, device: str = "cpu", dtype: str = "float32",
              allocation: str = "uniform", scores: str = "zeroth", granularity: str = "block",
              perturb: str = "group", eps: float = 1e-3, num_noise: int = 1, first_stage_samples: int = 32,
              first_stage_batch_size: int = 8, max_sparsity: float | None = None, owl_lambda: float = 0.08,
              owl_m: float = 5.0, sparsity_dict: str | None = None, out: str, overwrite: bool = False,
              progress: bool = True) -> dict[str, Any]:
    """Prune ``model`` and write the run to ``out``; see ``python -m ecoflap_utils prune --help``."""
    sparsity, nm_t = validate(method=method, sparsity=sparsity, nm=nm, allocation=allocation, scores=scores,
                              granularity=granularity, perturb=perturb, eps=eps, num_noise=num_noise,
                              max_sparsity=max_sparsity, sparsity_dict=sparsity_dict)
    check_out_dir(out, overwrite)
    from .models import load_model

    res = Resources(device)
    coarse: dict[str, Any] = {}
    with atomic_dir(out, overwrite) as tmp:
        with res.stage("load"):
            adapter = load_model(model, device=device, dtype=dtype)
        calibration = adapter.calibration_samples(calib_samples, seed) if method != "magnitude" else None
        if sparsity_dict is not None:
            from .allocate import load_sparsity_dict

            target = load_sparsity_dict(sparsity_dict, adapter)
        elif allocation == "uniform":
            target = sparsity
        else:
            from .coarse import coarse_stage

            coarse = coarse_stage(
                adapter, target=sparsity, allocation=allocation, scores=scores, granularity=granularity,
                perturb=perturb, eps=eps, num_noise=num_noise, samples=first_stage_samples,
                batch_size=first_stage_batch_size, seed=seed, max_sparsity=max_sparsity, stacks=stacks,
                owl_lambda=owl_lambda, owl_m=owl_m, resources=res, progress=progress,
            )
            target = coarse["layer_sparsity"]
            write_json_atomic(tmp / "scores.json", coarse["table"])
        with res.stage("fine"):
            result = prune(adapter, target, method=method, nm=nm_t, calibration=calibration,
                           batch_size=batch_size, seed=seed, comparison=comparison, stacks=stacks,
                           return_masks=False, progress=progress)
        run_cfg = {"allocation": "sparsity_dict" if sparsity_dict else allocation,
                   "requested_sparsity": sparsity, "stacks": list(stacks) if stacks else None,
                   "device": str(device)}
        if coarse:
            run_cfg["coarse"] = coarse["config"]
        from .io import save_pruned

        save_pruned(adapter, tmp, result, config=run_cfg, _inplace=True)
        write_json_atomic(tmp / "sparsity_dict.json", result.sparsity_by_layer)
        write_json_atomic(tmp / "resources.json", res.as_dict())
    table = summarize(result.report, by="stack")
    summary = format_table(table, ["stack", "modality", "layers", "params", "target_sparsity", "actual_sparsity"])
    return {"summary": summary, "result": result, "adapter": adapter, "resources": res.as_dict(), "coarse": coarse}
