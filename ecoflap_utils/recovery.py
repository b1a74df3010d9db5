"""Recovery by masked fine-tuning after pruning (notebook 07; the paper's BLIP table with UPop, ECoFLaP README).

``recovery_curves`` prunes a restored copy of the model with each method at each sparsity (the pruning path of
:func:`ecoflap_utils.experiments.sparsity_sweep`, coarse-stage scores included), evaluates it, fine-tunes it with
:func:`ecoflap_utils.finetune.finetune` (every pruned weight stays zero) and records the held-out metric every
``eval_every`` steps. Its records are in the house schema, one per method, sparsity and evaluated step:

* ``config.steps``: fine-tuning steps done (0: pruned, not fine-tuned), ``config.finetuned`` (``steps > 0``),
  ``config.stacks`` (what was trained, a list) and ``config.trained`` (the same as one string, ``"qformer+lm"``),
  ``config.final`` (True for the last point of each curve, and for the step-0 point);
* ``config.seed`` (the calibration samples, the zeroth-order noise and the fine-tuning batches) and, with
  ``seeds=[...]``, ``config.seeds``: the end points (step 0 and the last step) are measured at every seed, the
  intermediate points of a curve at the first seed only;
* ``resources.finetune``: wall time, seconds per step, first and last losses (the fine-tuned records).

``upop_table`` assembles the two-part table of notebook 07: the authors' BLIP numbers at 0.5 sparsity (quoted
from the ECoFLaP README, UPop's row reported, not run) and this run's rows.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from .experiments import evaluate_task_with_intervals, record, seeded_sweep, sparsity_sweep
from .finetune import finetune, resolve_stacks, zero_pattern
from .models.base import ModelAdapter

#: where the quoted numbers come from
PAPER_SOURCE = ("ECoFLaP README (github.com/ylsung/ECoFLaP, commit 59dac0a, section \"BLIP\", "
                "\"Some additional results regarding BLIP models\"): BLIP at 0.5 sparsity")
#: the columns of that table (the README writes "NLVR2 (val/text)"; the paper's BLIP tables read val/test)
PAPER_COLUMNS = ("VQA test-dev", "Flickr30k TR@1/IR@1", "NLVR2 val/test", "COCO CIDEr/SPICE")
#: its rows, as printed there
PAPER_ROWS: tuple[tuple[str, str, tuple[str, str, str, str]], ...] = (
    ("Full model", "quoted", ("77.4", "96.8/86.9", "82.3/83.6", "133.3/23.8")),
    ("Wanda (w/o fine-tuning)", "quoted", ("71.9", "85.3/72.3", "78.3/78.1", "97.1/18.4")),
    ("ECoFLaP (w/o fine-tuning)", "quoted", ("73.6", "90.2/79.5", "79.1/79.2", "111.0/20.3")),
    ("UPop (w/ fine-tuning)", "reported, not run", ("76.3", "94.0/82.0", "80.3/81.1", "128.9/23.3")),
    ("ECoFLaP (w/ fine-tuning)", "quoted", ("76.7", "96.8/85.6", "81.8/82.5", "132.3/23.8")),
)


def main_metric_of(records: Sequence[Mapping[str, Any]]) -> str:
    """The headline metric of the records' task (``report.MAIN_METRIC``), else the first metric recorded."""
    from .report import MAIN_METRIC

    first = next(r for r in records if r.get("metrics"))
    own = MAIN_METRIC.get(str(first.get("task")))
    return own if own in first["metrics"] else next(iter(first["metrics"]))


def _trained(stacks: Sequence[str]) -> str:
    return "+".join(stacks)


