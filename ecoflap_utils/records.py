"""Result records in the house schema (``{"model", "method", "sparsity", "task", "metrics", "resources",
"config"}``, optionally ``"intervals": {metric: [low, high]}``) as a pandas DataFrame. A low layer: ``runs``
(the batch runner's tables), ``plots`` (figures) and ``report`` read records through it, without importing
each other.

A metric's 95 % interval becomes the column ``intervals.<metric>`` holding ``"[low, high]"`` (JSON text, as
every list in a record is flattened); :func:`interval_bounds` reads it back as two numeric columns."""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Sequence

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
            row[k if k not in row and k != "run" and not k.startswith(_NOT_METRIC_PREFIXES) else f"metrics.{k}"] = v
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
        "run", *CORE_COLUMNS) else metric
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
    """Whether a results-frame column holds a metric (not run/core, ``resources.*``, ``config.*``, ``intervals.*``)."""
    return column not in ("run", *CORE_COLUMNS) and not str(column).startswith(_NOT_METRIC_PREFIXES)
