"""Coarse-stage benchmark: wall time, peak memory and rank agreement of every score method.

    .venv/bin/python bench/scores.py                         # SmolLM2-135M and tiny-blip2-t5 (~12 min)
    .venv/bin/python bench/scores.py --models tiny-blip2-t5  # seconds

Each method runs in its own subprocess (a fresh process: clean peak RSS), on the same calibration
batches, and reports its wall time and peak memory also as a ratio to a no-grad forward over those
batches. The paper's estimator (one full forward per perturbed tensor, no cache) is timed on a seeded
random sample of tensors and scaled by the tensor count, since each of its perturbations costs one
full forward; the table says so. Rank agreement: Spearman of zeroth-order and jvp block scores with
exact first-order block gradient norms (sum over batches of ||g_block||_2), at 8, 32 and 128 samples.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- one measurement (child process)
def _child(spec: dict) -> dict:
    import ctypes

    import torch

    from ecoflap_utils import load_model
    from ecoflap_utils.measure import track
    from ecoflap_utils.scores import compute_scores, count_units

    torch.set_num_threads(spec.get("threads", 2))
    a = load_model(spec["model"])
    if hasattr(a, "seq_len") and spec.get("seq_len"):
        a.seq_len = spec["seq_len"]
    calib = a.calibration_samples(spec["samples"], 0)
    batches = a.batches(calib, spec["batch_size"])
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    out: dict = {}
    kind = spec["kind"]
    with track("cpu") as m:
        if kind == "forward":
            with torch.no_grad():
                for b in batches:
                    a.loss(b)
        else:
            per_batch: list = []
            kw = dict(calibration=calib, batch_size=spec["batch_size"], progress=False, per_batch=per_batch)
            if kind == "first":
                compute_scores(a, "first", variant="grad_norm", **kw)
            else:
                method, perturb, cache = kind.split("/")
                n_units = count_units(a, "block", perturb)
                units = None
                if spec.get("sample_units") and spec["sample_units"] < n_units:
                    units = sorted(random.Random(0).sample(range(n_units), spec["sample_units"]))
                compute_scores(a, method, perturb=perturb, cache=cache == "cache", units=units, **kw)
                out["units_run"] = len(units) if units is not None else n_units
                out["units_total"] = n_units
            out["per_batch"] = per_batch
    out.update(wall_s=m["wall_s"], peak_mb=m["peak_mb"], peak_delta_mb=m["peak_delta_mb"])
    return out


def run_child(spec: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['kind']} on {spec['model']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the table
def spearman(xs, ys) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys)[0])


def accumulate(per_batch: list[dict], n_batches: int) -> dict:
    out: dict = {}
    for row in per_batch[:n_batches]:
        for g, v in row.items():
            out[g] = out.get(g, 0.0) + v
    return out


def bench_model(model: str, *, samples: int, batch_size: int, seq_len: int | None, paper_tensors: int | None,
                jvp_blocks: int | None, tensor_sample: int | None, rank_samples: list[int]) -> list[dict]:
    base = dict(model=model, samples=samples, batch_size=batch_size, seq_len=seq_len, threads=THREADS)
    runs = [("no-grad forward", "forward", None, ""),
            ("zeroth, per group, cached prefixes (ours)", "zeroth/group/cache", None, ""),
            ("zeroth, per tensor, cached prefixes", "zeroth/tensor/cache", tensor_sample, ""),
            ("zeroth, per tensor, full forward (paper)", "zeroth/tensor/full", paper_tensors, ""),
            ("jvp, per group, cached prefixes", "jvp/group/cache", jvp_blocks, ""),
            ("first-order (autograd)", "first", None, "")]
    rows = []
    results = {}
    for label, kind, sample, _ in runs:
        t0 = time.time()
        r = run_child({**base, "kind": kind, "sample_units": sample})
        scale = r.get("units_total", 1) / r.get("units_run", 1) if r.get("units_run") else 1.0
        results[kind] = r
        note = (f"timed on {r['units_run']} of {r['units_total']} units (seeded sample), time x{scale:.1f}"
                if scale > 1 else "")
        rows.append({"model": model, "method": label, "time_s": r["wall_s"] * scale, "peak_mb": r["peak_mb"],
                     "extra_mb": r["peak_delta_mb"], "note": note, "measured_s": r["wall_s"]})
        print(f"  {label}: {r['wall_s']:.1f} s measured ({time.time() - t0:.0f} s with load)", file=sys.stderr)
    fwd = rows[0]
    for row in rows:
        row["time_x_forward"] = row["time_s"] / fwd["time_s"]
        row["mem_x_forward"] = row["peak_mb"] / fwd["peak_mb"]
    ours = rows[1]["time_s"]
    for row in rows:
        row["time_x_ours"] = row["time_s"] / ours
    # rank agreement with exact block gradient norms, at several sample counts
    rank = []
    exact_pb = results["first"]["per_batch"]
    for n in rank_samples:
        nb = max(1, n // batch_size)
        if nb > len(exact_pb):
            continue
        ex = accumulate(exact_pb, nb)
        g = list(ex)
        z = accumulate(results["zeroth/group/cache"]["per_batch"], nb)
        entry = {"model": model, "samples": nb * batch_size, "zeroth_vs_exact": spearman([ex[k] for k in g],
                                                                                         [z[k] for k in g])}
        j = accumulate(results["jvp/group/cache"]["per_batch"], nb)
        jg = [k for k in g if j.get(k, 0) != 0]
        if len(jg) >= 3:
            entry["jvp_vs_exact"] = spearman([ex[k] for k in jg], [j[k] for k in jg])
            entry["jvp_groups"] = len(jg)
        rank.append(entry)
    return rows, rank


def fmt_table(rows, cols) -> str:
    def f(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    cells = [[f(r.get(c, "")) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda vs: "| " + " | ".join(v.ljust(n) for v, n in zip(vs, w)) + " |"
    return "\n".join([line(cols), "|" + "|".join("-" * (n + 2) for n in w) + "|"] + [line(x) for x in cells])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,tiny-blip2-t5")
    p.add_argument("--samples", type=int, default=32, help="first-stage calibration samples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sample for causal LMs")
    p.add_argument("--paper-tensors", type=int, default=6, help="tensors timed for the paper's estimator on large models")
    p.add_argument("--jvp-blocks", type=int, default=6, help="blocks timed for jvp on large models")
    p.add_argument("--tensor-sample", type=int, default=12, help="tensors timed for per-tensor cached zeroth on large models")
    p.add_argument("--full", action="store_true", help="no sampling, and rank agreement up to 128 samples everywhere")
    p.add_argument("--threads", type=int, default=2, help="torch threads per measurement (1 on a busy machine)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scores.md"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(json.loads(a.child))))
        return 0
    global THREADS
    THREADS = a.threads
    all_rows, all_rank = [], []
    t0 = time.time()
    for model in a.models.split(","):
        large = model.startswith("smollm2") or "/" in model
        print(f"{model} ...", file=sys.stderr)
        samples = a.samples if (large and not a.full) else max(a.samples, 128)
        rows, rank = bench_model(
            model, samples=samples, batch_size=a.batch_size, seq_len=a.seq_len,
            paper_tensors=None if (a.full or not large) else a.paper_tensors,
            jvp_blocks=None if (a.full or not large) else a.jvp_blocks,
            tensor_sample=None if (a.full or not large) else a.tensor_sample,
            rank_samples=[8, 32, 128])
        if samples != a.samples:  # time/memory rows are reported at the requested sample count only on large models
            for r in rows:
                r["note"] = (r["note"] + "; " if r["note"] else "") + f"{samples} samples"
        all_rows += rows
        all_rank += rank
    cols = ["model", "method", "time_s", "time_x_forward", "time_x_ours", "peak_mb", "mem_x_forward", "extra_mb", "note"]
    text = ["# Coarse-stage scores: time, memory, rank agreement", "",
            f"{a.samples} first-stage samples in batches of {a.batch_size}"
            f"{f', {a.seq_len} tokens each' if a.seq_len else ''}; each method in a fresh process on "
            f"{os.cpu_count()} CPU cores; peak = process RSS (sampled), extra = peak above the state after loading.",
            "", fmt_table(all_rows, cols), "",
            "Rank agreement (Spearman) with exact first-order block gradient norms (jvp on the timed blocks only "
            "where it was sampled):", "",
            fmt_table(all_rank, ["model", "samples", "zeroth_vs_exact", "jvp_vs_exact", "jvp_groups"]), "",
            f"total bench time {time.time() - t0:.0f} s"]
    out = "\n".join(text)
    print(out)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    from ecoflap_utils.io import write_text_atomic

    write_text_atomic(a.out, out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
