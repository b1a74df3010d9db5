"""Sparsity tables: per layer (from ``prune``), per block and per stack, as rows or plain text."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping, Sequence


def summarize(rows: Sequence[Mapping[str, Any]], by: str = "stack") -> list[dict[str, Any]]:
    """Aggregate per-layer rows by ``stack``, ``block`` or ``modality`` (parameter-weighted sparsities)."""
    groups: "OrderedDict[str, dict]" = OrderedDict()
    for r in rows:
        g = groups.setdefault(r[by], {by: r[by], "modality": r["modality"], "layers": 0, "params": 0,
                                      "_t": 0.0, "_a": 0.0})
        g["layers"] += 1
        g["params"] += r["params"]
        g["_t"] += r["target_sparsity"] * r["params"]
        g["_a"] += r["actual_sparsity"] * r["params"]
    out = []
    for g in groups.values():
        p = g.pop("params")
        t, a = g.pop("_t"), g.pop("_a")
        out.append({**g, "params": p, "target_sparsity": t / p if p else 0.0, "actual_sparsity": a / p if p else 0.0})
    total = sum(r["params"] for r in rows)
    if rows:
        out.append({by: "all", "modality": "", "layers": len(rows), "params": total,
                    "target_sparsity": sum(r["target_sparsity"] * r["params"] for r in rows) / total,
                    "actual_sparsity": sum(r["actual_sparsity"] * r["params"] for r in rows) / total})
    return out


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".4f") -> str:
    """A Markdown table of ``rows`` (dicts), floats formatted with ``floatfmt``."""
    if not rows:
        return "(empty)"
    cols = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep] + [line(r) for r in cells])
