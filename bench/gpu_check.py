"""GPU memory and time check at the paper's scale: BLIP-2 Flan-T5-XL built from its config, random bf16 weights.

    bash bench/gpu_check.sh                 # on a machine with an NVIDIA GPU, no network needed
    python bench/gpu_check.py --scale tiny  # the same code path on a CPU, in seconds (a smoke check)

Stages, at the paper's settings (32 first-stage samples in batches of 8, 128 fine-stage samples,
synthetic 224x224 images and captions of COCO-like length):
  1. uniform Wanda (fine stage only);
  2. ECoFLaP zeroth-order scores, per tensor with a full forward each time (the paper's estimator);
  3. ECoFLaP zeroth-order scores, per block with cached prefixes (ours);
  4. first-order scores (autograd).
Each prints wall time and peak CUDA memory next to the paper's figures (Wanda 8.87 GB / 240 s;
zeroth-order 8.94 GB / 6,115 s; first-order 22.37 GB / 450 s; one A100 or A6000). Where a full stage
would not fit the time budget, it runs a seeded sample of the perturbation units and scales the time
by the unit count (each unit costs the same passes), and says so.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PAPER = {"wanda": (8.87, 240), "zeroth (paper, per tensor)": (8.94, 6115), "first-order": (22.37, 450)}


def blip2_flan_t5_xl_config(scale: str = "full"):
    """The architecture of Salesforce/blip2-flan-t5-xl, written out (no hub): ViT-g/14, Q-Former, Flan-T5-XL."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, T5Config

    if scale == "full":
        v = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                 image_size=224, patch_size=14, qkv_bias=True, initializer_range=0.02)
        q = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 encoder_hidden_size=1408, cross_attention_frequency=2, vocab_size=30523)
        t = dict(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
                 num_heads=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
                 eos_token_id=1, decoder_start_token_id=0)
        nq = 32
    else:  # same code path, small enough for a CPU
        v = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=56,
                 patch_size=14, qkv_bias=True, initializer_range=0.02)
        q = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 encoder_hidden_size=64, cross_attention_frequency=2, vocab_size=128)
        t = dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                 decoder_start_token_id=0)
        nq = 8
    text = T5Config(**t)
    return Blip2Config(vision_config=Blip2VisionConfig(**v).to_dict(), qformer_config=Blip2QFormerConfig(**q).to_dict(),
                       text_config=text.to_dict(), num_query_tokens=nq, image_token_index=text.vocab_size - 1)


def build(scale: str, device: str, dtype: torch.dtype):
    from transformers import Blip2ForConditionalGeneration

    from ecoflap_utils.models.hf import Blip2Adapter

    torch.manual_seed(0)
    cfg = blip2_flan_t5_xl_config(scale)
    with torch.device(device):
        model = Blip2ForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.eval()
    vocab = cfg.text_config.vocab_size - 1
    size = cfg.vision_config.image_size

    def samples(n, seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            cap = torch.randint(3, vocab, (int(torch.randint(10, 16, (1,), generator=g)),), generator=g).tolist()
            split = len(cap) // 2
            out.append({"pixel_values": torch.randn(3, size, size, generator=g), "prefix_ids": cap[:split],
                        "target_ids": cap[split:]})
        return out

    return Blip2Adapter(model, f"blip2-flan-t5-xl-architecture ({scale})", sample_fn=samples, device=device,
                        dtype=dtype, calibration_name="synthetic")


def measure(device: str, fn):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 1e9
    else:
        import psutil

        peak = psutil.Process().memory_info().rss / 1e9
    return out, time.perf_counter() - t0, peak


def main(argv=None) -> int:
    from ecoflap_utils import prune
    from ecoflap_utils.scores import compute_scores, count_units

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="full", choices=["full", "tiny"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--budget-s", type=float, default=420, help="time budget for all stages together")
    p.add_argument("--paper-units", type=int, default=4, help="tensors timed for the paper's estimator")
    p.add_argument("--ours-units", type=int, default=None, help="blocks timed for ours (default: all)")
    a = p.parse_args(argv)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[a.dtype]
    t_start = time.time()
    adapter = build(a.scale, a.device, dtype)
    weights_gb = sum(p.numel() * p.element_size() for p in adapter.model.parameters()) / 1e9
    print(f"{adapter.name}: {sum(p.numel() for p in adapter.model.parameters()) / 1e9:.2f} B parameters "
          f"({weights_gb:.2f} GB in {a.dtype}) on {a.device}", flush=True)
    first = adapter.calibration_samples(32, 0)
    fine = adapter.calibration_samples(128, 1)
    rows = []

    def row(stage, secs, peak, note=""):
        paper = PAPER.get(stage, ("", ""))
        rows.append((stage, secs, peak, paper[0], paper[1], note))
        print(f"  {stage}: {secs:.1f} s, peak {peak:.2f} GB {note}", flush=True)

    state = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()} if a.scale == "tiny" else None
    n_tensor = count_units(adapter, "block", "tensor")
    n_block = count_units(adapter, "block", "group")
    sample = sorted(random.Random(0).sample(range(n_tensor), min(a.paper_units, n_tensor)))
    _, t, peak = measure(a.device, lambda: compute_scores(adapter, "zeroth", first, perturb="tensor", cache=False,
                                                         units=sample, progress=False))
    row("zeroth (paper, per tensor)", t * n_tensor / len(sample), peak,
        f"[timed {len(sample)} of {n_tensor} tensors, x{n_tensor / len(sample):.0f}]")
    ours_units = None if a.ours_units is None else sorted(random.Random(0).sample(range(n_block), a.ours_units))
    _, t, peak = measure(a.device, lambda: compute_scores(adapter, "zeroth", first, perturb="group", cache=True,
                                                         units=ours_units, progress=False))
    k = n_block if ours_units is None else len(ours_units)
    row("zeroth (ours, per block, cached)", t * n_block / k, peak,
        "" if ours_units is None else f"[timed {k} of {n_block} blocks, x{n_block / k:.1f}]")
    _, t, peak = measure(a.device, lambda: compute_scores(adapter, "first", first, progress=False))
    row("first-order", t, peak)
    if time.time() - t_start < a.budget_s:
        _, t, peak = measure(a.device, lambda: prune(adapter, 0.5, method="wanda", calibration=fine, batch_size=8,
                                                    return_masks=False, progress=False))
        row("wanda", t, peak)
    else:
        print("  wanda: skipped (time budget spent)")
    print()
    print("| stage | time (s) | peak memory (GB) | paper memory (GB) | paper time (s) | note |")
    print("|---|---|---|---|---|---|")
    for stage, secs, peak, pm, pt, note in rows:
        print(f"| {stage} | {secs:.1f} | {peak:.2f} | {pm} | {pt} | {note} |")
    print(f"\ntotal {time.time() - t_start:.0f} s; device: "
          f"{torch.cuda.get_device_name() if a.device.startswith('cuda') else 'cpu (process RSS, not comparable)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
