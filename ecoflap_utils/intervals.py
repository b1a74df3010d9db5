"""95 % intervals on headline metrics: how much a number could move with other evaluation items.

Method: the percentile bootstrap (Efron & Tibshirani 1993, *An Introduction to the Bootstrap*, ch. 13).
The evaluated items (images, questions, queries, perplexity windows) are resampled with replacement
``n_boot`` times (default 1,000); the statistic is recomputed on each resample, and the interval is the
``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of those values (numpy's linear interpolation).

What it means: the sampling variation of the *evaluation items only*, i.e. how far the metric of this
very model could move had another set of items of the same kind been drawn. It does not cover the
variation across calibration seeds (another calibration draw prunes other weights), nor across training
runs: those need reruns with other seeds, whose records (``config.seed``) the tables and sentences pool into
a mean with its min–max over seeds (``records.points``).

Reproducible: the resamples come from ``numpy.random.default_rng(seed)`` (default ``seed=0``); row ``b``
of ``rng.integers(0, n, size=(n_boot, n))`` holds the item indices of resample ``b`` (drawn in blocks of
rows, which gives the same numbers), so the same scores always give the same interval.

Two results differ, in the sense this project's prose uses, only when the gap between them exceeds both
noises (:func:`clear_difference`): their item intervals do not overlap (:func:`intervals_overlap`,
:func:`differs`) *and* their ranges over seeds (min–max, two or more seeds each) do not overlap, i.e. every
seed of the better one beats every seed of the other. That test is conservative: two 95 % intervals that just
touch correspond to a difference significant at about the 0.6 % level for independent estimates, so
overlapping intervals do not prove the methods equal, only that this evaluation cannot tell them apart.

Records carry intervals next to their metrics (house schema)::

    {"model", "method", "sparsity", "task", "metrics": {"acc1": 71.2, ...},
     "intervals": {"acc1": [68.4, 74.0]}, "resources", "config"}
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

N_BOOT = 1000
LEVEL = 0.95
SEED = 0
#: fewer items than this get no interval (one item resamples to itself: a zero-width interval would mislead)
MIN_ITEMS = 2
#: key of a record's intervals, next to "metrics"
KEY = "intervals"
_BLOCK_CELLS = 1 << 18  # index-matrix entries per block of resamples (2 MiB of int64: stays in cache)

__all__ = ["N_BOOT", "LEVEL", "SEED", "MIN_ITEMS", "KEY", "resample_indices", "resample_ci", "bootstrap_ci",
           "ratio_bootstrap_ci", "perplexity_ci", "proportion_halfwidth", "interval_of", "intervals_overlap",
           "differs", "clear_difference", "format_interval"]


def _check(n_boot: int, level: float) -> None:
    if not isinstance(n_boot, (int, np.integer)) or isinstance(n_boot, bool) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1 (0.95 for a 95 % interval), got {level!r}")


def resample_indices(n_items: int, n_boot: int = N_BOOT, seed: int = SEED) -> Iterator[np.ndarray]:
    """Blocks of bootstrap index rows: together the rows of ``default_rng(seed).integers(0, n_items,
    size=(n_boot, n_items))``, yielded a few rows at a time so that memory stays bounded for large sets."""
    if n_items < 1:
        raise ValueError("cannot resample an empty set of items")
    rng = np.random.default_rng(seed)
    rows = max(1, _BLOCK_CELLS // n_items)
    for start in range(0, n_boot, rows):
        yield rng.integers(0, n_items, size=(min(rows, n_boot - start), n_items))


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(stats, [tail, 100.0 - tail])
    return float(lo), float(hi)


def resample_ci(n_items: int, statistic_of: Callable[[np.ndarray], np.ndarray], *, n_boot: int = N_BOOT,
                level: float = LEVEL, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of any statistic of ``n_items`` items.

    ``statistic_of(idx)`` gets a ``(b, n_items)`` integer array of resampled item indices (one resample
    per row) and returns the ``b`` statistics; it lets several per-item arrays be resampled together
    (e.g. a query's recall and its caption count).
    """
    _check(n_boot, level)
    stats = np.concatenate([np.asarray(statistic_of(idx), dtype=np.float64).reshape(len(idx))
                            for idx in resample_indices(n_items, n_boot, seed)])
    return _percentiles(stats, level)


def _as_items(values: Any, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name} must be one value per evaluation item (1-D), got shape {v.shape}")
    if v.size == 0:
        raise ValueError(f"{name} is empty: need at least one evaluation item")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} holds NaN or infinite values: score every item with a finite number")
    return v


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, statistic: Callable = np.mean, n_boot: int = N_BOOT,
                 level: float = LEVEL, seed: int = SEED) -> tuple[float, float]:
    """``(low, high)``: percentile bootstrap interval of ``statistic`` over per-item ``values``.

    ``values`` holds one score per evaluation item (e.g. 100 x correct for top-1 accuracy in percent, a
    question's VQA score, an image's CIDEr-D). ``statistic`` reduces a ``(b, n)`` array along ``axis=1``
    (numpy reductions such as ``np.mean``/``np.median`` do); a function without ``axis`` is applied row by
    row. See the module docstring for the method and what the interval means.
    """
    v = _as_items(values, "values")

    def stat(idx: np.ndarray) -> np.ndarray:
        samples = v[idx]
        try:
            return statistic(samples, axis=1)
        except TypeError:
            return np.array([statistic(row) for row in samples], dtype=np.float64)

    return resample_ci(v.size, stat, n_boot=n_boot, level=level, seed=seed)


