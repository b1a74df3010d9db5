"""What a 2:4 mask buys at inference: one 2:4-pruned linear layer of BLIP-2 Flan-T5-XL's shapes through PyTorch's
semi-structured sparse matmul (``torch.sparse.to_sparse_semi_structured``) against the same dense layer.

    python bench/semi_structured.py                 # on an NVIDIA GPU (compute capability 8.0 or newer)
    python bench/semi_structured.py --out bench/results/semi_structured.md

Layers: the T5-XL feed-forward ``wi_0``/``wi_1`` (2048 -> 5120) and ``wo`` (5120 -> 2048), and an attention
projection (2048 -> 2048), in float16, with a 2:4 mask chosen by Wanda's rule (|W| times a random positive input
norm, two lowest of every four inputs: ``prune.select_prune_mask(nm=(2, 4))``). Inputs of 1 and 32 sequences of 32
tokens. Each row: median time of the dense and the sparse matmul (``torch.utils.benchmark``), their ratio and the
largest difference of the outputs. Without a CUDA GPU (or on one older than Ampere) it prints why and exits 0, so
``bench/gpu_check.sh`` can always call it. Results: Markdown on stdout and in ``--out`` when given.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"wi (2048 -> 5120)": (5120, 2048), "wo (5120 -> 2048)": (2048, 5120), "q/k/v/o (2048 -> 2048)": (2048, 2048)}
BATCHES = (1, 32)
TOKENS = 32


def why_not() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU: PyTorch's semi-structured sparse kernels run on NVIDIA GPUs only"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return f"compute capability {major}.x: semi-structured sparsity needs 8.0 (Ampere) or newer"
    return None


def measure(rows: int, cols: int, batch: int, dtype=torch.float16) -> dict:
    from torch.sparse import to_sparse_semi_structured
    from torch.utils.benchmark import Timer

    from ecoflap_utils.prune import select_prune_mask

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(rows, cols, device="cuda", dtype=dtype, generator=g)
    norms = torch.rand(cols, device="cuda", generator=g) + 0.1
    prune = select_prune_mask(w.float().abs() * norms, 0.5, nm=(2, 4))
    w = w.masked_fill(prune, 0)
    sparse = to_sparse_semi_structured(w)
    x = torch.randn(batch * TOKENS, cols, device="cuda", dtype=dtype, generator=g)
    dense_out = torch.nn.functional.linear(x, w)
    sparse_out = torch.nn.functional.linear(x, sparse)
    times = {}
    for name, weight in (("dense", w), ("sparse", sparse)):
        t = Timer("torch.nn.functional.linear(x, weight)", globals={"torch": torch, "x": x, "weight": weight})
        times[name] = t.blocked_autorange(min_run_time=1.0).median * 1e6
    return {"dense_us": times["dense"], "sparse_us": times["sparse"], "speedup": times["dense"] / times["sparse"],
            "max_abs_diff": float((dense_out - sparse_out).abs().max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the Markdown table here")
    a = ap.parse_args(argv)
    reason = why_not()
    if reason:
        print(f"semi-structured 2:4 check skipped: {reason}")
        return 0
    lines = [f"# 2:4 semi-structured matmul vs dense ({torch.cuda.get_device_name()}, torch {torch.__version__}, "
             "float16)", "", "| layer | sequences x 32 tokens | dense us | 2:4 sparse us | speed-up | max abs diff |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, (rows, cols) in SHAPES.items():
        for batch in BATCHES:
            try:
                r = measure(rows, cols, batch)
            except (RuntimeError, NotImplementedError) as e:  # a kernel this build lacks
                lines.append(f"| {label} | {batch} | failed: {str(e).splitlines()[0][:120]} | | | |")
                continue
            lines.append(f"| {label} | {batch} | {r['dense_us']:.1f} | {r['sparse_us']:.1f} | {r['speedup']:.2f}x | "
                         f"{r['max_abs_diff']:.3g} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        from ecoflap_utils.io import write_text_atomic

        write_text_atomic(a.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
