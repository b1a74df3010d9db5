"""Result records in the house schema (``{"model", "method", "sparsity", "task", "metrics", "resources",
"config"}``, optionally ``"intervals": {metric: [low, high]}``) as a pandas DataFrame. A low layer: ``runs``
(the batch runner's tables), ``plots`` (figures) and ``report`` read records through it, without importing
each other.

A metric's 95 % interval becomes the column ``intervals.<metric>`` holding ``"[low, high]"`` (JSON text, as
every list in a record is flattened); :func:`interval_bounds` reads it back as two numeric columns.

What a record *is* (fine-tuned or one-shot, an end point or a curve point, its seed, how its metric was
measured) is read from explicit fields by the rules below (:func:`record_kind`, :func:`record_seed`,
:func:`annotate`), never guessed from a label; :func:`points` turns records into the points a headline table or a
summary figure shows (seeds pooled as mean and min–max, repeats counted once, runs kept apart), so that the
tables (``report``) and the figures (``plots``) show the same numbers."""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Sequence

from .errors import UserError

CORE_COLUMNS = ("model", "method", "sparsity", "task")
#: prefix of the frame columns that hold a metric's interval (``intervals.acc1`` = "[low, high]")
INTERVALS_PREFIX = "intervals."
_NOT_METRIC_PREFIXES = ("resources.", "config.", INTERVALS_PREFIX)


def _flatten(prefix: str, obj: Mapping, out: dict) -> None:
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            _flatten(f"{key}.", v, out)
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v


def records_frame(records: Iterable[Mapping], runs: Sequence[str] | None = None):
    """Result records (house schema) as a DataFrame: one row per record; ``model``, ``task``, ``method``,
    ``sparsity``; one column per metric (nested metrics joined with ``.``); ``intervals.<metric>`` (a
    metric's interval, ``"[low, high]"``), ``resources.*``, ``config.*``."""
    import pandas as pd

    rows = []
    for i, r in enumerate(records):
        row: dict[str, Any] = {}
        if runs is not None:
            row["run"] = runs[i]
        for k in CORE_COLUMNS:
            row[k] = r.get(k)
        metrics: dict[str, Any] = {}
        _flatten("", r.get("metrics") or {}, metrics)
        for k, v in metrics.items():
            clash = k in row or k in ("run", *ANNOTATIONS) or k.startswith(_NOT_METRIC_PREFIXES)
            row[f"metrics.{k}" if clash else k] = v
        if isinstance(r.get("intervals"), Mapping):
            _flatten(INTERVALS_PREFIX, r["intervals"], row)
        _flatten("resources.", r.get("resources") or {}, row)
        _flatten("config.", r.get("config") or {}, row)
        rows.append(row)
    df = pd.DataFrame(rows)
    for k in (("run",) if runs is not None else ()) + CORE_COLUMNS:
        if k not in df.columns:
            df[k] = None
    return df


def _bounds(value: Any) -> tuple[float, float]:
    """(low, high) of an interval cell: a [low, high] list/tuple or its JSON text; (nan, nan) otherwise."""
    nan = float("nan")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return nan, nan
    if isinstance(value, (list, tuple)) and len(value) == 2:
        try:
            return float(value[0]), float(value[1])
        except (TypeError, ValueError):
            pass
    return nan, nan


def interval_bounds(df, metric: str):
    """``(low, high)``: two float Series (NaN where a row has no interval) from the ``intervals.<metric>``
    column of a results frame, or None when no row has an interval for ``metric``. ``metric`` may be the
    frame's column (``metrics.<name>`` for a metric renamed to avoid a clash) or the metric's name."""
    import pandas as pd

    name = metric[len("metrics."):] if metric.startswith("metrics.") and metric[len("metrics."):] in (
        "run", *CORE_COLUMNS, *ANNOTATIONS) else metric
    col = f"{INTERVALS_PREFIX}{name}"
    if col not in df.columns:
        return None
    pairs = [_bounds(v) for v in df[col]]
    low = pd.Series([p[0] for p in pairs], index=df.index, dtype=float)
    high = pd.Series([p[1] for p in pairs], index=df.index, dtype=float)
    if not (low.notna() & high.notna()).any():
        return None
    return low, high