def recovery_curves(adapter: ModelAdapter, *, methods: Sequence[str], sparsities: Sequence[float], steps: int,
                    eval_every: int | None, lr: float, stacks: str | Iterable[str] | None = None,
                    eval_limit: int | None = 200, task: str | None = None, data: Any = None, ft_data: Any = None,
                    batch_size: int = 16, weight_decay: float = 0.0, warmup: float | int = 0.1,
                    calib_samples: int = 64, first_stage_samples: int = 32, seed: int = 0,
                    seeds: Sequence[int] | None = None, num_beams: int = 1,
                    include_dense: bool = True, score_cache: dict | None = None, autocast: bool = False,
                    check_pattern: bool = True, progress: bool | None = None,
                    perturb: str = "tensor", protocol: str | None = None,
                    calibration: str | None = None) -> list[dict[str, Any]]:
    """Prune (``sparsity_sweep``'s path), evaluate, fine-tune masked for ``steps`` steps and evaluate every
    ``eval_every`` steps (None: only at the end) on ``eval_limit`` held-out items of ``task`` (``data``: its path,
    None the bundled set); returns records as the module docstring says (dense first when ``include_dense``).

    ``stacks``: what ``finetune`` trains (None: its default, the Q-Former for BLIP-2); ``ft_data``: its data (None:
    the model's bundled training samples). With ``check_pattern`` every curve asserts that the zero pattern of the
    pruned weights is the same after fine-tuning. The model's weights are put back after each curve.
    ``protocol`` and ``calibration`` (a path) prune as in :func:`~ecoflap_utils.experiments.sparsity_sweep` (the
    paper's settings; calibration read from disk, recorded under ``config.calibration``).
    ``seeds``: prune and fine-tune once per seed (:func:`~ecoflap_utils.experiments.seeded_sweep`: the dense model
    evaluated once, each seed's coarse-stage scores computed once, ``score_cache`` keyed by seed); every curve is
    evaluated at step 0 and at its last step, and only the first seed's curves also every ``eval_every`` steps
    (what the end points need is the spread over seeds; the shape of a curve is shown once). None: ``seed``
    alone, as before."""
    chosen = resolve_stacks(adapter, stacks)
    eval_kw = {"num_beams": num_beams} if getattr(adapter, "family", None) == "blip2" else {}
    ft_conf = {"stacks": chosen, "trained": _trained(chosen), "lr": float(lr), "batch_size": int(batch_size),
               "eval_limit": eval_limit}

    def on_pruned(model: ModelAdapter, before: dict[str, Any]) -> list[dict[str, Any]]:
        before["config"].update(ft_conf, steps=0, finetuned=False, final=True)
        intervals: dict[int, dict] = {}

        def eval_fn(step: int, m: ModelAdapter) -> dict[str, float]:
            if step == 0:  # measured just before, by the sweep
                return dict(before["metrics"])
            metrics, intervals[step] = evaluate_task_with_intervals(m, before["task"], data, eval_limit, **eval_kw)
            return metrics

        pattern = zero_pattern(model) if check_pattern else None
        own_seed = int(before["config"].get("seed", seed))
        every = eval_every if seeds is None or own_seed == seeds[0] else None  # other seeds: end points only
        res = finetune(model, ft_data, steps=steps, lr=lr, stacks=chosen, batch_size=batch_size, seed=own_seed,
                       weight_decay=weight_decay, warmup=warmup, autocast=autocast, eval_fn=eval_fn,
                       eval_every=every, progress=progress)
        if pattern is not None:
            after = zero_pattern(model, pattern)
            changed = [n for n in pattern if not bool((after[n] | ~pattern[n]).all())]
            assert not changed, f"fine-tuning revived pruned weights in {changed[:3]}"
        spent = {"wall_s": round(res.wall_s, 3), "eval_s": round(res.eval_s, 3),
                 "seconds_per_step": res.seconds_per_step, "initial_loss": res.initial_loss,
                 "final_loss": res.final_loss, "kept_zeros": res.config["kept_zeros"]}
        out = []
        for ev in res.evals:
            k = int(ev["step"])
            if k == 0:
                continue
            metrics = {n: float(v) for n, v in ev.items() if n not in ("step", "n") and isinstance(v, (int, float))}
            conf = {**before["config"], "steps": k, "finetuned": True, "final": k == steps,
                    "loss": res.losses[k - 1]}
            out.append(record(before["model"], before["method"], before["sparsity"], before["task"], metrics,
                              {**before["resources"], "finetune": spent}, conf, intervals=intervals.get(k)))
        return out

    kw = dict(methods=methods, sparsities=sparsities, task=task, data=data, limit=eval_limit,
              calib_samples=calib_samples, first_stage_samples=first_stage_samples, include_dense=include_dense,
              eval_kw=eval_kw, score_cache=score_cache, progress=progress, on_pruned=on_pruned, perturb=perturb,
              protocol=protocol, calibration=calibration)
    if seeds is not None:
        from .records import check_seeds

        seeds = check_seeds(seeds, "seeds")
        return seeded_sweep(adapter, seeds=seeds, **kw)
    return sparsity_sweep(adapter, seed=seed, **kw)


