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
import textwrap
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
                       label_map: Mapping[str, str] | None = None, rows: Sequence[str] | None = None):
    """Plot ``metric`` against sparsity, one series per kind of model (ECoFLaP Figures 2-4 style).

    ``df_or_records`` is the frame of ``runs.collect_results`` or a list of result records in the house
    schema (``{"model", "method", "sparsity", "task", "metrics": {...}}``). The points are those of the headline
    tables (``records.points``), so a figure never averages different records into one point:

    * a series is one row label (``rows``; by default the record's label, so fine-tuned records,
      ``"wanda · FT 30 steps"``, are their own series, drawn with open markers and dashes, and 07's intermediate
      curve points are left out; preceded by the dataset where records name several, ``records.summary_rows``);
      a method measured by several runs at one sparsity gets a series per run;
    * a series with two or more sparsities is a line, one measured at a single sparsity a marker without line;
    * records of one point from several seeds are drawn at their mean, with a translucent bar from their min to
      their max over seeds (a ``LineCollection`` with gid ``"seeds:<series>"``);
    * the dense model (method ``dense`` at sparsity 0) is a star; where one dense number is measured, it starts
      every line; where runs measured different dense numbers, each is its own star (``"dense [run]"``) and no
      line starts from one.

    ``methods`` picks and orders the series (row labels); ``label_map`` renames them in the legend. Where the
    records carry a 95 % interval for ``metric`` (``record["intervals"][metric]``, the frame's
    ``intervals.<metric>`` column) each such point gets an error bar from low to high in its series' colour
    (over several seeds: the mean of their bounds); the intervals cover the sampling of the evaluation items.
    """
    import pandas as pd

    from .records import points, summary_rows

    df = _frame(df_or_records)
    if df.empty:
        raise UserError("no results to plot: run the grid first (or check the filter)")
    col = _metric_column(df, metric)
    pts = points(df, col, column="sparsity", rows=rows or summary_rows(df),
                 hint="give such records different methods, or seeds (config.seed) where they are seeds of one point")
    if pts[["model", "task"]].drop_duplicates().shape[0] > 1:
        raise UserError("these records hold several models or tasks: plot one at a time (filter the records on "
                        "'model' and 'task')")
    pts = pts.assign(x=pd.to_numeric(pts["at"], errors="coerce")).dropna(subset=["x"])
    dense = pts[pts["dense"] & (pts["x"] == 0.0)]
    found = [r for r in dict.fromkeys(pts["row"]) if r not in set(dense["row"])]
    if methods is not None:
        missing = [m for m in methods if m not in found]
        if missing:
            raise UserError(f"method(s) {', '.join(missing)} have no results: choose from {', '.join(found)}")
        found = list(methods)
    labels = dict(label_map or {})
    anchor = float(dense["value"].iloc[0]) if len(dense) == 1 else None
    styles = _series_styles(pts, found)
    bars = []  # (points of a series, colour): drawn after every line
    for name in found:
        mine = pts[pts["row"] == name].sort_values("x")
        colour, marker, finetuned = styles[name]
        x, y = mine["x"].tolist(), mine["value"].tolist()
        line = len(x) >= 2
        if line and anchor is not None and x[0] != 0.0:
            x, y = [0.0] + x, [anchor] + y
        ax.plot(x, y, marker=marker, color=colour, linestyle=("--" if finetuned else "-") if line else "none",
                markerfacecolor="none" if finetuned else colour, label=labels.get(name, name))
        bars.append((mine, colour))
    for k, (_, d) in enumerate(dense.iterrows()):
        ax.plot([0.0], [float(d["value"])], linestyle="none", marker="*" if k == 0 else MARKERS[k % len(MARKERS)],
                markersize=12 if k == 0 else 8, color="black", label=labels.get(d["row"], d["row"]), zorder=5)
        bars.append((dense.loc[[d.name]], "black"))
    for mine, colour in bars:
        _error_bars(ax, mine, colour)
    for mine, colour in bars:
        _seed_ranges(ax, mine, colour)
    xs = sorted(set(pts["x"]))
    if 0 < len(xs) <= 12:
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.set_xlabel("sparsity")
    ax.set_ylabel(metric)
    handles, names = ax.get_legend_handles_labels()
    # long run names wrap in the legend
    names = [textwrap.fill(n, 40, subsequent_indent="  ", break_long_words=False) for n in names]
    if len(handles) > 4:  # outside the axes, so it never covers a point
        ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    elif len(handles) > 1:
        ax.legend(handles, names)
    return ax


def _series_styles(pts, names: Sequence[str]) -> dict[str, tuple[str, str, bool]]:
    """(colour, marker, fine-tuned) per series: a known method keeps its colour in every figure (``METHOD_STYLE``),
    other methods take the free colours; a method's second and later series (its fine-tuned records, other
    runs) take the next markers."""
    first = pts.drop_duplicates("row").set_index("row")
    methods = [str(first.loc[n, "method"]) for n in names]
    free = [k for k in range(len(OKABE_ITO) - 1) if k not in {METHOD_STYLE.get(m) for m in methods}]
    base: dict[str, int] = {}
    used: dict[str, int] = {}
    out = {}
    for i, (name, m) in enumerate(zip(names, methods)):
        if m not in base:
            base[m] = METHOD_STYLE[m] if m in METHOD_STYLE else (free.pop(0) if free else i % (len(OKABE_ITO) - 1))
        k = base[m]
        out[name] = (OKABE_ITO[k], MARKERS[(k + used.get(m, 0)) % len(MARKERS)], bool(first.loc[name, "finetuned"]))
        used[m] = used.get(m, 0) + 1
    return out


def _error_bars(ax, pts, colour: str) -> None:
    """Vertical bars from ``low`` to ``high`` (the item interval) at the points of ``pts`` that have both bounds."""
    have = pts.dropna(subset=["value", "low", "high"])
    if have.empty:
        return
    y = have["value"].to_numpy(dtype=float)
    below = np.clip(y - have["low"].to_numpy(dtype=float), 0.0, None)
    above = np.clip(have["high"].to_numpy(dtype=float) - y, 0.0, None)
    ax.errorbar(have["x"].to_numpy(dtype=float), y, yerr=np.vstack([below, above]), fmt="none", ecolor=colour,
                elinewidth=1.0, capsize=3, alpha=0.8, label="_nolegend_", zorder=4)


def _seed_ranges(ax, pts, colour: str) -> None:
    """A translucent bar from the min to the max over seeds at each point of ``pts`` measured with 2+ seeds."""
    several = pts[pts["n_seeds"] > 1]
    if several.empty:
        return
    ax.vlines(several["x"].to_numpy(dtype=float), several["seed_low"].to_numpy(dtype=float),
              several["seed_high"].to_numpy(dtype=float), colors=colour, linewidth=6, alpha=0.3,
              label="_nolegend_", zorder=3, gid=f"seeds:{several['row'].iloc[0]}")


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
