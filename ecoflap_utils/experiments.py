"""The notebooks' experiments as tested functions: sweeps, sensitivity, score agreement, landscapes.

Each returns plain values (lists of results records in the schema of DESIGN.md, dicts, arrays), so a
notebook cell calls one function and shows a table or a figure.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .allocate import allocate_sparsity, expand_to_layers
from .measure import track
from .models.base import ModelAdapter
from .prune import prune
from .scores import compute_scores, estimate_scores, group_info, owl_outlier_ratios, score_groups

#: the methods compared in the notebooks: name -> how to prune
METHODS: dict[str, dict[str, Any]] = {
    "magnitude": {"method": "magnitude", "allocation": "uniform"},
    "wanda": {"method": "wanda", "allocation": "uniform"},
    "sparsegpt": {"method": "sparsegpt", "allocation": "uniform"},
    "ecoflap-zeroth": {"method": "wanda", "allocation": "ecoflap", "scores": "zeroth"},
    "ecoflap-first": {"method": "wanda", "allocation": "ecoflap", "scores": "first"},
    "ecoflap-zeroth-sparsegpt": {"method": "sparsegpt", "allocation": "ecoflap", "scores": "zeroth"},
    "owl": {"method": "wanda", "allocation": "owl"},
}


#: counts returned by the evaluators that are not quality metrics (kept out of results records)
BOOKKEEPING = ("n", "tokens", "windows", "window", "stride", "n_images", "n_texts")


def record(model: str, method: str, sparsity: float, task: str, metrics: Mapping[str, Any],
           resources: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None, *,
           intervals: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One results record in the project's schema: ``{"model", "method", "sparsity", "task", "metrics",
    "resources", "config"}``, plus ``"intervals": {metric: [low, high]}`` (95 % bootstrap over the evaluation
    items, :mod:`ecoflap_utils.intervals`) when ``intervals`` holds any."""
    from .evaluate import clean_intervals

    rec = {"model": model, "method": method, "sparsity": float(sparsity), "task": task, "metrics": dict(metrics)}
    iv = clean_intervals(intervals)
    if iv:
        rec["intervals"] = iv
    rec.update(resources=dict(resources or {}), config=dict(config or {}))
    return rec


@contextmanager
def restored(adapter: ModelAdapter) -> Iterator[ModelAdapter]:
    """Run a block of code on ``adapter`` and put its weights back afterwards (a CPU copy is kept)."""
    saved = {k: v.detach().to("cpu", copy=True) for k, v in adapter.model.state_dict().items()}
    try:
        yield adapter
    finally:
        adapter.model.load_state_dict(saved)


def evaluate_task_with_intervals(adapter: ModelAdapter, task: str | None = None, data=None,
                                 limit: int | None = None, **kw) -> tuple[dict[str, float], dict[str, list[float]]]:
    """:func:`evaluate_task` and the 95 % intervals of its headline metric: ``(metrics, intervals)``, with
    ``intervals = {metric: [low, high]}`` (empty when the evaluator gave none), ready for ``record(...,
    intervals=intervals)``."""
    from . import evaluate

    return _metrics_of(evaluate.evaluate(adapter, task, data=data, limit=limit, progress=False, **kw))


def _metrics_of(out: Any) -> tuple[dict[str, float], dict[str, list[float]]]:
    """An evaluator's output as ``(metrics, intervals)``: the numeric metrics (floats, bookkeeping counts left
    out) and the 95 % intervals of the headline metric."""
    from . import evaluate

    intervals = out.get("intervals") if isinstance(out, dict) else None
    out = out.get("metrics", out) if isinstance(out, dict) and "metrics" in out else out
    metrics = {k: float(v) for k, v in out.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in BOOKKEEPING}
    return metrics, evaluate.clean_intervals(intervals, metrics)


def evaluate_task(adapter: ModelAdapter, task: str | None = None, data=None, limit: int | None = None,
                  **kw) -> dict[str, Any]:
    """Evaluate on ``task`` (default: the model's own) with ``ecoflap_utils.evaluate``; returns the metrics
    (floats). :func:`evaluate_task_with_intervals` also returns their intervals."""
    return evaluate_task_with_intervals(adapter, task, data, limit, **kw)[0]


def coarse_scores(adapter: ModelAdapter, scores: str, *, calibration=None, samples: int = 32, batch_size: int = 8,
                  granularity: str = "block", seed: int = 0, **kw) -> tuple[dict[str, float], dict[str, Any]]:
    """Group scores once (they do not depend on the target sparsity) and their wall time / peak memory.

    The resources dict also carries the scores' split-half rank stability (``"stability"``, None where it
    cannot be computed, e.g. magnitude or OWL) and what was split (``"stability_split"``), so every record
    pruned with these scores shows how reliable they were (:func:`ecoflap_utils.scores.estimate_scores`)."""
    extra: dict[str, Any] = {}
    with track(str(adapter.input_device())) as res:
        if scores == "owl":
            sc = owl_outlier_ratios(adapter, calibration, granularity=granularity, samples=samples,
                                    batch_size=batch_size, seed=seed)
        else:
            r = estimate_scores(adapter, scores, calibration, granularity=granularity, samples=samples,
                                batch_size=batch_size, seed=seed, **kw)
            sc, extra = r.scores, {"stability": r.stability, "stability_split": r.split}
    return sc, {**dict(res), **extra}