def final_records(records: Sequence[Mapping[str, Any]], *, finetuned: bool | None = None,
                  trained: str | None = None) -> list[dict[str, Any]]:
    """The dense records and the end points of each curve (step 0 and the last step), optionally only the
    fine-tuned (``finetuned=True``) or pruned-only ones, and only those that trained ``trained``."""
    out = []
    for r in records:
        c = r.get("config", {})
        if r.get("method") == "dense":
            out.append(dict(r))
            continue
        if not c.get("final") or (finetuned is not None and bool(c.get("finetuned")) != finetuned):
            continue
        if trained is not None and c.get("trained") != trained:
            continue
        out.append(dict(r))
    return out


def labelled(records: Sequence[Mapping[str, Any]], trained: str | None = None) -> list[dict[str, Any]]:
    """Dense and end-point records renamed ``"<method> · FT"`` / ``"<method> · no FT"``, so that
    ``report.compare`` and ``report.headline_table`` tell the two apart (``trained``: keep that choice only)."""
    out = []
    for r in final_records(records, trained=trained):
        if r["method"] != "dense":
            r = {**r, "method": f"{r['method']} · {'FT' if r['config'].get('finetuned') else 'no FT'}"}
        out.append(r)
    return out


def _measured(hits: Sequence[Mapping[str, Any]], metric: str) -> str:
    """One point of ``upop_table``: ``value [low, high]``; over several seeds ``mean (min–max over n seeds) [low,
    high]``, the interval the mean of the seeds' bounds (as ``records.points`` pools them)."""
    values = [float(r["metrics"][metric]) for r in hits if metric in r["metrics"]]
    if not values:
        return "–"
    text = f"{sum(values) / len(values):.1f}"
    if len(values) > 1:
        text += f" ({min(values):.1f}–{max(values):.1f} over {len(values)} seeds)"
    ivs = [(r.get("intervals") or {}).get(metric) for r in hits]
    if all(ivs):
        text += f" [{sum(i[0] for i in ivs) / len(ivs):.1f}, {sum(i[1] for i in ivs) / len(ivs):.1f}]"
    return text


