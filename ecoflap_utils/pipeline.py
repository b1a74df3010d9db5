"""The whole prune run behind the CLI: validate, load, coarse stage, fine stage, write (atomically)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError
from .io import atomic_dir, check_out_dir, check_save_format, disk_usage, write_json_atomic
from .measure import Resources
from .prune import METHODS, check_sparsity, parse_nm, prune
from .report import format_table, summarize

from .allocate import ALLOCATIONS
from .scores import (DIFFERENCES, FIRST_ORDER_VARIANTS, GRANULARITIES, MEMORY_MODES, PERTURBS, SCORE_METHODS,
                     check_stability)


def parse_num_noise(value) -> int | str:
    """``--num-noise``: a positive integer or ``auto``."""
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserError(f"--num-noise must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise UserError(f"--num-noise must be >= 1, got {n}")
    return n


def validate(*, method: str, sparsity, nm, allocation: str, scores: str, granularity: str, perturb: str,
             eps: float, num_noise, max_sparsity, sparsity_dict, difference: str = "forward", memory: str = "plain",
             stability: float = 0.9, max_noise: int = 16, variant: str = "grad") -> tuple[float, tuple[int, int] | None]:
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
    num_noise = parse_num_noise(num_noise)
    if difference not in DIFFERENCES:
        raise UserError(f"unknown --difference {difference!r}; choose forward or central")
    if memory not in MEMORY_MODES:
        raise UserError(f"unknown --memory mode {memory!r}; choose plain or low")
    if variant not in FIRST_ORDER_VARIANTS:
        raise UserError(f"unknown --variant {variant!r}; choose one of {', '.join(FIRST_ORDER_VARIANTS)}")

    check_stability(stability)
    if num_noise == "auto" and max_noise < 2:
        raise UserError(f"--num-noise auto needs --max-noise >= 2 (two halves of the draws), got {max_noise}")
    if max_sparsity is not None and sparsity is not None:
        check_sparsity(max_sparsity, "--max-sparsity")
        if max_sparsity < sparsity:
            raise UserError(f"--max-sparsity {max_sparsity:g} is below the target {sparsity:g}: no allocation "
                            "can reach the target; raise it (default: target + 0.1)")
    if sparsity_dict is not None and not Path(sparsity_dict).exists():
        raise UserError(f"sparsity dict {sparsity_dict} does not exist: pass the sparsity_dict.json of an earlier run")
    return sparsity, nm_t


def _given(**kw) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def run_prune(*, model: str, method: str = "wanda", sparsity: float | None = 0.5, nm: str | None = None,
              comparison: str | dict | None = None, stacks: Sequence[str] | None = None,
              calib_samples: int | None = None, batch_size: int | None = None, seed: int = 0, device: str = "cpu",
              dtype: str = "float32", allocation: str = "uniform", scores: str = "zeroth",
              granularity: str | None = None, perturb: str | None = None, difference: str | None = None,
              eps: float | None = None, num_noise: int | str | None = None, stability: float = 0.9,
              max_noise: int = 16, memory: str = "plain", variant: str | None = None,
              first_stage_samples: int | None = None, first_stage_batch_size: int | None = None,
              max_sparsity: float | None = None, owl_lambda: float = 0.08, owl_m: float = 5.0,
              sparsity_dict: str | None = None, protocol: str | None = None, calibration: str | None = None,
              calibration_format: str | None = None, image_root: str | None = None,
              calibration_template: str | None = None, clip_objective: str | None = None,
              seq_len: int | None = None, lavis_names: bool = False, out: str, overwrite: bool = False,
              progress: bool = True, device_map: str | dict | None = None,
              max_memory: dict | None = None, save_format: str = "dense") -> dict[str, Any]:
    """Prune ``model`` and write the run to ``out``; see ``python -m ecoflap_utils prune --help``.

    Settings a protocol controls (``comparison``, ``calib_samples``, ``batch_size``, ``granularity``, ``perturb``,
    ``difference``, ``eps``, ``num_noise``, ``variant``, ``first_stage_samples``, ``first_stage_batch_size``,
    ``max_sparsity``, ``seq_len``, ``clip_objective``) default to ``None``: our defaults
    (:data:`ecoflap_utils.protocol.DEFAULTS`) or, with ``protocol="paper"``, the official code's values for the
    model's family; an explicit value that contradicts the preset is refused (:mod:`ecoflap_utils.protocol`).
    ``calibration`` is a path read by :func:`ecoflap_utils.data.calibration.load_calibration` for both stages
    (``calib_samples`` items for the fine stage, ``first_stage_samples`` for the coarse stage, the same seed).
    ``device_map`` / ``max_memory`` spread the model over devices with accelerate (``models.load_model``); a map
    that offloads to disk is refused before anything is loaded or written. ``save_format``: ``dense`` or
    ``compressed`` (pruned layers stored sparse: :func:`ecoflap_utils.io.save_pruned`); ``resources.json`` records
    the weights' bytes on disk and their ratio to dense (``disk``).
    """
    from . import protocol as P
    from .data.calibration import CLIP_OBJECTIVES, check_format

    P.check_protocol(protocol)
    given = _given(comparison=comparison, calib_samples=calib_samples, batch_size=batch_size,
                   granularity=granularity, perturb=perturb, difference=difference, eps=eps, num_noise=num_noise,
                   variant=variant, first_stage_samples=first_stage_samples,
                   first_stage_batch_size=first_stage_batch_size, max_sparsity=max_sparsity, seq_len=seq_len,
                   clip_objective=clip_objective)
    if isinstance(given.get("comparison"), str):
        given["comparison"] = parse_comparison(given["comparison"])
    d = {**P.DEFAULTS, **given}  # checked now with our defaults filling the gaps; the preset's are valid too
    sparsity, nm_t = validate(method=method, sparsity=sparsity, nm=nm, allocation=allocation, scores=scores,
                              granularity=d["granularity"], perturb=d["perturb"], eps=d["eps"],
                              num_noise=d["num_noise"], max_sparsity=d["max_sparsity"], sparsity_dict=sparsity_dict,
                              difference=d["difference"], memory=memory, stability=stability, max_noise=max_noise,
                              variant=d["variant"])
    for key in ("calib_samples", "batch_size", "first_stage_samples", "first_stage_batch_size", "seq_len"):
        if key in given and (not isinstance(given[key], int) or given[key] < 1):
            raise UserError(f"{P.flag(key)} must be a positive integer, got {given[key]!r}")
    if clip_objective is not None and clip_objective not in CLIP_OBJECTIVES:
        raise UserError(f"unknown --clip-objective {clip_objective!r}; choose {', '.join(CLIP_OBJECTIVES)}")
    check_format(calibration_format)
    for opt, val in (("--calibration-format", calibration_format), ("--image-root", image_root),
                     ("--calibration-template", calibration_template)):
        if val is not None and calibration is None:
            raise UserError(f"{opt} describes the data of --calibration: give --calibration PATH too, or drop {opt}")
    P.precheck(protocol, given, method=method, allocation=allocation, scores=scores, target=sparsity)
    from .models import load_model
    from .models.devices import check_device_map

    check_device_map(device_map)
    if max_memory is not None and not device_map:
        raise UserError("max_memory bounds what a device map puts on each device: give device_map='auto' with it")
    check_out_dir(out, overwrite)
    check_save_format(save_format, name=model)

    res = Resources(device)
    coarse: dict[str, Any] = {}
    with atomic_dir(out, overwrite) as tmp:
        with res.stage("load"):
            adapter = load_model(model, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory)
        family = getattr(adapter, "family", None)
        if lavis_names and family != "blip2":
            raise UserError(f"--lavis-names writes LAVIS (BLIP-2) parameter names, but {adapter.name} is a "
                            f"{family} model: drop --lavis-names")
        cfg, proto_rec = P.resolve(protocol, given, family=family, method=method, allocation=allocation,
                                   scores=scores, target=sparsity,
                                   stacks=list(stacks) if stacks else list(adapter.default_stacks or adapter.stacks()))
        if cfg["seq_len"] is not None:
            if family != "causal_lm":
                raise UserError(f"--seq-len sets the token window of a language model's calibration, but "
                                f"{adapter.name} is a {family} model: drop --seq-len")
            adapter.seq_len = int(cfg["seq_len"])
        fine_needed = method != "magnitude"
        coarse_needed = sparsity_dict is None and allocation != "uniform"

        def load(n: int):
            from .data.calibration import load_calibration

            return load_calibration(adapter, calibration, n=n, seed=seed, format=calibration_format,
                                    image_root=image_root, seq_len=cfg["seq_len"], template=calibration_template,
                                    clip_objective=cfg["clip_objective"], augment=cfg["calibration_augment"])

        fine_calib = fine_rec = first_calib = first_rec = None
        if calibration is not None:  # both stages read before any work, so bad data fails fast
            if fine_needed:
                fine_calib, fine_rec = load(cfg["calib_samples"])
            if coarse_needed:
                first_calib, first_rec = load(cfg["first_stage_samples"])
        elif fine_needed:
            fine_calib = adapter.calibration_samples(cfg["calib_samples"], seed)
        if sparsity_dict is not None:
            from .allocate import load_sparsity_dict

            target = load_sparsity_dict(sparsity_dict, adapter)
        elif allocation == "uniform":
            target = sparsity
        else:
            from .coarse import coarse_stage

            coarse = coarse_stage(
                adapter, target=sparsity, allocation=allocation, scores=scores, granularity=cfg["granularity"],
                perturb=cfg["perturb"], difference=cfg["difference"], eps=cfg["eps"],
                num_noise=parse_num_noise(cfg["num_noise"]), stability=stability, max_noise=max_noise,
                variant=cfg["variant"], memory=memory, samples=cfg["first_stage_samples"],
                batch_size=cfg["first_stage_batch_size"], seed=seed, max_sparsity=cfg["max_sparsity"],
                stacks=stacks, owl_lambda=owl_lambda, owl_m=owl_m, calibration=first_calib, resources=res,
                progress=progress,
            )
            coarse["config"]["calibration"] = first_rec if first_rec is not None else adapter.calibration_name
            target = coarse["layer_sparsity"]
            write_json_atomic(tmp / "scores.json", coarse["table"])
            if coarse["result"] is not None and progress:
                from .scores import stability_message

                print(stability_message(coarse["result"]), file=sys.stderr)
        with res.stage("fine"):
            result = prune(adapter, target, method=method, nm=nm_t, calibration=fine_calib,
                           batch_size=cfg["batch_size"], seed=seed, comparison=cfg["comparison"], stacks=stacks,
                           return_masks=False, progress=progress)
        run_cfg = {"allocation": "sparsity_dict" if sparsity_dict else allocation,
                   "requested_sparsity": sparsity, "stacks": list(stacks) if stacks else None,
                   "device": str(device), **proto_rec}
        if device_map:
            placed = getattr(adapter.model, "hf_device_map", None) or device_map
            run_cfg["device_map"] = {k: str(v) for k, v in placed.items()} if isinstance(placed, dict) else placed
        if fine_rec is not None:
            run_cfg["calibration"] = fine_rec
        if family == "causal_lm":
            run_cfg["seq_len"] = adapter.seq_len
        if coarse:
            run_cfg["coarse"] = coarse["config"]
        from .io import save_pruned

        save_pruned(adapter, tmp, result, config=run_cfg, format=save_format, _inplace=True)
        write_json_atomic(tmp / "sparsity_dict.json", result.sparsity_by_layer)
        if lavis_names:
            from .lavis import lm_of, to_lavis_names

            lm = lm_of(adapter)
            write_json_atomic(tmp / "sparsity_dict.lavis.json", to_lavis_names(result.sparsity_by_layer, lm=lm))
            if coarse:
                table = dict(coarse["table"])
                table["groups"] = to_lavis_names(table["groups"], lm=lm)
                write_json_atomic(tmp / "scores.lavis.json", table)
        resources = {**res.as_dict(), "disk": disk_usage(tmp)}
        write_json_atomic(tmp / "resources.json", resources)
    table = summarize(result.report, by="stack")
    summary = format_table(table, ["stack", "modality", "layers", "params", "target_sparsity", "actual_sparsity"])
    return {"summary": summary, "result": result, "adapter": adapter, "resources": resources, "coarse": coarse}


def parse_comparison(value: str) -> str | dict[str, str]:
    """``--comparison``: ``row``, ``matrix``, ``global`` or per stack ``vision=matrix,text_encoder=row,...``."""
    if "=" not in value:
        return value
    out: dict[str, str] = {}
    for part in value.split(","):
        k, sep, v = part.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise UserError(f"--comparison {value!r}: write STACK=row|matrix pairs separated by commas, e.g. "
                            "vision=matrix,text_encoder=row,text_decoder=row")
        out[k.strip()] = v.strip()
    return out