def is_metric_column(column: str) -> bool:
    """Whether a results-frame column holds a metric (not run/core, ``label``/``seed`` (:func:`annotate`),
    ``resources.*``, ``config.*``, ``intervals.*``)."""
    return (column not in ("run", *CORE_COLUMNS, *ANNOTATIONS)
            and not str(column).startswith(_NOT_METRIC_PREFIXES))


# ----------------------------------------------------------------------------- what a record is
# The rules that say what a record measured, read from explicit fields only (never from a label or a run name):
#
# * fine-tuned or one-shot: ``config.finetuned`` (a bool) decides; where it is absent, ``config.steps`` (fine-tuning
#   steps done, an integer >= 0) decides, steps > 0 meaning fine-tuned; a record with neither is one-shot (pruned
#   only). Every path that fine-tunes writes both (``recovery.recovery_curves``); the pruning paths
#   (``experiments.sparsity_sweep``, ``experiments.stack_sensitivity``, notebook 06's ablations) write neither.
#   ``finetuned`` True with 0 steps, or False with steps > 0, contradicts itself: a UserError.
# * an end point or a curve point: ``config.final`` False marks an intermediate evaluation of a fine-tuning curve
#   (notebook 07's step 15 of 30): it stays in results.csv and the list of all records, never in a headline table
#   or a summary figure. Absent or True: an end point.
# * the seed: ``config.seed``, an integer (calibration samples and noise directions); absent: one unseeded
#   measurement. ``config.seeds``, where a record gives it (the seed list of its run), is a non-empty list of
#   integers holding ``config.seed``. Anything else is a UserError.
# * how the metric was measured: ``config.eval.*`` (e.g. ``{"scoring": "generate", "num_beams": 1}``; not the
#   number of items, which changes the noise, not the metric). Records of one model, task and dataset that carry
#   it must carry the same one; records without it are taken to agree (older records do not carry it).
#
# A record's *label* is its method for one-shot records and ``"<method> · FT <steps> steps"`` for fine-tuned ones
# (``"... (<trained>)"`` added where one model, task and method was fine-tuned on several stack choices,
# ``config.trained``); an intermediate point's label ends in ``" (curve point)"``.

#: the columns :func:`annotate` adds to a results frame
ANNOTATIONS = ("label", "seed")
#: method names of the unpruned model
DENSE = ("dense",)
_FINETUNED, _STEPS, _FINAL, _TRAINED = "config.finetuned", "config.steps", "config.final", "config.trained"
_SEED, _SEEDS, _EVAL = "config.seed", "config.seeds", "config.eval."
CURVE_POINT = " (curve point)"


def _missing(v: Any) -> bool:
    """None, NaN or pandas' NA (a frame's empty cell)."""
    if v is None:
        return True
    try:
        return bool(v != v)  # NaN and NA are not equal to themselves
    except (TypeError, ValueError):
        return False


def _integer(v: Any, field: str, where: str) -> int | None:
    """``v`` as an int (a frame turns ints into floats next to empty cells); None when missing; a UserError when
    it is not a whole number (or is a bool)."""
    if _missing(v):
        return None
    if not isinstance(v, bool) and type(v).__name__ != "bool_":
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = float("nan")
        if f == f and f == int(f) and not isinstance(v, str):
            return int(f)
    raise UserError(f"{where}: {field} is {v!r}, not an integer: write whole numbers such as 0, 1, 2")


def _flag(v: Any, field: str, where: str) -> bool | None:
    if _missing(v):
        return None
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return bool(v)
    raise UserError(f"{where}: {field} is {v!r}, not true or false: write a JSON boolean")


