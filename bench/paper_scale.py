"""Memory and time of every coarse-stage method at the paper's scale, on a CPU: BLIP-2 Flan-T5-XL.

    .venv/bin/python bench/paper_scale.py --scale tiny               # the same code path in about a minute
    .venv/bin/python bench/paper_scale.py                            # the architecture, random bf16 weights
    .venv/bin/python bench/paper_scale.py --weights FOLDER           # Salesforce/blip2-flan-t5-xl weights

The model is built from its config (``bench/gpu_check.py``: ViT-g/14, Q-Former, Flan-T5-XL with an untied
lm_head, as the hub checkpoint) in bfloat16. Each stage runs in a fresh subprocess, so its peak (process RSS,
sampled by ``ecoflap_utils.measure.track``) is clean and an out-of-memory kill ends only that stage:

  load        build the model (its RSS is the weights);
  forward     no-grad forward (``adapter.loss`` under ``torch.no_grad``) on one batch: the reference;
  zeroth      per tensor, forward difference, cached prefixes (the default) on a few tensors, one batch;
  paper       the paper's implementation (per tensor, central difference, a full forward each: cache=False),
              same tensors, same batch;
  first       plain first-order (autograd) on one batch;
  first-low   low-memory first-order (``memory="low"``: block checkpointing, gradients reduced as they arrive);
  wanda       Wanda 50% on one block (``ecoflap_utils.prune`` with a sparsity dict for that block's weights).

Compute on this CPU: bfloat16 matrix products run at 1-2 GFLOP/s here (no AVX512-BF16), about 20x slower
than float32, so by default (``--fp32-matmul``) every linear layer and convolution computes in float32 from the
bfloat16 weights and activations and returns bfloat16 (a custom autograd function that saves the bfloat16
inputs, so stored activations, weights and gradients stay bfloat16; only per-operation float32 copies are
transient). Memory is process RSS, not CUDA allocation: the paper's figures are GPU peaks from its logs and
are shown only beside ours; the ratios to the no-grad forward are what compare.
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

#: the paper's logs (GPU, BLIP-2 at 50% sparsity): (GB, s)
PAPER = {"wanda": (8.87, 240), "paper": (8.94, 6115), "zeroth": (8.94, 6115), "first": (22.37, 450)}
STAGES = ("load", "forward", "zeroth", "paper", "first", "first-low", "wanda")
FIRST_STAGE_SAMPLES = 32  # the paper's coarse stage: 32 samples in batches of 8


# --------------------------------------------------------------------------- float32 compute for bf16 weights
def fp32_matmuls() -> None:
    """Route bf16 ``F.linear`` / ``F.conv2d`` through float32 compute (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    lin, conv = F.linear, F.conv2d

    class Linear32(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            ctx.save_for_backward(x, w)
            ctx.has_b = b is not None
            out = lin(x.float(), w.float(), None if b is None else b.float())
            return out.to(x.dtype)

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            gx = gw = gb = None
            g32 = g.float()
            if ctx.needs_input_grad[0]:
                gx = (g32 @ w.float()).to(x.dtype)
            if ctx.needs_input_grad[1]:
                gw = (g32.reshape(-1, g32.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).float()).to(w.dtype)
            if ctx.has_b and ctx.needs_input_grad[2]:
                gb = g32.reshape(-1, g32.shape[-1]).sum(0).to(w.dtype)
            return gx, gw, gb

    def linear(x, w, b=None):
        if w.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return Linear32.apply(x, w, b)
        return lin(x, w, b)

    def conv2d(x, w, b=None, *args, **kw):
        if w.dtype == torch.bfloat16 and x.device.type == "cpu" and not (
                torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
            return conv(x.float(), w.float(), None if b is None else b.float(), *args, **kw).to(x.dtype)
        return conv(x, w, b, *args, **kw)

    F.linear = linear
    F.conv2d = conv2d


# --------------------------------------------------------------------------- one stage (child process)
def child(spec: dict) -> dict:
    import torch

    from ecoflap_utils.measure import track

    torch.set_num_threads(spec["threads"])
    if spec["fp32_matmul"]:
        fp32_matmuls()
    from gpu_check import build

    stage = spec["stage"]
    with track("cpu") as m_load:
        adapter = build(spec["scale"], "cpu", torch.bfloat16, spec.get("weights"))
    out = {"load_s": m_load["wall_s"], "load_mb": m_load["peak_mb"]}
    model = adapter.model
    lm = model.language_model
    out["untied_lm_head"] = lm.lm_head.weight is not lm.shared.weight
    out["dense_act_fn"] = lm.config.dense_act_fn
    out["params"] = sum(p.numel() for p in model.parameters())
    out["weights_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    bs = spec["batch_size"]
    calib = adapter.calibration_samples(bs, 0)
    batch = adapter.batches(calib, bs)[0]
    trim_memory()
    if stage == "load":
        out.update(wall_s=m_load["wall_s"], peak_mb=m_load["peak_mb"])
        return out
    if stage == "probe":  # per-sample activation cost: no-grad forward and a forward that keeps its graph
        one = adapter.batches(calib[:1], 1)[0]
        with track("cpu") as m:
            with torch.no_grad():
                adapter.loss(one)
        out["nograd_sample_mb"] = m["peak_delta_mb"]
        trim_memory()
        names = [w for b in adapter.pruned_blocks() for w in b.weights]
        for n, p in model.named_parameters():
            p.requires_grad_(n in set(names))
        with track("cpu") as m:
            loss = adapter.loss(one)
        out["graph_sample_mb"] = m["peak_delta_mb"]
        out["grad_mb"] = sum(model.get_parameter(n).numel() * 2 for n in names) / 2**20
        out["forward_1_s"] = m["wall_s"]
        from ecoflap_utils.scores import count_units

        out["units_total"] = count_units(adapter, "block", "tensor")
        del loss
        return out
    from ecoflap_utils import prune
    from ecoflap_utils.scores import count_units, estimate_scores

    units = spec.get("units")
    with track("cpu") as m:
        if stage == "forward":
            with torch.no_grad():
                loss = adapter.loss(batch)
            out["loss"] = float(loss)
        elif stage in ("zeroth", "paper"):
            kw = dict(perturb="tensor", difference="forward", cache=True) if stage == "zeroth" else \
                dict(perturb="tensor", difference="central", cache=False)
            res = estimate_scores(adapter, "zeroth", calib, batch_size=bs, units=units, progress=False, **kw)
            out["forwards"] = res.config["forwards"]
        elif stage in ("first", "first-low"):
            res = estimate_scores(adapter, "first", calib, batch_size=bs, progress=False,
                                  memory="low" if stage == "first-low" else "plain")
        elif stage == "wanda":
            block = adapter.pruned_blocks()[spec["wanda_block"]]
            out["wanda_block"] = block.name
            prune(adapter, {w: 0.5 for w in block.weights}, method="wanda", calibration=calib, batch_size=bs,
                  return_masks=False, progress=False)
        else:
            raise ValueError(stage)
    if stage in ("zeroth", "paper"):
        out["units_total"] = count_units(adapter, "block", "tensor")
        out["units_run"] = len(units)
    out.update(wall_s=m["wall_s"], peak_mb=m["peak_mb"], peak_delta_mb=m["peak_delta_mb"])
    return out


def run_stage(spec: dict, timeout: float | None = None) -> dict:
    return run_in_child(__file__, spec, timeout)


# --------------------------------------------------------------------------- the table
def fmt(v, nd=2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return f"{v:,.{nd}f}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="full", choices=["full", "tiny"])
    p.add_argument("--weights", default=None, help="a Salesforce/blip2-flan-t5-xl folder (default: random weights)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--memory-gb", type=float, default=None,
                   help="memory the stages may use (default: min(24, 0.92 x available RAM))")
    p.add_argument("--units", type=int, default=2, help="tensors timed for the zeroth-order stages (seeded sample)")
    p.add_argument("--wanda-block", type=int, default=39, help="index among pruned blocks (39: T5 encoder block 0)")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-fp32-matmul", dest="fp32_matmul", action="store_false",
                   help="compute in bfloat16 (very slow on CPUs without bf16 units)")
    p.add_argument("--stage-timeout", type=float, default=600)
    p.add_argument("--out", default=None, help="markdown file (default: bench/results/paper_scale.md at full scale)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    import psutil

    t_all = time.time()
    limit_mb = (a.memory_gb * 1024 if a.memory_gb else
                min(24 * 1024, 0.92 * psutil.virtual_memory().available / 2**20))
    base = dict(scale=a.scale, weights=a.weights, threads=a.threads, fp32_matmul=a.fp32_matmul,
                wanda_block=a.wanda_block if a.scale == "full" else 0)
    # 1. per-sample activation cost at batch 1, then the batch check
    probe = run_stage({**base, "stage": "probe", "batch_size": 1}, a.stage_timeout)
    if "error" in probe:
        print(f"probe failed: {probe['error']}\n{probe.get('stderr', '')}", file=sys.stderr)
        return 1
    w_mb, n1, g1, grad_mb = probe["load_mb"], probe["nograd_sample_mb"], probe["graph_sample_mb"], probe["grad_mb"]
    # forward-memory stages (forward, zeroth, low-memory first-order): weights + batch x no-grad activations,
    # with a 1.5x margin for the low-memory backward's one recomputed block and float32 transients
    need = lambda b: w_mb + 1.5 * b * n1  # noqa: E731
    largest = max(0, int((limit_mb - w_mb) / (1.5 * n1))) if n1 > 0 else 10**6
    print(f"probe: weights {w_mb / 1024:.2f} GB RSS, per sample {n1:.0f} MB (no grad) / {g1:.0f} MB (graph kept), "
          f"gradients {grad_mb / 1024:.2f} GB, batch-1 forward with graph {probe['forward_1_s']:.1f} s", file=sys.stderr)
    if a.batch_size > largest:
        print(f"batch {a.batch_size} would need about {need(a.batch_size) / 1024:.1f} GB (weights {w_mb / 1024:.1f} GB "
              f"+ {a.batch_size} x {1.5 * n1:.0f} MB per sample) > {limit_mb / 1024:.1f} GB; the largest that fits is "
              f"{largest}")
        return 2
    bs = a.batch_size
    # plain first-order keeps the graph and the gradients: largest batch that fits
    first_bs = min(bs, int((limit_mb - w_mb - grad_mb) / g1)) if g1 > 0 else bs
    rows: dict[str, dict] = {}
    stages = [s for s in a.stages.split(",") if s]
    units = None
    for stage in stages:
        spec = {**base, "stage": stage, "batch_size": bs}
        if stage in ("zeroth", "paper"):
            if units is None:
                n_tensor_units = probe["units_total"]
                units = sorted(random.Random(0).sample(range(n_tensor_units), min(a.units, n_tensor_units)))
            spec["units"] = units
        if stage == "first":
            if first_bs < 1:
                rows[stage] = {"error": f"not run: needs about {(w_mb + grad_mb + g1) / 1024:.1f} GB at batch 1 "
                                        f"(weights + gradients + one sample's graph) > {limit_mb / 1024:.1f} GB"}
                continue
            spec["batch_size"] = first_bs
        print(f"{stage} (batch {spec['batch_size']}) ...", file=sys.stderr, flush=True)
        r = run_stage(spec, a.stage_timeout)
        r["batch_size"] = spec["batch_size"]
        rows[stage] = r
        print(f"  {json.dumps({k: v for k, v in r.items() if k != 'stderr'})}", file=sys.stderr, flush=True)
        if "error" in r:
            print(r.get("stderr", ""), file=sys.stderr)
    text = report(a, rows, probe, bs, first_bs, limit_mb, time.time() - t_all, argv)
    print(text)
    out = a.out or (str(ROOT / "bench" / "results" / "paper_scale.md") if a.scale == "full" else None)
    if out:
        Path(out).write_text(text + "\n")
    return 0


def model_line(rows, probe) -> str:
    r = next((x for x in [probe, *rows.values()] if "params" in x), None)
    if r is None:
        return ""
    return (f"Model: {r['params'] / 1e9:.2f} B parameters, {r['weights_mb'] / 1024:.2f} GB in bf16; lm_head untied "
            f"from the token embeddings: {r['untied_lm_head']}; T5 activation {r['dense_act_fn']} (HF's mapping of "
            f"feed_forward_proj=\"gated-gelu\", as for the hub checkpoint); build time {r['load_s']:.0f} s per "
            f"stage process.")


def report(a, rows, probe, bs, first_bs, limit_mb, total_s, argv) -> str:
    fwd = rows.get("forward", {})
    fwd_s, fwd_mb = fwd.get("wall_s"), fwd.get("peak_mb")
    labels = {"load": "loaded model (weights only)", "forward": "no-grad forward, one batch (reference)",
              "zeroth": "zeroth, per tensor, forward difference, cached prefixes (ours)",
              "paper": "zeroth, per tensor, central, full forward (paper's implementation)",
              "first": "first-order, plain autograd", "first-low": "first-order, low memory (memory=\"low\")",
              "wanda": "Wanda 50%, one block"}
    lines = ["| stage | batch | time (s) | x forward | peak RSS (GB) | x forward | coarse stage, 32 samples (est. s) "
             "| paper GPU (GB / s) | note |", "|---|---|---|---|---|---|---|---|---|"]
    for st in STAGES:
        r = rows.get(st)
        if r is None:
            continue
        paper = PAPER.get(st)
        paper_s = f"{paper[0]} / {paper[1]:,}" if paper else ""
        if "error" in r:
            lines.append(f"| {labels[st]} | {r.get('batch_size', '')} | | | | | | {paper_s} | failed: {r['error']} |")
            continue
        t, mb = r["wall_s"], r["peak_mb"]
        est, note = None, ""
        b = r.get("batch_size", bs)
        nb = max(1, FIRST_STAGE_SAMPLES // b)
        if st in ("zeroth", "paper"):
            ut, ur = r["units_total"], r["units_run"]
            fw = r.get("forwards", {})
            if st == "zeroth" and fwd_s:
                # once per batch: the dense forward that fills the prefix cache (and gives the base loss)
                fixed = min(t, (fw.get("dense", 1) + fw.get("base", 0)) * fwd_s)
                est = nb * (fixed + (t - fixed) * ut / ur)
                note = (f"timed {ur} of {ut} tensors on 1 batch; estimate = {nb} batches x (the dense forward of "
                        f"the prefix cache, which gives the base loss, + the rest x {ut}/{ur})")
            else:
                est = t * ut / ur * nb
                note = f"timed {ur} of {ut} tensors on 1 batch; estimate = time x {ut}/{ur} x {nb} batches"
            note += (f" (forwards: {fw.get('dense', 0)} dense + {fw.get('base', 0)} base + "
                     f"{fw.get('perturbed', 0)} perturbed)")
        elif st in ("first", "first-low"):
            est = t * nb
            note = f"estimate = time x {nb} batches"
            if st == "first" and b != bs:
                note += f"; batch {b}, the largest that fits {limit_mb / 1024:.1f} GB with the graph and gradients"
        elif st == "wanda":
            note = f"block {r.get('wanda_block')}; the paper's figure is the whole model at 128 samples"
        elif st == "load":
            note = (f"{r['params'] / 1e9:.2f} B parameters, {r['weights_mb'] / 1024:.2f} GB bf16; lm_head untied: "
                    f"{r['untied_lm_head']}; dense_act_fn {r['dense_act_fn']}")
        elif st == "forward":
            note = f"loss {r.get('loss', float('nan')):.3f}"
        lines.append(f"| {labels[st]} | {b} | {fmt(t, 1)} | {fmt(t / fwd_s if fwd_s else None)} | {fmt(mb / 1024)} | "
                     f"{fmt(mb / fwd_mb if fwd_mb else None)} | {fmt(est, 0)} | {paper_s} | {note} |")
    cmd = "bench/paper_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    # allocator settings change RSS peaks (NOTES.md session 5): name them in the command line they ran under
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    cmd = f"{env} .venv/bin/python {cmd}" if env else f".venv/bin/python {cmd}"
    acc = []
    for st, lim in (("zeroth", 1.1), ("first-low", 1.1)):
        r = rows.get(st, {})
        if "peak_mb" in r and fwd_mb:
            ratio = r["peak_mb"] / fwd_mb
            acc.append(f"{labels[st]}: peak {ratio:.3f} x the no-grad forward's (target <= {lim}): "
                       f"{'met' if ratio <= lim else 'missed'}")
    r = rows.get("first", {})
    if "peak_mb" in r and fwd_mb:
        acc.append(f"plain first-order: peak {r['peak_mb'] / fwd_mb:.2f} x the no-grad forward's (at batch "
                   f"{r['batch_size']}; forward at batch {bs})")
    elif "error" in r:
        acc.append(f"plain first-order: {r['error']}")
    head = [f"# Paper scale: BLIP-2 Flan-T5-XL ({a.scale}), coarse-stage methods on a CPU", "",
            f"`{cmd.strip()}` on {date.today().isoformat()}, {os.cpu_count()} CPU cores "
            f"({a.threads} torch threads), {a.scale} architecture, "
            f"{'weights from ' + a.weights if a.weights else 'random bf16 weights'}; images 224x224 "
            f"(tiny: the tiny config's size); captions of 10-15 tokens; total {total_s / 60:.1f} min.", "",
            f"Peak = process RSS of a fresh process per stage (model included), sampled every 5 ms; ratios are to "
            f"the no-grad forward's peak and time on the same batch. The paper's columns are GPU peaks and times "
            f"from its logs (BLIP-2 at 50% sparsity, whole stage), not comparable in absolute terms: compare "
            f"ratios. {'Linear layers compute in float32 from bf16 tensors (see the script).' if a.fp32_matmul else ''}",
            "", model_line(rows, probe), "",
            f"Batch check (probe at batch 1): weights {probe['load_mb'] / 1024:.2f} GB RSS, no-grad activations "
            f"{probe['nograd_sample_mb']:.0f} MB per sample, graph kept for backward {probe['graph_sample_mb']:.0f} MB "
            f"per sample, gradients of the pruned weights {probe['grad_mb'] / 1024:.2f} GB (bf16); memory limit "
            f"{limit_mb / 1024:.1f} GB.", ""]
    return "\n".join(head + lines + [""] + [f"* {x}" for x in acc])


if __name__ == "__main__":
    sys.exit(main())