def ratio_bootstrap_ci(numerators: Sequence[float] | np.ndarray, denominators: Sequence[float] | np.ndarray, *,
                       transform: Callable[[np.ndarray], np.ndarray] | None = None, n_boot: int = N_BOOT,
                       level: float = LEVEL, seed: int = SEED) -> tuple[float, float]:
    """Interval of ``transform(sum(numerators) / sum(denominators))`` with items resampled as units.

    For perplexity the items are the evaluation windows: numerator = a window's summed NLL, denominator =
    its scored tokens, ``transform=np.exp`` (see :func:`perplexity_ci`). Tokens within a window are not
    independent, so whole windows are resampled. ``transform`` (default: none) is applied to each
    resample's ratio; for a monotone one such as ``exp`` the interval is the transformed interval of the ratio.
    """
    num = _as_items(numerators, "numerators")
    den = _as_items(denominators, "denominators")
    if num.shape != den.shape:
        raise ValueError(f"{num.size} numerators but {den.size} denominators: give one of each per item")
    if (den <= 0).any():
        raise ValueError("denominators must be positive (e.g. each window's number of scored tokens)")

    def stat(idx: np.ndarray) -> np.ndarray:
        r = num[idx].sum(axis=1) / den[idx].sum(axis=1)
        return transform(r) if transform is not None else r

    return resample_ci(num.size, stat, n_boot=n_boot, level=level, seed=seed)


def perplexity_ci(window_nll: Sequence[float], window_tokens: Sequence[float], **kw) -> tuple[float, float]:
    """Interval of perplexity = exp(sum NLL / sum tokens), windows resampled as units (keywords as
    :func:`ratio_bootstrap_ci`)."""
    return ratio_bootstrap_ci(window_nll, window_tokens, transform=np.exp, **kw)


def proportion_halfwidth(p: float, n: int, level: float = LEVEL) -> float:
    """Half-width of the normal-approximation (Wald) interval of a proportion ``p`` (0-1) on ``n`` items:
    ``z * sqrt(p (1 - p) / n)``; multiply by 100 for percentage points. A 0/1 metric's widest case is
    p = 0.5; soft scores (VQA accuracy's thirds) vary less than a 0/1 score of the same mean."""
    from statistics import NormalDist

    if n < 1:
        raise ValueError(f"n must be a positive number of items, got {n}")
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    return z * math.sqrt(p * (1.0 - p) / n)


# ------------------------------------------------------------------------------ reading and comparing
def _pair(x: Any) -> tuple[float, float] | None:
    if x is None or isinstance(x, (str, bytes)):
        return None
    try:
        lo, hi = (float(v) for v in x)
    except (TypeError, ValueError):
        return None
    if math.isnan(lo) or math.isnan(hi):
        return None
    return (lo, hi) if lo <= hi else (hi, lo)


def interval_of(record: Mapping[str, Any], metric: str) -> tuple[float, float] | None:
    """A record's ``(low, high)`` for ``metric`` (its ``"intervals"`` entry), or None when it has none.

    Takes a house-schema record (``record["intervals"][metric]``), an evaluator's result dict (same key)
    or a flat row with ``<metric>.ci_low`` / ``<metric>.ci_high`` (``records.records_frame``)."""
    iv = record.get(KEY)
    if isinstance(iv, Mapping) and metric in iv:
        return _pair(iv[metric])
    lo, hi = record.get(f"{metric}.ci_low"), record.get(f"{metric}.ci_high")
    return _pair((lo, hi)) if lo is not None and hi is not None else None


def intervals_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two ``(low, high)`` intervals share at least one point (touching counts as overlapping)."""
    pa, pb = _pair(a), _pair(b)
    if pa is None or pb is None:
        raise ValueError(f"intervals must be (low, high) pairs of numbers, got {a!r} and {b!r}")
    return pa[0] <= pb[1] and pb[0] <= pa[1]


def differs(record_a: Mapping[str, Any], record_b: Mapping[str, Any], metric: str) -> bool:
    """True only when both records have an interval for ``metric`` and the intervals do not overlap.

    False means "this evaluation cannot tell them apart" (or an interval is missing): prose should then
    not call one method better than the other. See the module docstring for why overlap is conservative."""
    a, b = interval_of(record_a, metric), interval_of(record_b, metric)
    if a is None or b is None:
        return False
    return not intervals_overlap(a, b)


def clear_difference(items_a: Sequence[float] | None, items_b: Sequence[float] | None,
                     seeds_a: Sequence[float] | None, seeds_b: Sequence[float] | None) -> bool:
    """Whether two points clearly differ: only when the gap exceeds both the item intervals and the spread over
    seeds. ``items_*``: the 95 % item intervals ``(low, high)``; ``seeds_*``: ``(min, max, n)`` over the seeds.

    True only when both item intervals are given and do not overlap, and both points come from two or more
    seeds whose ranges do not overlap (every seed of one beats every seed of the other). A missing interval or a
    single seed is not evidence of a difference: False ("no clear difference", ``report.compare``)."""
    if items_a is None or items_b is None or seeds_a is None or seeds_b is None:
        return False
    if int(seeds_a[2]) < 2 or int(seeds_b[2]) < 2:
        return False
    return not intervals_overlap(items_a, items_b) and not intervals_overlap(seeds_a[:2], seeds_b[:2])


def format_interval(value: float, interval: Sequence[float] | None, fmt: str = ".2f") -> str:
    """``"71.20 [68.40, 74.00]"``, or just the value when there is no interval."""
    text = format(float(value), fmt)
    pair = _pair(interval)
    return text if pair is None else f"{text} [{format(pair[0], fmt)}, {format(pair[1], fmt)}]"