def _where(row: Mapping, i: Any) -> str:
    """Where a record came from, for messages: its run, or its position."""
    return (f"record of {row.get('method')!r} in run {row['run']}" if not _missing(row.get("run"))
            else f"record {i} ({row.get('method')!r})")


def record_kind(row: Mapping, where: str = "a record") -> tuple[bool, int | None, bool]:
    """(fine-tuned, steps, end point) of a record or results-frame row, by the rules above (a UserError where
    its fields contradict each other or are not of their type)."""
    cfg = row.get("config") if isinstance(row.get("config"), Mapping) else None
    get = (lambda k: cfg.get(k[len("config."):])) if cfg is not None else row.get
    finetuned = _flag(get(_FINETUNED), _FINETUNED, where)
    steps = _integer(get(_STEPS), _STEPS, where)
    final = _flag(get(_FINAL), _FINAL, where)
    if steps is not None and steps < 0:
        raise UserError(f"{where}: {_STEPS} is {steps}: write the fine-tuning steps done, 0 or more")
    if finetuned is not None and steps is not None and finetuned != (steps > 0):
        raise UserError(f"{where}: {_FINETUNED} is {finetuned} but {_STEPS} is {steps}: a fine-tuned record "
                        f"has done steps > 0, a pruned-only one 0")
    return (finetuned if finetuned is not None else bool(steps)), steps, final is not False


def check_seeds(seeds: Any, name: str = "SEEDS") -> list[int]:
    """A seed list (a notebook's ``SEEDS``, a record's ``config.seeds``) as ints: a non-empty list of distinct
    integers, else a one-line UserError naming ``name`` and the fix."""
    fix = "give a non-empty list of distinct integer seeds, e.g. [0, 1, 2]"
    if not isinstance(seeds, (list, tuple)) or not seeds or any(_missing(s) for s in seeds):
        raise UserError(f"{name} is {seeds!r}: {fix}")
    out = [_seed_item(s, name, fix) for s in seeds]
    if len(set(out)) < len(out):
        raise UserError(f"{name} is {list(seeds)!r}, which repeats a seed: {fix}")
    return out


def _seed_item(s: Any, name: str, fix: str) -> int:
    try:
        return _integer(s, name, "")
    except UserError:
        raise UserError(f"{name} holds {s!r}, not an integer: {fix}") from None


def record_seed(row: Mapping, where: str = "a record") -> int | None:
    """A record's (or results-frame row's) ``config.seed`` as an int, None when absent; checks ``config.seeds``."""
    cfg = row.get("config") if isinstance(row.get("config"), Mapping) else None
    get = (lambda k: cfg.get(k[len("config."):])) if cfg is not None else row.get
    seed = _integer(get(_SEED), _SEED, where)
    seeds = get(_SEEDS)
    if not _missing(seeds):
        if isinstance(seeds, str):
            try:
                seeds = json.loads(seeds)
            except ValueError:
                pass
        seeds = check_seeds(seeds, f"{where}: {_SEEDS}")
        if seed is not None and seed not in seeds:
            raise UserError(f"{where}: {_SEED} {seed} is not in {_SEEDS} {seeds}: record the seed the run used")
    return seed


def _kinds(df) -> tuple[list, list, list]:
    """Per row of a results frame: (fine-tuned, steps, end point), its seed, its label (the rules above)."""
    rows = df.to_dict("records")
    kinds, seeds = [], []
    for i, row in zip(df.index, rows):
        where = _where(row, i)
        kinds.append(record_kind(row, where))
        seeds.append(record_seed(row, where))
    trained = [None if _missing(row.get(_TRAINED)) else str(row.get(_TRAINED)) for row in rows]
    choices: dict[tuple, set] = {}  # (model, task, method) -> the stack choices it was fine-tuned on
    for (finetuned, _, _), row, t in zip(kinds, rows, trained):
        if finetuned:
            choices.setdefault((str(row.get("model")), str(row.get("task")), str(row.get("method"))), set()).add(t)
    labels = []
    for (finetuned, steps, final), row, t in zip(kinds, rows, trained):
        method = str(row.get("method"))
        label = method
        if finetuned:
            label += " · FT" + (f" {steps} steps" if steps is not None else "")
            if t is not None and len(choices[(str(row.get("model")), str(row.get("task")), method)]) > 1:
                label += f" ({t})"
        labels.append(label + ("" if final else CURVE_POINT))
    return kinds, seeds, labels


