"""Figure helpers: each takes a matplotlib ``ax``, draws one kind of ECoFLaP figure on it and returns it.

``set_style()`` sets the house rcParams; ``save(fig, OUT_DIR, name)`` writes ``OUT_DIR/figures/name.png``.
The helpers never call ``pyplot`` themselves, so they work on any backend (and on a bare
``matplotlib.figure.Figure``). Every helper labels both axes and adds a legend when it draws more than one
series; long tick-label rows (many blocks) are rotated and thinned so labels never overlap.
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import UserError

# Okabe & Ito (2008), "Color Universal Design": distinguishable under the common colour-vision deficiencies.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
MAX_TICK_LABELS = 40  # more category labels than this are thinned to every k-th one
DENSE_METHODS = ("dense", "none", "")
#: one colour and marker per known method, so a method looks the same in every figure
METHOD_STYLE = {"wanda": 0, "sparsegpt": 1, "ecoflap-zeroth": 2, "ecoflap-first": 3, "magnitude": 4, "owl": 5,
                "ecoflap-zeroth-sparsegpt": 6}


def set_style() -> None:
    """Set matplotlib rcParams for the notebooks' figures.

    Readable font sizes, a light grid, constrained layout (no clipped labels), the Okabe-Ito
    colour-blind-friendly colour cycle, and 150-dpi PNGs. Use inside ``matplotlib.rc_context()`` to keep
    the change local.
    """
    import matplotlib as mpl
    from cycler import cycler

    mpl.rcParams.update({
        "font.size": 11,
        "axes.titlesize": 12,
        "axes.labelsize": 11,
        "xtick.labelsize": 9,
        "ytick.labelsize": 9,
        "legend.fontsize": 9,
        "legend.frameon": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "grid.linestyle": "-",
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.prop_cycle": cycler(color=list(OKABE_ITO)),
        "lines.linewidth": 1.8,
        "lines.markersize": 5,
        "figure.figsize": (6.0, 4.0),
        "figure.dpi": 100,
        "figure.constrained_layout.use": True,
        "savefig.dpi": 150,
        "savefig.format": "png",
    })


def safe_name(text: str) -> str:
    """``text`` as a file-name stem: letters, digits and ``._=,+-`` kept, anything else becomes ``_``."""
    s = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", str(text)).strip("_")
    s = s.lstrip(".")
    return s or "_"


def save(fig, out_dir: str | os.PathLike, name: str, *, dpi: int = 150) -> Path:
    """Write ``fig`` to ``out_dir/figures/<name>.png`` atomically (temporary file, then rename); return the path.

    ``name`` is made file-system safe (``/`` and spaces become ``_``); a trailing ``.png`` is optional.
    """
    if not str(name).strip():
        raise UserError("figure name is empty: pass a name such as 'sparsity_per_block'")
    stem = str(name)[:-4] if str(name).lower().endswith(".png") else str(name)
    folder = Path(out_dir) / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{safe_name(stem)}.png"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.stem}.", suffix=".png.tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _as_array(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().float().cpu().numpy()
    return np.asarray(v, dtype=float).ravel()


def _frame(df_or_records):
    import pandas as pd

    if isinstance(df_or_records, pd.DataFrame):
        return df_or_records
    if isinstance(df_or_records, Mapping):
        df_or_records = [df_or_records]
    from .records import records_frame

    return records_frame(list(df_or_records))


def _metric_column(df, metric: str) -> str:
    for col in (metric, f"metrics.{metric}"):
        if col in df.columns:
            return col
    from .records import is_metric_column

    known = [c for c in df.columns if is_metric_column(c)]
    raise UserError(f"metric {metric!r} is not in the results: choose one of {', '.join(known) or '(none)'}")


def metric_vs_sparsity(ax, df_or_records, metric: str, *, methods: Sequence[str] | None = None,
                       label_map: Mapping[str, str] | None = None):
    """Plot ``metric`` against sparsity, one line per pruning method (ECoFLaP Figures 2-4 style).

    ``df_or_records`` is the frame of ``runs.collect_results`` or a list of result records in the house
    schema (``{"model", "method", "sparsity", "task", "metrics": {...}}``). Rows with sparsity 0 are the
    dense model: their mean is drawn as a star and starts every method's line that has no point of its own
    at 0. Repeated (method, sparsity) rows (e.g. seeds) are averaged. ``methods`` picks and orders the
    lines; ``label_map`` renames them in the legend.

    Where the records carry a 95 % interval for ``metric`` (``record["intervals"][metric]``, the frame's
    ``intervals.<metric>`` column) each such point gets an error bar from low to high, in its line's colour
    (repeated rows: the mean of their bounds); the intervals cover the sampling of the evaluation items.
    """
    from .records import interval_bounds

    df = _frame(df_or_records)
    if df.empty:
        raise UserError("no results to plot: run the grid first (or check the filter)")
    col = _metric_column(df, metric)
    d = df[["method", "sparsity", col]].copy()
    bounds = interval_bounds(df, col)
    d["lo_"], d["hi_"] = bounds if bounds is not None else (np.nan, np.nan)
    d["sparsity"] = d["sparsity"].astype(float)
    d[col] = d[col].astype(float)
    d = d.dropna(subset=["sparsity", col])
    d["method"] = d["method"].fillna("dense").astype(str)
    dense = d[d["sparsity"] == 0.0]
    dense_value = float(dense[col].mean()) if len(dense) else None
    found = [m for m in dict.fromkeys(d["method"]) if m.lower() not in DENSE_METHODS]
    if methods is not None:
        missing = [m for m in methods if m not in found]
        if missing:
            raise UserError(f"method(s) {', '.join(missing)} have no results: choose from {', '.join(found)}")
        found = list(methods)
    labels = dict(label_map or {})
    free = [k for k in range(len(OKABE_ITO) - 1) if k not in {METHOD_STYLE.get(m) for m in found}]
    bars = []  # (points with their mean value and bounds, colour): drawn after every line
    for i, m in enumerate(found):
        mine = d[d["method"] == m]
        pts = mine.groupby("sparsity")[col].mean()
        if dense_value is not None and 0.0 not in pts.index:
            pts.loc[0.0] = dense_value
        pts = pts.sort_index()
        k = METHOD_STYLE[m] if m in METHOD_STYLE else (free.pop(0) if free else i % (len(OKABE_ITO) - 1))
        ax.plot(pts.index.to_numpy(), pts.to_numpy(), marker=MARKERS[k % len(MARKERS)], color=OKABE_ITO[k],
                label=labels.get(m, m))
        bars.append((mine.groupby("sparsity")[[col, "lo_", "hi_"]].mean(), OKABE_ITO[k]))
    if dense_value is not None:
        ax.plot([0.0], [dense_value], linestyle="none", marker="*", markersize=12, color="black",
                label=labels.get("dense", "dense"), zorder=5)
        bars.append((dense[[col, "lo_", "hi_"]].mean().to_frame(name=0.0).T, "black"))
    for pts, colour in bars:
        _error_bars(ax, pts, col, colour)
    xs = sorted(set(d["sparsity"]))
    if 0 < len(xs) <= 12:
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.set_xlabel("sparsity")
    ax.set_ylabel(metric)
    if len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend()
    return ax


def _error_bars(ax, pts, col: str, colour: str) -> None:
    """Vertical bars from ``lo_`` to ``hi_`` at the points of ``pts`` (index: sparsity) that have both bounds."""
    have = pts.dropna(subset=[col, "lo_", "hi_"])
    if have.empty:
        return
    y = have[col].to_numpy(dtype=float)
    below = np.clip(y - have["lo_"].to_numpy(dtype=float), 0.0, None)
    above = np.clip(have["hi_"].to_numpy(dtype=float) - y, 0.0, None)
    ax.errorbar(have.index.to_numpy(dtype=float), y, yerr=np.vstack([below, above]), fmt="none", ecolor=colour,
                elinewidth=1.0, capsize=3, alpha=0.8, label="_nolegend_", zorder=4)


def _category_ticks(ax, names: Sequence[str], *, axis: str = "x") -> None:
    """Category tick labels that never overlap: rotated when long or many, thinned past ``MAX_TICK_LABELS``."""
    n = len(names)
    step = max(1, math.ceil(n / MAX_TICK_LABELS))
    pos = list(range(0, n, step))
    labels = [str(names[i]) for i in pos]
    longest = max((len(s) for s in labels), default=0)
    rotate = len(pos) > 8 or longest * len(pos) > 60
    if axis == "x":
        ax.set_xticks(pos)
        ax.set_xticklabels(labels, rotation=90 if rotate else 0, ha="center")
        ax.set_xlim(-0.6, n - 0.4)
    else:
        ax.set_yticks(pos)
        ax.set_yticklabels(labels)


def bar_by_group(ax, names: Sequence[str], values, *, groups: Sequence[str] | None = None,
                 ylabel: str = "sparsity", xlabel: str = "block"):
    """One bar per item (e.g. each block's sparsity), coloured by group (e.g. modality) — ECoFLaP Figure 5 style.

    ``groups[i]`` is the group of ``names[i]``; bars of one group share a colour and the legend lists the
    groups in order of appearance. Tick labels are rotated and thinned when there are many blocks.
    """
    vals = _as_array(values)
    if len(names) != len(vals):
        raise UserError(f"bar_by_group: {len(names)} names but {len(vals)} values: pass one value per name")
    if groups is not None and len(groups) != len(vals):
        raise UserError(f"bar_by_group: {len(groups)} groups but {len(vals)} values: pass one group per name")
    x = np.arange(len(vals))
    if groups is None:
        ax.bar(x, vals, color=OKABE_ITO[0], width=0.85)
    else:
        order = list(dict.fromkeys(str(g) for g in groups))
        for i, g in enumerate(order):
            idx = np.array([str(h) == g for h in groups])
            ax.bar(x[idx], vals[idx], color=OKABE_ITO[i % len(OKABE_ITO)], width=0.85, label=g)
        if len(order) > 1:  # outside the axes, so it never covers a bar
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _category_ticks(ax, list(names))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


def hist_by_group(ax, values_by_group: Mapping[str, Any], *, xlabel: str, log: bool = False, bins: int = 50,
                  density: bool = True):
    """Overlaid histograms of values per group (e.g. weight magnitudes or scores per modality) — ECoFLaP Figure 1.

    All groups share the same bins so they compare directly; ``density=True`` (default) shows each group's
    fraction of values per bin, so groups of different sizes compare (and log bins keep their shape). ``log=True`` uses logarithmic bins and x axis (for positive quantities such as
    magnitudes and scores that span orders of magnitude); non-positive values are then dropped. Accepts numpy
    arrays, lists or torch tensors.
    """
    if not values_by_group:
        raise UserError("hist_by_group: no groups given: pass {'vision': values, 'language': values}")
    arrays = {str(k): _as_array(v) for k, v in values_by_group.items()}
    arrays = {k: v[np.isfinite(v)] for k, v in arrays.items()}
    if log:
        arrays = {k: v[v > 0] for k, v in arrays.items()}
    nonempty = [v for v in arrays.values() if v.size]
    if not nonempty:
        raise UserError("hist_by_group: every group is empty" + (" after dropping values <= 0 for log=True" if log else ""))
    lo = min(float(v.min()) for v in nonempty)
    hi = max(float(v.max()) for v in nonempty)
    if hi <= lo:
        hi = lo + (abs(lo) if lo else 1.0) * 1e-6 + 1e-12
    edges = np.geomspace(lo, hi, bins + 1) if log else np.linspace(lo, hi, bins + 1)
    for i, (k, v) in enumerate(arrays.items()):
        counts, _ = np.histogram(v, bins=edges)
        counts = counts / max(v.size, 1) if density else counts
        color = OKABE_ITO[i % len(OKABE_ITO)]
        ax.stairs(counts, edges, fill=True, alpha=0.35, color=color)
        ax.stairs(counts, edges, color=color, linewidth=1.5, label=f"{k} (n={v.size:,})")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of values" if density else "count")
    if len(arrays) > 1:
        ax.legend()
    return ax


def line_by_group(ax, x, ys: Mapping[str, Any], *, xlabel: str, ylabel: str, markers: bool = True):
    """One line per group over a shared ``x`` (e.g. score per block index for each modality, or loss per step).

    ``x`` is one sequence for all groups, or a dict with the same keys as ``ys`` when groups have their own x.
    """
    if not ys:
        raise UserError("line_by_group: no series given: pass ys={'name': values}")
    for i, (k, y) in enumerate(ys.items()):
        xi = _as_array(x[k] if isinstance(x, Mapping) else x)
        yi = _as_array(y)
        if xi.size != yi.size:
            raise UserError(f"line_by_group: series {k!r} has {yi.size} values but x has {xi.size}: "
                            f"pass one y per x")
        ax.plot(xi, yi, marker=MARKERS[i % len(MARKERS)] if markers and yi.size <= 50 else None, label=str(k))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(ys) > 1:
        ax.legend()
    return ax
