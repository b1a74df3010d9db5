"""Coarse-stage benchmark: time, peak memory, stability and rank agreement of every score method, one table.

    .venv/bin/python bench/scores.py                          # SmolLM2-135M, 32 x 128 tokens, batches of 8 (~15 min)
    .venv/bin/python bench/scores.py --models tiny-blip2-t5   # the same code path in about two minutes

Each method runs in its own subprocess (a fresh process: clean peak RSS) on the same calibration batches;
time and peak are also given as ratios to a no-grad forward over those batches. Methods:

* the paper's implementation: per tensor, central difference, a full forward each time (``cache=False``);
* ours: per tensor, forward difference, cached prefixes (the default); per tensor central, cached; per group
  (block), forward difference, cached;
* first-order, plain autograd and low memory (``memory="low"``).

Slow methods are timed on a seeded sample of their perturbation units (nested: a smaller sample is the head of
a larger one, so the per-tensor methods share their first tensors). For the cached methods the once-per-run
cost (prefix cache, base losses) is timed separately (``units=[]`` in the same process) and added once; the
rest is scaled by (all units / timed units). The paper's implementation has no fixed cost: its time scales.

Stability: split-half Spearman of the block scores (zeroth order, one direction per batch, and first order:
even/odd batches), over the blocks the timed units touch. Rank agreement: Spearman with exact gradients
over those blocks: for per-tensor methods, sum over batches and over the block's (timed) tensors of ||g_t||;
for per-group methods, sum over batches of ||g_block||.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import run_in_child, trim_memory  # noqa: E402

#: label, kind, default sample of units (None: all)
METHODS = [
    ("no-grad forward", "forward", None),
    ("zeroth, per tensor, central, full forward (paper's implementation)", "zeroth/tensor/central/full", 6),
    ("zeroth, per tensor, forward, cached (ours, default)", "zeroth/tensor/forward/cache", 30),
    ("zeroth, per tensor, central, cached", "zeroth/tensor/central/cache", 12),
    ("zeroth, per group, forward, cached", "zeroth/group/forward/cache", None),
    ("first-order, plain", "first/plain", None),
    ("first-order, low memory", "first/low", None),
]


# --------------------------------------------------------------------------- one measurement (child process)
def _child(spec: dict) -> dict:
    import torch

    from ecoflap_utils import load_model
    from ecoflap_utils.measure import track
    from ecoflap_utils.scores import count_units, estimate_scores

    torch.set_num_threads(spec.get("threads", 2))
    a = load_model(spec["model"])
    if hasattr(a, "seq_len") and spec.get("seq_len"):
        a.seq_len = spec["seq_len"]
    calib = a.calibration_samples(spec["samples"], 0)
    batches = a.batches(calib, spec["batch_size"])
    kw = dict(batch_size=spec["batch_size"], progress=False)
    trim_memory()
    out: dict = {}
    kind = spec["kind"]
    if kind == "forward":
        with track("cpu") as m:
            with torch.no_grad():
                for b in batches:
                    a.loss(b)
    elif kind.startswith("first"):
        memory = kind.split("/")[1]
        # plain: per tensor (granularity "layer") so both exact references come from one run
        gran = "layer" if memory == "plain" else "block"
        with track("cpu") as m:
            res = estimate_scores(a, "first", calib, granularity=gran, variant="grad_norm", memory=memory, **kw)
        out["per_batch"] = res.per_batch
        out["draws"] = res.draws
        out["blocks"] = {b.name: list(b.weights) for b in a.pruned_blocks()}
    else:
        _, perturb, difference, cache = kind.split("/")
        n_units = count_units(a, "block", perturb)
        order = random.Random(0).sample(range(n_units), n_units)
        k = spec.get("sample_units") or n_units
        units = sorted(order[:k]) if k < n_units else None
        zkw = dict(perturb=perturb, difference=difference, cache=cache == "cache", **kw)
        fixed = None
        if cache == "cache" and units is not None:  # the once-per-run part, timed on its own
            with track("cpu") as m0:
                estimate_scores(a, "zeroth", calib, units=[], **zkw)
            fixed = m0["wall_s"]
            trim_memory()
        with track("cpu") as m:
            res = estimate_scores(a, "zeroth", calib, units=units, **zkw)
        if fixed is not None:
            m["peak_mb"] = max(m["peak_mb"], m0["peak_mb"])
        out.update(units_run=len(units) if units is not None else n_units, units_total=n_units, fixed_s=fixed,
                   units=units, draws=res.draws, forwards=res.config["forwards"])
        groups = {b.name: list(b.weights) for b in a.pruned_blocks()}
        all_units = []
        for g, ws in groups.items():
            all_units += [(g, [w]) for w in ws] if perturb == "tensor" else [(g, ws)]
        out["unit_weights"] = [all_units[u][1] for u in (units if units is not None else range(n_units))]
    out.update(wall_s=m["wall_s"], peak_mb=m["peak_mb"], peak_delta_mb=m["peak_delta_mb"])
    return out


def run_child(spec: dict) -> dict:
    r = run_in_child(__file__, spec)
    if "error" in r:
        raise RuntimeError(f"{spec['kind']} on {spec['model']} failed ({r['error']}):\n{r['stderr']}")
    return r


# --------------------------------------------------------------------------- statistics
def spearman(xs, ys) -> float | None:
    from scipy.stats import spearmanr

    if len(xs) < 3:
        return None
    r = float(spearmanr(xs, ys)[0])
    return r if math.isfinite(r) else None


def split_half(draws: dict, groups: list[str]) -> float | None:
    """Spearman of the block scores from even vs odd batches (one draw per batch), over ``groups``."""
    halves = [[sum(sum(draws[g][b]) / max(len(draws[g][b]), 1) for b in range(h, len(draws[g]), 2)) for g in groups]
              for h in (0, 1)]
    return spearman(*halves)


def exact_refs(first: dict) -> tuple[dict, dict]:
    """From the per-tensor plain first-order run: per tensor, sum over batches of ||g_t||; per block, of ||g_block||."""
    tensor = {}
    for row in first["per_batch"]:
        for w, v in row.items():
            tensor[w] = tensor.get(w, 0.0) + v
    block = {}
    for b, ws in first["blocks"].items():
        block[b] = sum(math.sqrt(sum(row[w] ** 2 for w in ws)) for row in first["per_batch"])
    return tensor, block


# --------------------------------------------------------------------------- the table
def bench_model(model: str, *, samples: int, batch_size: int, seq_len: int | None, sample: dict, threads: int
                ) -> tuple[list[dict], dict]:
    base = dict(model=model, samples=samples, batch_size=batch_size, seq_len=seq_len, threads=threads)
    results = {}
    for label, kind, _ in METHODS:
        t0 = time.time()
        r = run_child({**base, "kind": kind, "sample_units": sample.get(kind)})
        results[kind] = r
        print(f"  {label}: {r['wall_s']:.1f} s measured ({time.time() - t0:.0f} s with load)", file=sys.stderr,
              flush=True)
    tensor_ref, block_ref = exact_refs(results["first/plain"])
    blocks = results["first/plain"]["blocks"]
    rows = []
    for label, kind, _ in METHODS:
        r = results[kind]
        row = {"method": label, "peak_mb": r["peak_mb"], "measured_s": r["wall_s"], "note": ""}
        if kind == "forward":
            row["time_s"] = r["wall_s"]
        elif kind.startswith("first"):
            row["time_s"] = r["wall_s"]
            groups = list(blocks)
            # plain ran per tensor: fold its draws into blocks for the split halves
            if kind == "first/plain":
                draws = {b: [[math.sqrt(sum(results[kind]["draws"][w][i][0] ** 2 for w in ws))]
                             for i in range(len(results[kind]["per_batch"]))] for b, ws in blocks.items()}
            else:
                draws = r["draws"]
            row["stability"] = split_half(draws, groups)
            scores = {g: sum(x[0] for x in draws[g]) for g in groups}
            row["rho_exact"] = spearman([scores[g] for g in groups], [block_ref[g] for g in groups])
            row["reference"] = "||g_block||"
        else:
            ur, ut = r["units_run"], r["units_total"]
            if ur < ut:
                if r["fixed_s"] is not None:
                    row["time_s"] = r["fixed_s"] + (r["wall_s"] - r["fixed_s"]) * ut / ur
                    row["note"] = (f"{ur} of {ut} units timed (seeded); once-per-run part {r['fixed_s']:.1f} s "
                                   f"timed apart, the rest x{ut / ur:.1f}")
                else:
                    row["time_s"] = r["wall_s"] * ut / ur
                    row["note"] = f"{ur} of {ut} units timed (seeded), time x{ut / ur:.1f}"
            else:
                row["time_s"] = r["wall_s"]
            fw = r["forwards"]
            row["forwards"] = f"{fw.get('dense', 0) + fw['base']}+{fw['perturbed']}"
            per_tensor = "/tensor/" in kind
            touched: dict[str, list[str]] = {}
            for ws in r["unit_weights"]:
                g = next(b for b, bw in blocks.items() if ws[0] in bw)
                touched.setdefault(g, []).extend(ws)
            groups = [g for g in blocks if g in touched]
            draws = r["draws"]
            row["stability"] = split_half(draws, groups)
            scores = {g: sum(sum(x) / len(x) for x in draws[g]) for g in groups}
            ref = {g: sum(tensor_ref[w] for w in touched[g]) if per_tensor else block_ref[g] for g in groups}
            row["rho_exact"] = spearman([scores[g] for g in groups], [ref[g] for g in groups])
            row["reference"] = "sum_t ||g_t||" if per_tensor else "||g_block||"
            row["blocks"] = len(groups)
        rows.append(row)
    fwd, paper = rows[0], rows[1]
    for row in rows:
        row["time_x_forward"] = row["time_s"] / fwd["time_s"]
        row["mem_x_forward"] = row["peak_mb"] / fwd["peak_mb"]
        row["speedup_vs_paper"] = paper["time_s"] / row["time_s"]
    return rows, results


def fmt_table(rows, cols, headers=None) -> str:
    def f(v):
        if v is None:
            return ""
        return f"{v:,.2f}" if isinstance(v, float) else str(v)

    cells = [[f(r.get(c)) for c in cols] for r in rows]
    heads = headers or cols
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(heads)]
    line = lambda vs: "| " + " | ".join(v.ljust(n) for v, n in zip(vs, w)) + " |"  # noqa: E731
    return "\n".join([line(heads), "|" + "|".join("-" * (n + 2) for n in w) + "|"] + [line(x) for x in cells])


def targets(rows) -> list[str]:
    by = {r["method"]: r for r in rows}
    ours = by["zeroth, per tensor, forward, cached (ours, default)"]
    group = by["zeroth, per group, forward, cached"]
    low = by["first-order, low memory"]
    out = []

    def check(name, value, op, goal, unit="x"):
        ok = value >= goal if op == ">=" else value <= goal
        out.append(f"{name}: {value:.2f}{unit} (target {op} {goal}{unit}): {'met' if ok else 'MISSED'}")

    check("per tensor (ours) speed-up over the paper's implementation", ours["speedup_vs_paper"], ">=", 3)
    check("per group speed-up over the paper's implementation", group["speedup_vs_paper"], ">=", 16)
    check("per tensor (ours) peak memory / no-grad forward", ours["mem_x_forward"], "<=", 1.05)
    check("per group peak memory / no-grad forward", group["mem_x_forward"], "<=", 1.05)
    check("low-memory first-order peak memory / no-grad forward", low["mem_x_forward"], "<=", 1.1)
    check("low-memory first-order time / no-grad forward", low["time_x_forward"], "<=", 5)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=32, help="first-stage calibration samples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sample for causal LMs")
    for label, kind, default in METHODS:
        if default:
            p.add_argument(f"--units-{kind.replace('/', '-')}", type=int, default=default,
                           help=f"units timed for {label} (0: all)")
    p.add_argument("--full", action="store_true", help="no unit sampling")
    p.add_argument("--threads", type=int, default=2, help="torch threads per measurement")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scores.md"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(json.loads(a.child))))
        return 0
    sample = {} if a.full else {kind: getattr(a, f"units_{kind.replace('/', '_')}") or None
                                for _, kind, d in METHODS if d}
    t0 = time.time()
    text = []
    for model in a.models.split(","):
        print(f"{model} ...", file=sys.stderr)
        rows, _ = bench_model(model, samples=a.samples, batch_size=a.batch_size, seq_len=a.seq_len, sample=sample,
                              threads=a.threads)
        cols = ["method", "time_s", "time_x_forward", "speedup_vs_paper", "peak_mb", "mem_x_forward", "stability",
                "rho_exact", "reference", "forwards", "note"]
        heads = ["method", "time (s)", "x forward", "speed-up vs paper", "peak RSS (MB)", "x forward",
                 "split-half stability", "Spearman vs exact", "exact reference", "forwards (dense+perturbed)", "note"]
        text += [f"## {model}", "", fmt_table(rows, cols, heads), ""] + [f"* {x}" for x in targets(rows)] + [""]
    cmd = "bench/scores.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = ["# Coarse-stage scores: time, memory, stability, rank agreement", "",
            f"`.venv/bin/python {cmd.strip()}` on {date.today().isoformat()}: {a.samples} first-stage samples in "
            f"batches of {a.batch_size}, {a.seq_len} tokens each (causal LMs); each method in a fresh process with "
            f"{a.threads} torch threads on {os.cpu_count()} CPU cores; peak = process RSS (sampled every 5 ms, model "
            f"included); one noise direction per batch. Total bench time {time.time() - t0:.0f} s.", "",
            "Stability and Spearman are over the blocks the timed units touch (all blocks where no sampling); "
            "the per-tensor exact reference is restricted to the timed tensors.", ""]
    out = "\n".join(head + text)
    print(out)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    from ecoflap_utils.io import write_text_atomic

    write_text_atomic(a.out, out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