def annotate(df):
    """A copy of a results frame (:func:`records_frame`) with a ``label`` column (what the record is, by the rules
    above: ``wanda``, ``wanda · FT 30 steps``, ``wanda · FT 15 steps (curve point)``) and a ``seed`` column (an
    int or None), after checking every record's kind and seed fields (a one-line UserError names the record and
    the fix)."""
    import pandas as pd

    _, seeds, labels = _kinds(df)
    df = df.copy()
    df["label"] = pd.Series(labels, index=df.index, dtype=object)
    df["seed"] = pd.Series(seeds, index=df.index, dtype=object)
    return df


def frame_column(df, key: str) -> str:
    """The frame column for ``key``: itself, or the config entry of that name (``dataset`` -> ``config.dataset``)."""
    for c in (key, f"config.{key}"):
        if c in df.columns:
            return c
    raise UserError(f"no '{key}' in these records (neither a field nor a config entry): choose a field the "
                    f"records carry")


def summary_rows(df) -> tuple[str, ...]:
    """The row fields of a summary table or figure of one model and task: the records' labels, preceded by the
    dataset where the records name several (``config.dataset``; a record without one counts as another)."""
    if "config.dataset" not in df.columns:
        return ("label",)
    named = {None if _missing(v) else str(v) for v in df["config.dataset"]}
    return ("dataset", "label") if len(named) > 1 else ("label",)