def upop_table(records: Sequence[Mapping[str, Any]], *, sparsity: float = 0.5, methods: Sequence[str] = (
        "wanda", "ecoflap-zeroth"), metric: str | None = None, trained: str | None = None):
    """The table shaped like the authors' BLIP table at 0.5 sparsity, in two parts (a DataFrame):

    (a) the paper's numbers (``PAPER_ROWS``, source ``PAPER_SOURCE``), UPop's row marked "reported, not run";
    (b) this run's rows at ``sparsity``: dense, then each of ``methods`` without and with fine-tuning (the end of
        its curve; ``trained``: only curves that trained that stack choice), ``metric`` (default: the task's
        headline metric) with its 95 % interval in the first column, over several seeds as the mean (min–max over
        the seeds) [the mean of their intervals]; a missing record reads "not run".
    Columns: part, row, source, the four paper columns."""
    import pandas as pd

    metric = metric or (main_metric_of(records) if records else "vqa_accuracy")
    rows = [{"part": "(a) paper", "row": name, "source": src, **dict(zip(PAPER_COLUMNS, cells))}
            for name, src, cells in PAPER_ROWS]
    ends = final_records(records, trained=trained)
    blank = dict.fromkeys(PAPER_COLUMNS[1:], "")

    def ours(label: str, hits: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        seeds = " (min–max over seeds)" if len(hits) > 1 else ""
        where = (f"measured on {hits[0]['model']}, {hits[0]['task']}, {metric}{seeds} [95 % interval]" if hits
                 else "not run")
        return {"part": "(b) this run", "row": label, "source": where,
                PAPER_COLUMNS[0]: _measured(hits, metric) if hits else "not run", **blank}

    dense = [r for r in ends if r["method"] == "dense"][:1]
    rows.append(ours("Full model (dense)", dense))
    names = {"wanda": "Wanda", "ecoflap-zeroth": "ECoFLaP", "sparsegpt": "SparseGPT"}
    for ft in (False, True):
        for m in methods:
            hits = [r for r in ends if r["method"] == m and abs(r["sparsity"] - sparsity) < 1e-9
                    and bool(r["config"].get("finetuned")) == ft]
            hits = [r for r in hits if r["config"].get("trained") == hits[0]["config"].get("trained")]  # its seeds
            rows.append(ours(f"{names.get(m, m)} ({'w/' if ft else 'w/o'} fine-tuning)", hits))
    return pd.DataFrame(rows).set_index(["part", "row"])


def end_frame(records: Sequence[Mapping[str, Any]], metric: str | None = None):
    """The end points of every curve (step 0 and the last step, :func:`final_records`), one row per method,
    sparsity, stack choice and steps, pooled over seeds as :func:`curve_frame` pools them (the mean, ``low`` and
    ``high`` the mean item interval, ``seed min``, ``seed max``, ``seeds``), with ``s/step``: the mean seconds per
    fine-tuning step (empty for step 0)."""
    metric = metric or main_metric_of(records)
    ends = [r for r in final_records(records) if r["method"] != "dense"]
    frame = curve_frame(ends, metric)
    cost: dict[tuple, list[float]] = {}
    for r in ends:
        s = (r.get("resources") or {}).get("finetune", {}).get("seconds_per_step")
        if s is not None and r["config"].get("finetuned"):
            key = (r["method"], r["sparsity"], r["config"].get("trained"), r["config"]["steps"])
            cost.setdefault(key, []).append(float(s))
    frame["s/step"] = [sum(v) / len(v) if (v := cost.get(k)) else float("nan")
                       for k in zip(frame["method"], frame["sparsity"], frame["trained"], frame["steps"])]
    return frame


def curve_frame(records: Sequence[Mapping[str, Any]], metric: str = "vqa_accuracy"):
    """One row per evaluated point of each curve: method, sparsity, trained, steps, the metric and its interval
    (the figure of notebook 07 plots it). A point measured at several seeds (``config.seed``; ``seeds=`` of
    :func:`recovery_curves`) is one row, pooled by ``records.points`` (the pooling of the headline tables and the
    summary figures): the mean over the seeds, ``low`` and ``high`` the mean of their item intervals,
    ``seed min``, ``seed max`` and ``seeds`` (how many). Two different records of one point at the same seed are a
    UserError, not a second seed. Rows in order of each curve's first record, then by step."""
    import pandas as pd

    from .errors import UserError
    from .records import _missing, points, records_frame

    columns = ["method", "sparsity", "trained", "steps", metric, "low", "high", "seed min", "seed max", "seeds"]
    kept = [r for r in records if r.get("method") != "dense" and "steps" in r.get("config", {})
            and metric in r.get("metrics", {})]
    if not kept:
        return pd.DataFrame(columns=columns)
    where = {(str(r.get("model")), str(r.get("task"))) for r in kept}
    if len(where) > 1:
        raise UserError(f"curve_frame takes the curves of one model and task, got {sorted(where)}: "
                        "pass the records of one at a time")
    df = records_frame(kept)
    if "config.trained" not in df.columns:
        df["config.trained"] = None
    cols = ("method", "sparsity", "config.trained")
    curves: dict[tuple, tuple] = {}  # points' row key (built as points builds it) -> the record's own values
    for r, row in zip(kept, df.to_dict("records")):
        key = tuple("–" if _missing(row.get(c)) else str(row.get(c)) for c in cols)
        curves.setdefault(key, (r["method"], r["sparsity"], r["config"].get("trained")))
    pts = points(df, metric, column="config.steps", rows=cols, headline=False,
                 hint="one record per curve, step and seed")
    rows = [{"method": curves[k][0], "sparsity": curves[k][1], "trained": curves[k][2], "steps": int(p["at"]),
             metric: p["value"], "low": p["low"], "high": p["high"], "seed min": p["seed_low"],
             "seed max": p["seed_high"], "seeds": p["n_seeds"]}
            for k, p in ((tuple(p["key"]), p) for p in pts.to_dict("records"))]
    order = {k: i for i, k in enumerate(curves.values())}
    rows.sort(key=lambda r: (order[(r["method"], r["sparsity"], r["trained"])], r["steps"]))
    return pd.DataFrame(rows, columns=columns)