def calibration_for(adapter: ModelAdapter, source: Any, n: int, seed: int = 0,
                    **kw) -> tuple[list[Any], dict[str, Any] | None]:
    """``n`` calibration samples for ``adapter`` and the record of where they came from: ``(samples, source_record)``.

    ``source`` is the notebooks' ``CALIBRATION`` parameter: ``None`` draws the model's own samples (bundled or
    generated: ``adapter.calibration_samples(n, seed)``; the record is ``None``), a path reads ``n`` items from disk with
    :func:`ecoflap_utils.data.calibration.load_calibration` (``kw``: its ``format``, ``image_root``, ``seq_len``,
    ``template``, ``clip_objective``); the record is then its ``{"path", "format", "count", "seed", "ids_sha256",
    ...}``, what :func:`sparsity_sweep` keeps per stage under ``config.calibration`` (:func:`calibration_config`)."""
    if source is None:
        return adapter.calibration_samples(n, seed), None
    from .data.calibration import load_calibration

    return load_calibration(adapter, source, n=n, seed=seed, **kw)


def calibration_config(protocol: str | None = None, *, fine: Mapping[str, Any] | None = None,
                       first_stage: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A record's ``config`` with the ``protocol`` and where each stage's calibration came from, in
    :func:`sparsity_sweep`'s layout: ``calibration: {"fine": ..., "first_stage": ...}`` (:func:`calibration_for`'s
    records; a stage whose samples were generated, or that did not run, is left out, and so is ``calibration``
    when both are)."""
    conf = {**extra, "protocol": protocol}
    stages = {k: dict(v) for k, v in (("fine", fine), ("first_stage", first_stage)) if v is not None}
    if stages:
        conf["calibration"] = stages
    return conf


def calibration_per_dataset(calibration: Mapping[str, Any] | None, datasets: Mapping[str, Any]) -> dict[str, Any]:
    """Notebook 05's ``CALIBRATION``: ``{dataset name: calibration path}`` for every name of ``datasets`` (its
    ``DATASETS``, or ``{"bundled": None}``). ``None`` gives ``None`` (generated samples) for each; a mapping must
    name exactly the datasets (each is calibrated on its own train split, as the official CoOp code does)."""
    from .errors import UserError

    if calibration is None:
        return {name: None for name in datasets}
    if not isinstance(calibration, Mapping):
        raise UserError(f"CALIBRATION must map each dataset to its calibration data (e.g. {{name: /data/name/train}}), "
                        f"got {calibration!r}")
    missing, extra = [n for n in datasets if n not in calibration], [n for n in calibration if n not in datasets]
    if missing or extra:
        raise UserError(f"CALIBRATION names {', '.join(map(str, calibration)) or 'no dataset'} but the datasets are "
                        f"{', '.join(map(str, datasets))}: give one calibration path per dataset")
    return {name: calibration[name] for name in datasets}


def _paper_preset(adapter: ModelAdapter, protocol: str | None, *, method: str = "wanda",
                  allocation: str = "ecoflap", scores: str = "zeroth") -> dict[str, Any] | None:
    from . import protocol as P

    if P.check_protocol(protocol) is None:
        return None
    stacks = list(getattr(adapter, "default_stacks", None) or adapter.stacks())
    return P.paper_settings(adapter.family, method=method, allocation=allocation, scores=scores, stacks=stacks)[0]


def prune_settings(adapter: ModelAdapter, protocol: str | None, method: str = "wanda") -> dict[str, Any]:
    """:func:`~ecoflap_utils.prune.prune`'s ``batch_size`` and ``comparison`` for a uniform ``method`` run under
    ``protocol`` (``{}`` without one; with ``"paper"`` the official code's values for the model's family, e.g.
    per-matrix Wanda on BLIP-2's vision encoder, as :func:`sparsity_sweep` uses them)."""
    ps = _paper_preset(adapter, protocol, method=method, allocation="uniform")
    return {} if ps is None else {"batch_size": ps["batch_size"], "comparison": ps["comparison"]}


def score_settings(adapter: ModelAdapter, protocol: str | None, scores: str = "zeroth") -> dict[str, Any]:
    """:func:`coarse_scores`' keyword arguments for ``scores`` under ``protocol`` (``{}`` without one; with
    ``"paper"``: the first-stage ``batch_size``, ``granularity`` and, for zeroth order, the estimator: per tensor,
    central difference, eps 1e-3, one direction; for first order the ``variant``), as :func:`sparsity_sweep`
    computes its coarse-stage scores."""
    ps = _paper_preset(adapter, protocol, scores=scores)
    if ps is None:
        return {}
    kw = {"batch_size": ps["first_stage_batch_size"], "granularity": ps["granularity"]}
    if scores == "first":
        return {**kw, "variant": ps.get("variant", "grad")}
    if scores == "zeroth":
        return {**kw, **{k: ps[k] for k in ("perturb", "difference", "eps", "num_noise")}}
    return kw


def check_protocol_parameters(adapter: ModelAdapter, protocol: str | None, *, scores: str = "zeroth",
                              **given: Any) -> None:
    """Refuse notebook parameters that ``protocol`` would replace with other values, so none is silently ignored.

    ``given``: the notebook's values by setting, e.g. ``calib_samples=CALIB_SAMPLES, first_stage_samples=
    FIRST_STAGE_SAMPLES, perturb=PERTURB, seq_len=SEQ_LEN`` (``None`` values are not checked). With ``"paper"``
    each is compared with the preset of the model's family (Wanda fine stage, ECoFLaP allocation, ``scores``); a
    contradiction raises ``UserError`` naming the parameter (upper case, as in the notebook) and both values."""
    from . import protocol as P
    from .errors import UserError

    ps = _paper_preset(adapter, protocol, scores=scores)
    if ps is None:
        return
    for key, value in given.items():
        if value is None or key not in ps or P._same(key, value, ps[key], None):
            continue
        raise UserError(f"PROTOCOL {protocol!r} sets {key.upper()} {ps[key]} for {adapter.family} models, but "
                        f"{key.upper()} is {value!r}: set {key.upper()}: {ps[key]} (or PROTOCOL: null for our settings)")


def score_cache_key(scores: str, protocol: str | None = None) -> str:
    """Where :func:`sparsity_sweep` keeps the coarse-stage scores of ``scores`` in its ``score_cache``:
    ``"zeroth"``, or ``"zeroth|paper"`` under a protocol."""
    return scores if protocol is None else f"{scores}|{protocol}"


def ablation_scores(adapter: ModelAdapter, score_cache: dict, base: Mapping[str, Any], *, calibration: Any = None,
                    seed: int = 0, protocol: str | None = None,
                    **changes: Any) -> tuple[dict[str, float], dict[str, Any], dict[str, Any] | None]:
    """Zeroth-order block scores of one ablation setting: ``base`` (:func:`coarse_scores` keywords, with
    ``samples``) with ``changes`` applied, computed once per setting and kept in ``score_cache``.

    The unchanged setting is :func:`sparsity_sweep`'s own entry (:func:`score_cache_key`), so a sweep run with
    the same cache, calibration and seed has already computed it. Returns ``(scores, resources, first_stage)``:
    ``first_stage`` is :func:`calibration_for`'s record of the coarse stage's samples (None when generated),
    read once per sample count and kept in the cache too, so every ablation row can name its calibration
    (:func:`calibration_config`), reused scores included."""
    import json

    kw = {**base, **changes}
    key = score_cache_key("zeroth", protocol) if kw == dict(base) else json.dumps(kw, sort_keys=True, default=str)
    n = kw.pop("samples")
    source_key = f"calibration|{n}"
    if key not in score_cache or source_key not in score_cache:
        calib, score_cache[source_key] = calibration_for(adapter, calibration, n, seed)
        if key not in score_cache:
            score_cache[key] = coarse_scores(adapter, "zeroth", calibration=calib, samples=n, seed=seed,
                                             progress=False, **kw)
    sc, resources = score_cache[key]
    return sc, resources, score_cache[source_key]


def sparsity_sweep(adapter: ModelAdapter, *, methods: Sequence[str], sparsities: Sequence[float],
                   task: str | None = None, data=None, limit: int | None = None, calib_samples: int = 128,
                   first_stage_samples: int = 32, batch_size: int = 8, seed: int = 0, granularity: str = "block",
                   max_sparsity_margin: float = 0.1, include_dense: bool = True, progress: bool | None = None,
                   eval_kw: Mapping[str, Any] | None = None,
                   score_cache: dict[str, tuple[dict, dict]] | None = None, protocol: str | None = None,
                   calibration: str | None = None, perturb: str = "tensor",
                   on_pruned: Any = None) -> list[dict[str, Any]]:
    """Dense, then every method at every sparsity: prune a restored copy, evaluate, record (ECoFLaP Tables 1-3).

    Each record carries ``"intervals"``: the 95 % bootstrap interval of the task's headline metric over the
    evaluation items (sampling variation of those items only; calibration uses the one ``seed``).

    Coarse-stage scores are computed once per score method and reused across sparsities. Pass a dict as
    ``score_cache`` to reuse them afterwards (keys ``"zeroth"``, ``"first"``, ``"owl"``: ``(scores, resources)``,
    computed on ``first_stage_samples`` samples with the default eps and noise).

    ``calibration``: a path read with :func:`ecoflap_utils.data.calibration.load_calibration` (``calib_samples``
    items for the fine stage, ``first_stage_samples`` for the coarse stage, ``seed``); records carry its
    ``{"path", "format", "count", "seed", "ids_sha256", ...}`` under ``config.calibration``; under a protocol that
    asks for it (``calibration_augment``: CLIP under ``"paper"``) its images pass through CoOp's training
    augmentation, drawn from ``seed`` (the record's ``augmentation``).
    ``protocol="paper"``: each method runs with the official code's settings for the model's family
    (:func:`ecoflap_utils.protocol.paper_settings`): they replace ``calib_samples``, ``first_stage_samples``,
    ``batch_size``, ``granularity`` and ``max_sparsity_margin`` (0.1), and set the comparison and the zeroth- /
    first-order estimator (for a causal LM, ``adapter.seq_len`` is set to 2048); records carry ``config.protocol``
    and ``config.protocol_settings``. Score caches are
    keyed per protocol (``"zeroth|paper"``).
    ``perturb``: the zeroth-order estimator without a protocol: ``"tensor"`` (the paper's) or ``"group"`` (one
    direction per block: about T times fewer forwards for T tensors per block, a different estimator; the
    default grid uses it where the per-tensor pass would not fit its time, and the notebook says so).
    ``on_pruned(adapter, record) -> records``: called with each pruned (and evaluated) model before its weights
    are restored; the records it returns follow that method's record (``recovery.recovery_curves`` fine-tunes
    there).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        from .errors import UserError

        raise UserError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    eval_kw = dict(eval_kw or {})
    task = task or getattr(adapter, "default_task", None)
    records = []
    if include_dense:
        with track(str(adapter.input_device())) as r:
            m, iv = evaluate_task_with_intervals(adapter, task, data, limit, **eval_kw)
        records.append(record(adapter.name, "dense", 0.0, task, m, {"eval": dict(r)}, intervals=iv))
    from . import protocol as P

    protocol = P.check_protocol(protocol)
    if protocol is not None and getattr(adapter, "family", None) == "causal_lm":
        adapter.seq_len = P.paper_settings("causal_lm", method="wanda", allocation="uniform", scores="zeroth")[0][
            "seq_len"]
    calib_cache: dict[int, tuple[list, Any]] = {}
    # the protocol's training augmentation of calibration images (CLIP under "paper": CoOp's random resized crop
    # and flip, protocol.paper_settings' calibration_augment); it applies to data read from disk
    augment = bool(protocol is not None and getattr(adapter, "family", None) == "clip" and P.paper_settings(
        "clip", method="wanda", allocation="uniform", scores="zeroth")[0].get("calibration_augment"))

    def samples(n: int) -> tuple[list, Any]:
        if n not in calib_cache:
            if calibration is not None:
                from .data.calibration import load_calibration

                calib_cache[n] = load_calibration(adapter, calibration, n=n, seed=seed,
                                                  **({"augment": True} if augment else {}))
            else:
                calib_cache[n] = (adapter.calibration_samples(n, seed), adapter.calibration_name)
        return calib_cache[n]

    def settings(spec: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        if protocol is None:
            return ({"calib_samples": calib_samples, "first_stage_samples": first_stage_samples,
                     "batch_size": batch_size, "first_stage_batch_size": batch_size, "granularity": granularity,
                     "comparison": "row", "max_sparsity_margin": max_sparsity_margin,
                     "score_kw": {"perturb": perturb} if spec.get("scores", "zeroth") == "zeroth" else {}},
                    {"protocol": None, **({"perturb": perturb} if spec["allocation"] == "ecoflap" else {})})
        ps, notes = P.paper_settings(adapter.family, method=spec["method"], allocation=spec["allocation"],
                                     scores=spec.get("scores", "zeroth"),
                                     stacks=list(adapter.default_stacks or adapter.stacks()))
        score_kw = {k: ps[k] for k in ("perturb", "difference", "eps", "num_noise")}
        if spec.get("scores") == "first":
            score_kw = {"variant": ps.get("variant", "grad")}
        return ({"calib_samples": ps["calib_samples"], "first_stage_samples": ps["first_stage_samples"],
                 "batch_size": ps["batch_size"], "first_stage_batch_size": ps["first_stage_batch_size"],
                 "granularity": ps["granularity"], "comparison": ps["comparison"], "max_sparsity_margin": 0.1,
                 "score_kw": score_kw},
                {"protocol": protocol, "protocol_settings": ps, "protocol_notes": notes})

    score_cache = {} if score_cache is None else score_cache
    jobs = [(name, s) for name in methods for s in sparsities]
    for name, s in tqdm(jobs, desc=f"sweep {adapter.name}", disable=None if progress in (None, True) else True):
        spec = METHODS[name]
        cfg, proto_rec = settings(spec)
        resources: dict[str, Any] = {}
        calib_rec: dict[str, Any] = {}
        with restored(adapter):
            target: Any = s
            if spec["allocation"] != "uniform":
                groups = score_groups(adapter, cfg["granularity"])
                sizes = {g: v["size"] for g, v in group_info(adapter, groups).items()}
                key = spec.get("scores", "owl") if spec["allocation"] != "owl" else "owl"
                first_calib, calib_rec["first_stage"] = samples(cfg["first_stage_samples"])
                cache_key = score_cache_key(key, protocol)
                if cache_key not in score_cache:
                    score_cache[cache_key] = coarse_scores(
                        adapter, key, calibration=first_calib, batch_size=cfg["first_stage_batch_size"],
                        granularity=cfg["granularity"], seed=seed, progress=False,
                        **(cfg["score_kw"] if key != "owl" else {}))
                sc, resources["scores"] = score_cache[cache_key]
                gs = allocate_sparsity(sc, sizes, s, method=spec["allocation"],
                                       max_sparsity=min(s + cfg["max_sparsity_margin"], 0.99))
                target = expand_to_layers(gs, groups)
            calib = None
            if spec["method"] != "magnitude":
                calib, calib_rec["fine"] = samples(cfg["calib_samples"])
            with track(str(adapter.input_device())) as r:
                res = prune(adapter, target, method=spec["method"], calibration=calib, batch_size=cfg["batch_size"],
                            seed=seed, comparison=cfg["comparison"], return_masks=False, progress=False)
            resources["fine"] = dict(r)
            m, iv = evaluate_task_with_intervals(adapter, task, data, limit, **eval_kw)
            conf = {**spec, "actual_sparsity": res.actual_sparsity, "calib_samples": cfg["calib_samples"],
                    "first_stage_samples": cfg["first_stage_samples"], "seed": seed, **proto_rec}
            if calibration is not None:
                conf["calibration"] = calib_rec
            records.append(record(adapter.name, name, s, task, m, resources, conf, intervals=iv))
            if on_pruned is not None:
                records += list(on_pruned(adapter, records[-1]))
    return records


def seeded_sweep(adapter: ModelAdapter, *, methods: Sequence[str], sparsities: Sequence[float],
                 seeds: Sequence[int], include_dense: bool = True,
                 score_cache: dict[int, dict[str, tuple[dict, dict]]] | None = None,
                 **kw: Any) -> list[dict[str, Any]]:
    """:func:`sparsity_sweep` over several calibration ``seeds`` (issue 18): the dense model evaluated once, then every
    method at every sparsity pruned and evaluated once per seed.

    The seed picks the calibration samples of both stages and the zeroth-order noise directions. Each seed's
    coarse-stage scores are computed once and reused across its sparsities (and by a later call with the same
    ``score_cache``), which is keyed by seed: ``{seed: sparsity_sweep's score cache}``, so ``score_cache[seed]``
    can be handed to :func:`ablation_scores`. ``kw``: the rest of :func:`sparsity_sweep`'s keywords (``task``,
    ``data``, ``limit``, ``calib_samples``, ``protocol``, ``on_pruned``, ...; not ``seed``).

    Records: the dense one first (no ``config.seed``: one measurement), then one :func:`sparsity_sweep` per seed
    in the order of ``seeds`` (methods x sparsities, each followed by what ``on_pruned`` returned); every pruned
    record carries ``config.seed`` and ``config.seeds`` (this call's list), which is how ``report`` pools them
    into mean and min–max over seeds (``records.points``). Seeds that are not a non-empty list of distinct
    integers are a one-line UserError."""
    from .errors import UserError
    from .records import check_seeds

    if "seed" in kw:
        raise UserError("seeded_sweep takes seeds=[...], not seed=: give the list of calibration seeds, e.g. [0, 1, 2]")
    seeds = check_seeds(seeds, "seeds")
    score_cache = {} if score_cache is None else score_cache
    records = []
    if include_dense:  # one evaluation of the unpruned model: it does not depend on the seed
        records += sparsity_sweep(adapter, methods=[], sparsities=[], include_dense=True,
                                  **{k: v for k, v in kw.items() if k != "on_pruned"})
    for seed in seeds:
        for r in sparsity_sweep(adapter, methods=methods, sparsities=sparsities, seed=seed, include_dense=False,
                                score_cache=score_cache.setdefault(seed, {}), **kw):
            if r["method"] != "dense" and "seed" in r["config"]:
                r["config"]["seeds"] = list(seeds)
            records.append(r)
    return records


#: the methods of the rebuttal's CLIP table and the issue that asks for it: Wanda, ECoFLaP (zeroth order, Wanda fine
#: stage), SparseGPT, ECoFLaP on SparseGPT
COOP_METHODS = ("wanda", "ecoflap-zeroth", "sparsegpt", "ecoflap-zeroth-sparsegpt")


@dataclass
class TableRun:
    """What :func:`coop_table` returns: ``records`` (every cell's record, dense first per dataset, then methods x
    sparsities x seeds in the order given), and which cells this call ``computed`` and which it read back
    (``reused``) from its folder, as ``(dataset, method, sparsity, seed)`` (the dense cell: ``(dataset, "dense",
    0.0, None)``)."""

    records: list[dict[str, Any]]
    computed: list[tuple] = field(default_factory=list)
    reused: list[tuple] = field(default_factory=list)


def _cell_name(method: str, sparsity: float, seed: int | None) -> str:
    return "dense.json" if seed is None else f"{method}@{float(sparsity):g}@seed{int(seed)}.json"


def _table_settings(adapter: ModelAdapter, name: str, data: Any, calibration: Any, **kw: Any) -> dict[str, Any]:
    """What a cell of :func:`coop_table` depends on besides its method, sparsity and seed (a cell folder's key)."""
    dtype = next((str(p.dtype) for p in adapter.model.parameters()), None)
    return {"model": adapter.name, "dtype": dtype, "dataset": name, "data": str(data),
            "calibration": None if calibration is None else str(calibration), **kw}


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)) or "dataset"


def _read_json(path) -> Any:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # an unreadable cell is computed again


def coop_table(adapter: ModelAdapter, datasets: Mapping[str, Any], *, methods: Sequence[str] = COOP_METHODS,
               sparsities: Sequence[float] = (0.3, 0.4, 0.5), seeds: Sequence[int] = (0, 1, 2),
               out_dir: str | None = None, calibration: Mapping[str, Any] | None = None, task: str = "zeroshot",
               limit: int | None = None, calib_samples: int = 128, first_stage_samples: int = 32,
               batch_size: int = 8, protocol: str | None = None, perturb: str = "tensor", granularity: str = "block",
               max_sparsity_margin: float = 0.1, eval_kw: Mapping[str, Any] | None = None,
               progress: bool | None = None, on_cell: Any = None) -> TableRun:
    """The rebuttal's CLIP table (Table 8): ``datasets`` x ``methods`` x ``sparsities`` x ``seeds``, one pruning
    per dataset, and one record per cell.

    Each dataset (``{name: data}``, e.g. ``{"oxford_pets": "coop:/data/oxford_pets"}``: CoOp's layout,
    :mod:`ecoflap_utils.data.coop`) is evaluated dense once (not per seed or method), then pruned for every
    method, sparsity and seed by :func:`sparsity_sweep` (one cell per call, ``include_dense=False``), calibrated on
    ``calibration[name]``: by default a CoOp dataset's own train split, and the model's own samples for other data.
    That is the official code's loop (ylsung/ECoFLaP ``CoOp/scripts/coop/ecoflap_wanda.sh`` L15-19: one
    ``train.py`` run, so one pruning, per dataset, at one seed, L9), each pruned on that dataset's
    ``dm.train_loader_x`` in batches of 16 (``CoOp/trainers/zsclip.py`` L54-61); the seeds are ours (issue 18).
    The seed picks the calibration samples and the zeroth-order noise; each (dataset, seed) computes its
    coarse-stage scores once and reuses them across sparsities and methods (:func:`sparsity_sweep`'s
    ``score_cache``).

    ``out_dir``: where the cells are kept, one JSON file per cell, written atomically as it is done, under one
    folder per dataset and settings (:func:`_table_settings`: model, dtype, data, calibration, limit, sample
    counts, protocol, estimator, evaluation keywords), with the coarse-stage scores of each seed. A second call
    with the same folder reads the finished cells back and computes only the others (after an interruption, or
    with more seeds); other settings go to another folder. ``None``: nothing is kept.

    Records: dense ``config`` holds ``dataset``, ``data``, ``templates`` and ``template_set`` (what prompted, from
    :func:`ecoflap_utils.evaluate.evaluate`; every cell of a dataset is evaluated alike, so the pruned records
    carry the same), pruned ones also ``seed``, ``seeds`` (this call's) and :func:`sparsity_sweep`'s
    ``calibration`` record (under ``protocol="paper"``: augmented images, CoOp's batches of 16).
    ``on_cell(record)`` is called after each computed cell is written. Bad input (no dataset, an unknown method,
    a sparsity outside (0, 1), seeds that are not distinct integers) is a one-line UserError."""
    import json
    from pathlib import Path

    from . import evaluate
    from .data import coop
    from .errors import UserError
    from .io import write_json_atomic
    from .records import check_seeds

    seeds = check_seeds(seeds, "seeds")
    if not isinstance(datasets, Mapping) or not datasets:
        raise UserError(f"no datasets to prune for: give {{name: data}}, e.g. {{'oxford_pets': "
                        f"'coop:/data/oxford_pets'}}, got {datasets!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"unknown method(s) {unknown or list(methods)}; choose from {', '.join(METHODS)}")
    bad = [s for s in sparsities if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < 1]
    if bad or not sparsities:
        raise UserError(f"sparsities {list(sparsities)!r}: give a non-empty list of numbers between 0 and 1, e.g. "
                        f"[0.3, 0.4, 0.5]")
    calib_of = ({name: data if coop.is_coop(data) else None for name, data in datasets.items()}
                if calibration is None else calibration_per_dataset(calibration, datasets))
    eval_kw = {**dict(eval_kw or {}), **({"protocol": protocol} if protocol is not None else {})}
    common = dict(task=task, limit=limit, calib_samples=calib_samples, first_stage_samples=first_stage_samples,
                  batch_size=batch_size, granularity=granularity, max_sparsity_margin=max_sparsity_margin,
                  protocol=protocol, perturb=perturb)
    run = TableRun([])
    cells = [(m, float(s), seed) for seed in seeds for m in methods for s in sparsities]
    bar = tqdm(total=len(datasets) * (len(cells) + 1), desc=f"table {adapter.name}",
               disable=None if progress in (None, True) else True)
    for name, data in datasets.items():
        settings = _table_settings(adapter, name, data, calib_of[name], **common,
                                   eval_kw=json.loads(json.dumps(eval_kw, default=str)))
        folder = None
        if out_dir is not None:
            import hashlib

            key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
            folder = Path(out_dir) / f"{_safe(name)}-{key}"
            if not (folder / "settings.json").is_file():
                write_json_atomic(folder / "settings.json", settings)

        def done(method: str, s: float, seed: int | None) -> dict | None:
            rec = _read_json(folder / _cell_name(method, s, seed)) if folder is not None else None
            if isinstance(rec, dict):
                run.reused.append((name, method, s, seed))
            return rec if isinstance(rec, dict) else None

        def keep(rec: dict, method: str, s: float, seed: int | None) -> dict:
            if folder is not None:
                write_json_atomic(folder / _cell_name(method, s, seed), rec)
            run.computed.append((name, method, s, seed))
            if on_cell is not None:
                on_cell(rec)
            return rec

        dense = done("dense", 0.0, None)
        if dense is None:
            with track(str(adapter.input_device())) as r:
                out = evaluate.evaluate(adapter, task, data=data, limit=limit, progress=False, **eval_kw)
            m, iv = _metrics_of(out)
            conf = {"dataset": name, "data": str(data), "protocol": protocol,
                    **{k: out[k] for k in ("templates", "template_set", "split") if k in out}}
            dense = keep(record(adapter.name, "dense", 0.0, task, m, {"eval": dict(r)}, conf, intervals=iv),
                         "dense", 0.0, None)
        bar.update(1)
        said = {k: dense["config"][k] for k in ("templates", "template_set") if k in dense["config"]}
        found: dict[tuple, dict] = {}
        for seed in seeds:
            scores_file = folder / f"scores-seed{seed}.json" if folder is not None else None
            saved = _read_json(scores_file) if scores_file is not None else None
            score_cache = {k: tuple(v) for k, v in saved.items()} if isinstance(saved, dict) else {}
            for m_, s, sd in [c for c in cells if c[2] == seed]:
                rec = done(m_, s, sd)
                if rec is None:
                    before = set(score_cache)
                    (rec,) = sparsity_sweep(adapter, methods=[m_], sparsities=[s], data=data, seed=sd,
                                            include_dense=False, progress=False, eval_kw=eval_kw,
                                            score_cache=score_cache, calibration=calib_of[name], **common)
                    rec["config"].update(dataset=name, data=str(data), **said)
                    if scores_file is not None and set(score_cache) != before:
                        write_json_atomic(scores_file, {k: list(v) for k, v in score_cache.items()})
                    rec = keep(rec, m_, s, sd)
                found[(m_, s, sd)] = rec
                bar.update(1)
        run.records.append(dense)
        for m_ in methods:
            for s in sparsities:
                for seed in seeds:
                    rec = found[(m_, float(s), seed)]
                    run.records.append({**rec, "config": {**rec["config"], "seeds": list(seeds)}})
    bar.close()
    return run


def stack_sensitivity(adapter: ModelAdapter, *, sparsities: Sequence[float], method: str = "wanda",
                      task: str | None = None, data=None, limit: int | None = None, calib_samples: int = 64,
                      seed: int = 0, by: str = "modality", eval_kw: Mapping[str, Any] | None = None,
                      calibration: str | None = None, protocol: str | None = None) -> list[dict[str, Any]]:
    """Prune one modality (or stack) at a time with uniform layer-wise pruning (ECoFLaP Fig. 1, right).

    Shows how much each module can lose before the task breaks: the reason for a global view.
    ``calibration``: a path read with :func:`calibration_for` (None: generated samples); records carry its
    record under ``config.calibration.fine``. ``protocol="paper"``: the official code's calibration size, batch size
    and comparison for the model's family (:func:`prune_settings`); records carry ``config.protocol`` and
    ``config.protocol_settings``.
    """
    task = task or getattr(adapter, "default_task", None)
    keys: dict[str, list[str]] = {}
    for b in adapter.pruned_blocks():
        keys.setdefault(getattr(b, by), [])
        if b.stack not in keys[getattr(b, by)]:
            keys[getattr(b, by)].append(b.stack)
    kw = prune_settings(adapter, protocol, method)
    if kw:
        calib_samples = _paper_preset(adapter, protocol, method=method, allocation="uniform")["calib_samples"]
    calib, source = calibration_for(adapter, calibration, calib_samples, seed)
    conf = calibration_config(protocol, fine=source, calib_samples=calib_samples,
                              **({"protocol_settings": kw} if kw else {}))
    out = []
    for key, stacks in keys.items():
        for s in sparsities:
            with restored(adapter):
                if s > 0:
                    prune(adapter, s, method=method, calibration=calib, stacks=stacks, return_masks=False,
                          progress=False, **kw)
                m, iv = evaluate_task_with_intervals(adapter, task, data, limit, **(eval_kw or {}))
            out.append(record(adapter.name, f"{method} ({key} only)", s, task, m,
                              config={"pruned": key, "stacks": stacks, **conf}, intervals=iv))
    return out


def weight_statistics(adapter: ModelAdapter, *, calib_samples: int = 16, batch_size: int = 8, seed: int = 0,
                      max_values: int = 20000, calibration: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per modality: samples of |W|, Wanda scores |W| * ||X||, and |dL/dW| (ECoFLaP Fig. 1, left).

    Values are subsampled (seeded) to ``max_values`` per modality and kind. ``calibration``: a path read with
    :func:`calibration_for` (None: the model's generated samples).
    """
    from .stats import input_statistics, wanda_scores

    names = adapter.layer_names()
    block_of = adapter.block_of()
    calib = calibration_for(adapter, calibration, calib_samples, seed)[0]
    flags = {n: p.requires_grad for n, p in adapter.model.named_parameters()}
    try:
        for n, p in adapter.model.named_parameters():
            p.requires_grad_(n in names)
        with input_statistics(adapter.model, names, "wanda") as stats:
            for batch in adapter.batches(calib, batch_size):
                adapter.loss(batch).backward()
        rng = np.random.default_rng(seed)
        out: dict[str, dict[str, list]] = {}
        for w in names:
            p = adapter.model.get_parameter(w)
            mod = block_of[w].modality
            d = out.setdefault(mod, {"weight": [], "wanda": [], "gradient": []})
            d["weight"].append(p.detach().float().abs().flatten().cpu().numpy())
            d["wanda"].append(wanda_scores(p, stats[w].sq).flatten().cpu().numpy())
            d["gradient"].append(p.grad.detach().float().abs().flatten().cpu().numpy())
    finally:
        for n, p in adapter.model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
    result: dict[str, dict[str, np.ndarray]] = {}
    for mod, kinds in out.items():
        result[mod] = {}
        for kind, parts in kinds.items():
            v = np.concatenate(parts)
            if v.size > max_values:
                v = rng.choice(v, max_values, replace=False)
            result[mod][kind] = v
    return result


def score_agreement(adapter: ModelAdapter, *, sample_counts: Sequence[int] = (8, 16, 32),
                    eps_values: Sequence[float] = (1e-3,), methods: Sequence[str] = ("zeroth", "jvp"),
                    batch_size: int = 8, seed: int = 0, num_noise: int = 1) -> list[dict[str, Any]]:
    """Spearman rank agreement of block scores with exact first-order block gradient norms (ECoFLaP Sec. 4.3).

    One row per (method, samples, eps): the correlation, wall time and peak memory of the method.
    """
    from scipy.stats import spearmanr

    rows = []
    dev = str(adapter.input_device())
    for n in sample_counts:
        calib = adapter.calibration_samples(n, seed)
        with track(dev) as r_exact:
            exact = compute_scores(adapter, "first", calib, variant="grad_norm", batch_size=batch_size,
                                   progress=False)
        groups = list(exact)
        rows.append({"method": "first (exact)", "samples": n, "eps": None, "spearman": 1.0,
                     "wall_s": r_exact["wall_s"], "peak_delta_mb": r_exact["peak_delta_mb"]})
        for method in methods:
            for eps in (eps_values if method == "zeroth" else (None,)):
                with track(dev) as r:
                    sc = compute_scores(adapter, method, calib, eps=eps or 1e-3, batch_size=batch_size, seed=seed,
                                        num_noise=num_noise, progress=False)
                rho = float(spearmanr([exact[g] for g in groups], [sc[g] for g in groups])[0])
                rows.append({"method": method, "samples": n, "eps": eps, "spearman": rho, "wall_s": r["wall_s"],
                             "peak_delta_mb": r["peak_delta_mb"]})
    return rows


def loss_landscape(adapter: ModelAdapter, *, alphas: Sequence[float] = tuple(np.linspace(-1, 1, 11)),
                   directions: int = 3, by: str = "modality", samples: int = 8, batch_size: int = 8,
                   seed: int = 0, calibration: str | None = None) -> dict[str, np.ndarray]:
    """Loss along random directions in each module's weights (ECoFLaP Fig. 6).

    A direction d has, per tensor, the shape of W and the norm of W (filter-normalised, Li et al. 2018);
    the curve is L(W + alpha d) - L(W). Returns ``{module: array (directions, len(alphas))}``. The loss is
    on ``samples`` calibration samples (``calibration``: a path read with :func:`calibration_for`; None:
    generated).
    """
    batches = adapter.batches(calibration_for(adapter, calibration, samples, seed)[0], batch_size)

    def loss() -> float:
        with torch.no_grad():
            return float(np.mean([float(adapter.loss(b)) for b in batches]))

    base = loss()
    members: dict[str, list[str]] = {}
    for b in adapter.pruned_blocks():
        members.setdefault(getattr(b, by), []).extend(b.weights)
    out = {}
    for key, ws in members.items():
        params = [adapter.model.get_parameter(w) for w in ws]
        curves = np.zeros((directions, len(alphas)))
        for d in range(directions):
            gen = torch.Generator().manual_seed(seed * 1000 + d)
            z = [torch.randn(p.shape, generator=gen) for p in params]
            scale = [float(p.detach().float().norm()) / float(t.norm()) for p, t in zip(params, z)]
            for i, a in enumerate(alphas):
                saved = [p.detach().clone() for p in params]
                try:
                    with torch.no_grad():
                        for p, t, sc in zip(params, z, scale):
                            p.add_((a * sc * t).to(p.dtype).to(p.device))
                    curves[d, i] = loss() - base
                finally:
                    with torch.no_grad():
                        for p, w0 in zip(params, saved):
                            p.copy_(w0)
        out[key] = curves
    return out


def allocation_table(adapter: ModelAdapter, scores: Mapping[str, float], targets: Sequence[float], *,
                     methods: Sequence[str] = ("uniform", "ecoflap"), owl_ratios: Mapping[str, float] | None = None,
                     granularity: str = "block", max_sparsity_margin: float = 0.1) -> list[dict[str, Any]]:
    """Per-group sparsity for each allocation and target (ECoFLaP Fig. 5): rows of group, stack, modality, ..."""
    groups = score_groups(adapter, granularity)
    info = group_info(adapter, groups)
    sizes = {g: v["size"] for g, v in info.items()}
    rows = []
    for p in targets:
        for method in methods:
            sc = owl_ratios if method == "owl" else scores
            sp = allocate_sparsity(sc or scores, sizes, p, method=method, max_sparsity=min(p + max_sparsity_margin, 0.99))
            for g in groups:
                rows.append({"target": p, "allocation": method, "group": g, "stack": info[g]["stack"],
                             "modality": info[g]["modality"], "size": sizes[g], "score": scores.get(g),
                             "sparsity": sp[g]})
    return rows


def timed(fn, *args, device: str = "cpu", **kw) -> tuple[Any, dict[str, Any]]:
    """Call ``fn`` and return (its result, wall time / peak memory)."""
    with track(device) as r:
        out = fn(*args, **kw)
    return out, dict(r)


def finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