def value_label(v: Any) -> str:
    """A point's value as a column heading: numbers with ``:g`` (0.5, 0, 30), anything else as text."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, (int, float)):
        return f"{float(v):g}"
    return str(v)


def _number(v: Any) -> float:
    """A metric cell as a float; NaN where it is missing, a bool or not a number."""
    if isinstance(v, bool) or type(v).__name__ == "bool_" or _missing(v):
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _eval_definitions(df, groups: Sequence[tuple], metric: str) -> None:
    """A UserError where records of one model, task and dataset carry different ``config.eval.*`` entries."""
    cols = sorted(c for c in df.columns if str(c).startswith(_EVAL))
    if not cols:
        return
    seen: dict[tuple, tuple] = {}
    for (i, row), group in zip(df[cols].iterrows(), groups):
        if all(_missing(v) for v in row):
            continue
        definition = tuple((c[len(_EVAL):], None if _missing(v) else v) for c, v in row.items())
        first = seen.setdefault(group, (definition, _where(df.loc[i], i)))
        if first[0] != definition:
            model, task, dataset = group
            raise UserError(
                f"{model} · {task}{'' if dataset is None else f' · {dataset}'}: {metric} is measured differently "
                f"by the {first[1]} ({dict(first[0])}) and the {_where(df.loc[i], i)} ({dict(definition)}): "
                f"evaluate them alike or give them different task names")


def _measurements(cell: list[dict]) -> list[dict]:
    """A cell's records with repeats of one measurement (same seed, value and interval, e.g. the dense model
    evaluated alike by several runs) counted once, their runs joined."""
    out: dict[tuple, dict] = {}
    for m in cell:
        key = _measured(m)
        if key in out:
            out[key]["runs"] = tuple(dict.fromkeys(out[key]["runs"] + m["runs"]))
        else:
            out[key] = dict(m)
    return list(out.values())


def _measured(m: dict) -> tuple:
    """What a measurement says: its seed, value and interval (NaN written out, so that equal ones compare equal)."""
    return tuple("nan" if isinstance(k, float) and k != k else k for k in (m["seed"], m["value"], m["low"], m["high"]))


def _run_rows(row_cells: dict[str, list[dict]]) -> list[tuple[tuple[str, ...], dict[str, list[dict]]]]:
    """The rows one row label becomes, as (runs named in its label, {column: measurements}): one row, unless some
    cell is measured differently by several runs; then one row per group of runs that measured the same in
    every cell (the dense model evaluated alike by two runs and otherwise by a third: two rows)."""
    deduped = {col: _measurements(cell) for col, cell in row_cells.items()}
    if all(len({m["runs"] for m in cell}) <= 1 for cell in deduped.values()):
        return [((), deduped)]
    runs = list(dict.fromkeys(r for cell in row_cells.values() for m in cell for r in m["runs"]))
    groups: dict[frozenset, list[str]] = {}
    for r in runs:
        said = frozenset((col, _measured(m)) for col, cell in row_cells.items() for m in cell if r in m["runs"])
        groups.setdefault(said, []).append(r)
    out = []
    for members in groups.values():
        cells = {col: _measurements([dict(m, runs=tuple(members)) for m in cell if members[0] in m["runs"]])
                 for col, cell in row_cells.items()}
        out.append((tuple(members), {col: c for col, c in cells.items() if c}))
    return out


def _pool(measured: list[dict], where: str, hint: str) -> dict:
    """One point from its measurements: a single one as it is, several from distinct seeds as their mean, min
    and max over seeds (the item interval: the mean of their bounds where every seed has one)."""
    import numpy as np

    seeds = [m["seed"] for m in measured]
    runs = list(dict.fromkeys(r for m in measured for r in m["runs"]))
    where += f" (run{'s' if len(runs) > 1 else ''} {', '.join(runs)})" if runs else ""
    if len(measured) > 1:
        if any(s is None for s in seeds):
            raise UserError(f"{where}: {len(measured)} different records, not all with {_SEED}, so they are "
                            f"neither seeds of one point nor told apart: {hint}")
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        if twice:
            raise UserError(f"{where}: different records with the same seed {twice[0]}: {hint}")
    values = np.array([m["value"] for m in measured], dtype=float)
    lows = np.array([m["low"] for m in measured], dtype=float)
    highs = np.array([m["high"] for m in measured], dtype=float)
    have = bool(np.isfinite(lows).all() and np.isfinite(highs).all())
    order = np.argsort([s if s is not None else -1 for s in seeds], kind="stable")
    return {"value": float(values.mean()), "seed_low": float(values.min()), "seed_high": float(values.max()),
            "n_seeds": len(measured), "seeds": tuple(seeds[i] for i in order),
            "low": float(lows.mean()) if have else float("nan"), "high": float(highs.mean()) if have else float("nan"),
            "runs": tuple(runs)}


#: the columns of :func:`points`
POINT_COLUMNS = ("model", "task", "row", "key", "at", "column", "value", "seed_low", "seed_high", "n_seeds", "seeds",
                 "low", "high", "runs", "method", "finetuned", "dense")


def points(df, metric: str, *, column: str | None = "sparsity", rows: Sequence[str] = ("label",),
           headline: bool = True, hint: str = "tell them apart in rows= or pass where="):
    """The points a headline table or a summary figure shows for ``metric``: one row (:data:`POINT_COLUMNS`) per
    model, task, row label and value of ``column`` (a field or config entry; None: one point per row, the
    metric's name as its column). The rules, in order:

    1. records are read by :func:`annotate`'s rules (``rows=("label",)`` keeps fine-tuned records apart from
       one-shot ones); with ``headline``, intermediate curve points (``config.final`` False) are left out;
    2. records of one model, task and dataset must measure the metric alike (``config.eval.*``);
    3. one cell holds one kind of record (else a UserError: ``hint``);
    4. repeats of one measurement (same seed, value and interval) count once: the dense model evaluated alike by
       several runs is one row;
    5. where a frame has a ``run`` column and a row's cell is measured differently by several runs (different
       settings), the row is split per run, ``"wanda [run]"`` (runs that measured the same in every cell share
       a row, ``"dense [run a, run b]"``);
    6. the records left in a cell are seeds of one point: distinct integer ``config.seed`` (else a UserError:
       ``hint``), shown as their mean (``value``), min and max over seeds (``seed_low``, ``seed_high``,
       ``n_seeds``) and the mean of their item intervals (``low``, ``high``; NaN where a seed has none).

    Rows come dense first, then one-shot, then fine-tuned, each in order of appearance; columns in numeric order."""
    import pandas as pd

    if metric not in df.columns or df.empty:
        return pd.DataFrame(columns=POINT_COLUMNS)
    df = df.reset_index(drop=True)
    kinds, seeds, labels = _kinds(df)
    df = df.assign(label=pd.Series(labels, index=df.index, dtype=object))
    row_cols = [frame_column(df, k) for k in rows]
    col_of = frame_column(df, column) if column is not None else None
    ds_col = "config.dataset" if "config.dataset" in df.columns else None
    bounds = interval_bounds(df, metric)
    low, high = bounds if bounds is not None else (None, None)
    cells: dict[tuple, list[dict]] = {}
    groups, kept = [], []
    for n, (i, row) in enumerate(zip(df.index, df.to_dict("records"))):
        value = _number(row.get(metric))
        at = metric if col_of is None else row.get(col_of)
        if (headline and not kinds[n][2]) or value != value or _missing(at):
            continue
        model, task = str(row.get("model")), str(row.get("task"))
        key = tuple("–" if _missing(row.get(c)) else str(row.get(c)) for c in row_cols)
        run = () if _missing(row.get("run")) else (str(row["run"]),)
        cells.setdefault((model, task, key, value_label(at)), []).append({
            "seed": seeds[n], "value": value, "low": float(low[i]) if low is not None else float("nan"),
            "high": float(high[i]) if high is not None else float("nan"), "runs": run, "at": at,
            "label": labels[n], "method": str(row.get("method")), "finetuned": kinds[n][0]})
        groups.append((model, task, None if ds_col is None or _missing(row.get(ds_col)) else str(row[ds_col])))
        kept.append(i)
    _eval_definitions(df.loc[kept], groups, metric)
    what = column or "metric"
    by_row: dict[tuple, dict[str, list]] = {}
    for (model, task, key, col), cell in cells.items():
        kinds_here = list(dict.fromkeys(m["label"] for m in cell))
        if len(kinds_here) > 1:
            raise UserError(f"{model} · {task}: {' · '.join(key)} at {what} {col} mixes {', '.join(kinds_here)}: "
                            f"{hint}")
        by_row.setdefault((model, task, key), {})[col] = cell
    out = []
    for (model, task, key), row_cells in by_row.items():
        for runs, measured_at in _run_rows(row_cells):
            name = " · ".join(key) + (f" [{', '.join(runs)}]" if runs else "")
            for col, measured in measured_at.items():
                first = measured[0]
                out.append({"model": model, "task": task, "row": name, "key": key, "at": first["at"],
                            "column": col, **_pool(measured, f"{model} · {task}: {name} at {what} {col}", hint),
                            "method": first["method"], "finetuned": first["finetuned"],
                            "dense": first["method"] in DENSE and not first["finetuned"]})
    pts = pd.DataFrame(out, columns=POINT_COLUMNS)
    if pts.empty:
        return pts
    first_seen = {r: k for k, r in enumerate(dict.fromkeys(pts["row"]))}
    rank = pts["dense"].map(lambda d: 0 if d else 1) + pts["finetuned"].astype(int)
    at_key = pts["at"].map(lambda v: (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool)
                           else (1, 0.0, str(v)))
    order = sorted(range(len(pts)), key=lambda k: (rank.iloc[k], first_seen[pts["row"].iloc[k]], at_key.iloc[k]))
    return pts.iloc[order].reset_index(drop=True)
