"""Result records in the house schema (``{"model", "method", "sparsity", "task", "metrics", "resources",
"config"}``) as a pandas DataFrame. A low layer: ``runs`` (the batch runner's tables) and ``plots``
(figures) both read records through it, without importing each other."""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Sequence

CORE_COLUMNS = ("model", "method", "sparsity", "task")


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
    ``sparsity``; one column per metric (nested metrics joined with ``.``); ``resources.*``, ``config.*``."""
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
            row[k if k not in row and k != "run" and not k.startswith(("resources.", "config.")) else f"metrics.{k}"] = v
        _flatten("resources.", r.get("resources") or {}, row)
        _flatten("config.", r.get("config") or {}, row)
        rows.append(row)
    df = pd.DataFrame(rows)
    for k in (("run",) if runs is not None else ()) + CORE_COLUMNS:
        if k not in df.columns:
            df[k] = None
    return df
