"""GPU memory and time check at the paper's scale: BLIP-2 Flan-T5-XL built from its config, random bf16 weights.

    bash bench/gpu_check.sh                 # on a machine with an NVIDIA GPU, no network needed
    python bench/gpu_check.py --scale tiny  # the same code path on a CPU, in seconds (a smoke check)
    python bench/gpu_check.py --device-map  # only the GPU + CPU split stage below (skipped without a GPU)

Stages, at the paper's settings (32 first-stage samples in batches of 8, 128 fine-stage samples,
synthetic 224x224 images and captions of COCO-like length), each also as a ratio to the first:
  0. a no-grad forward over the 32 first-stage samples (the reference);
  1. zeroth-order, the paper's implementation: per tensor, central difference, a full forward each time;
  2. zeroth-order, ours (the default): per tensor, forward difference, cached prefixes;
  3. zeroth-order, per block, forward difference, cached prefixes;
  4. first-order scores (plain autograd), then low-memory first-order (``memory="low"``);
  5. uniform Wanda 50% (fine stage only), if the time budget allows.
``--device-map`` runs instead one stage of its own (:func:`device_map_check`): tiny-llama and tiny-blip2-t5
spread over the GPU and the CPU by ``load_model(..., device_map="auto", max_memory=...)`` (GPU 0 given half
the model, the rest offloaded to CPU memory by accelerate), pruned with Wanda and SparseGPT and scored by the
coarse stage, against the same model on the GPU alone: masks, weights and block scores must be equal.
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
    cfg = Blip2Config(vision_config=Blip2VisionConfig(**v).to_dict(), qformer_config=Blip2QFormerConfig(**q).to_dict(),
                      text_config=text.to_dict(), num_query_tokens=nq, image_token_index=text.vocab_size - 1)
    return untie_lm_head_config(cfg)


def untie_lm_head_config(cfg):
    """Flan-T5 has its own lm_head (config.json: ``tie_word_embeddings: false``), but transformers 5's
    ``T5Config.__post_init__`` forces ``tie_word_embeddings=True`` (keeping only ``scale_decoder_outputs=False``),
    so a model built from the config ties lm_head to ``shared``. Setting the attribute after construction
    sticks: the model then ties nothing (see :func:`tie_t5_embeddings`). The activation needs no change:
    ``feed_forward_proj="gated-gelu"`` maps to ``dense_act_fn="gelu_new"`` (tanh GELU) in HF's T5Config, as
    for the hub checkpoint."""
    cfg.text_config.tie_word_embeddings = False
    return cfg


def tie_t5_embeddings(model) -> None:
    """The real model: encoder/decoder token embeddings share ``shared``; lm_head is a separate weight."""
    lm = model.language_model
    lm.encoder.embed_tokens.weight = lm.shared.weight
    lm.decoder.embed_tokens.weight = lm.shared.weight
    assert lm.lm_head.weight is not lm.shared.weight, "lm_head is tied to shared: Flan-T5-XL's is not"
    assert lm.config.tie_word_embeddings is False and lm.config.scale_decoder_outputs is False


def fast_random_init(model, seed: int = 0, std: float = 0.02) -> None:
    """Random weights in seconds for a model built under ``no_init_weights``: 2-D+ weights and embeddings
    from one seeded N(0, std^2) pool (each tensor at its own offset), norms' weights 1, biases 0."""
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 22, generator=gen) * std)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.dim() == 1:
                p.fill_(1.0 if ("norm" in name.lower() or name.endswith("ln.weight")) and name.endswith("weight") else 0.0)
                continue
            flat = p.view(-1)
            off = int(torch.randint(0, pool.numel(), (1,), generator=gen))
            src = torch.roll(pool, -off).to(p.dtype)
            n = flat.numel()
            for s in range(0, n, src.numel()):
                e = min(n, s + src.numel())
                flat[s:e].copy_(src[: e - s])


def build(scale: str, device: str, dtype: torch.dtype, weights: str | None = None):
    """The model as a Blip2Adapter: random weights (fast seeded init), or real ones from ``weights``
    (a Salesforce/blip2-flan-t5-xl folder); either way lm_head is untied from the token embeddings."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    from transformers.initialization import no_init_weights

    from ecoflap_utils.models.hf import Blip2Adapter

    torch.manual_seed(0)
    if weights:
        cfg = untie_lm_head_config(Blip2Config.from_pretrained(weights))
        model = Blip2ForConditionalGeneration.from_pretrained(weights, config=cfg, dtype=dtype).to(device)
    else:
        cfg = blip2_flan_t5_xl_config(scale)
        with torch.device(device), no_init_weights():
            model = Blip2ForConditionalGeneration._from_config(cfg, dtype=dtype)
        fast_random_init(model)
    tie_t5_embeddings(model)
    if getattr(model.config, "image_token_index", None) is None:
        model.config.image_token_index = cfg.text_config.vocab_size - 1
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


def split_memory(model, gpu: int = 0) -> dict:
    """``max_memory`` that puts about half of ``model`` on GPU ``gpu`` and the rest in CPU memory (bytes)."""
    from accelerate.utils import compute_module_sizes

    size = compute_module_sizes(model)[""]
    return {gpu: size // 2, "cpu": 4 * size + (1 << 30)}


def device_map_check(models=("tiny-llama", "tiny-blip2-t5"), methods=("wanda", "sparsegpt"), *, device: str = "cuda",
                     split=None) -> int:
    """Issue 19, part 3 on a GPU: a model split over the GPU and the CPU (``max_memory``) prunes and scores
    exactly as on ``device`` alone, and ``finetune`` refuses its offloaded weights. Returns 1 when anything
    differs; skipped (0) without a GPU. ``split(name)`` builds the spread model (default: ``load_model`` with
    ``device_map="auto"`` and :func:`split_memory`; another placement lets the comparison run on a CPU)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("device-map stage: skipped (no GPU)", flush=True)
        return 0
    from ecoflap_utils import UserError, load_model, prune
    from ecoflap_utils.coarse import coarse_stage
    from ecoflap_utils.finetune import finetune
    from ecoflap_utils.models.devices import offloaded_names, weight_tensor

    def values(a):
        return {w: weight_tensor(a.model, w).detach().float().cpu() for w in a.layer_names(a.stacks())}

    if split is None:
        def split(name):
            return load_model(name, device_map="auto", max_memory=split_memory(load_model(name).model))

    bad = []
    t0 = time.time()
    for name in models:
        probe = split(name)
        placed = list(dict.fromkeys(str(v) for v in probe.model.hf_device_map.values()))
        off = offloaded_names(probe.model, probe.layer_names(probe.stacks()))
        print(f"  {name}: device map over {placed}; {len(off)} of {len(probe.layer_names(probe.stacks()))} pruned "
              f"weights offloaded to the CPU; batches go to {probe.input_device()}", flush=True)
        if len(placed) < 2 or not off:
            bad.append(f"{name}: max_memory did not split the model over the GPU and the CPU ({placed})")
            continue
        for method in methods:
            single, spread = load_model(name, device=device), split(name)
            kw = dict(method=method, calib_samples=16, batch_size=4, progress=False)
            ref, got = prune(single, 0.5, **kw), prune(spread, 0.5, **kw)
            same = sum(torch.equal(ref.masks[w], got.masks[w]) for w in ref.masks)
            a, b = values(single), values(spread)
            diff = max(float((a[w] - b[w]).abs().max()) for w in a)
            print(f"  {name} {method}: {same}/{len(ref.masks)} masks identical, max weight difference {diff:.3g}, "
                  f"sparsity {got.actual_sparsity:.4f} vs {ref.actual_sparsity:.4f}", flush=True)
            if same != len(ref.masks) or diff != 0.0:
                bad.append(f"{name} {method}: masks or weights differ from the single-GPU run")
        single, spread = load_model(name, device=device), split(name)
        kw = dict(target=0.5, samples=8, batch_size=4, progress=False)
        ref, got = coarse_stage(single, **kw)["scores"], coarse_stage(spread, **kw)["scores"]
        rel = max(abs(got[g] - ref[g]) / max(abs(ref[g]), 1e-30) for g in ref)
        print(f"  {name} coarse stage (zeroth order): {len(ref)} block scores, max relative difference {rel:.3g}",
              flush=True)
        if got != ref:
            bad.append(f"{name}: coarse-stage block scores differ from the single-GPU run")
        stack = spread.block_of()[off[0]].stack  # a stack that holds offloaded weights
        try:
            finetune(spread, steps=1, lr=1e-4, batch_size=2, stacks=[stack], progress=False)
            bad.append(f"{name}: finetune trained offloaded weights instead of refusing")
        except UserError as e:
            print(f"  {name} finetune on offloaded weights refused: {e}", flush=True)
    print(f"device-map stage: {'FAILED: ' + '; '.join(bad) if bad else 'all equal to the single-GPU run'} "
          f"({time.time() - t0:.0f} s, {torch.cuda.get_device_name() if device.startswith('cuda') else device})",
          flush=True)
    return 1 if bad else 0


def main(argv=None) -> int:
    from ecoflap_utils import prune
    from ecoflap_utils.scores import compute_scores, count_units

    if argv is None:
        argv = sys.argv[1:]
    if "--device-map" in argv:
        return device_map_check()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", default="full", choices=["full", "tiny"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--budget-s", type=float, default=480, help="time budget: later stages are skipped past it")
    p.add_argument("--paper-units", type=int, default=8, help="tensors timed for the paper's implementation")
    p.add_argument("--ours-units", type=int, default=None, help="tensors timed for ours, per tensor (default: all)")
    p.add_argument("--device-map", action="store_true",
                   help="run only the GPU + CPU split stage (device_map_check); skipped without a GPU")
    a = p.parse_args(argv)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[a.dtype]
    t_start = time.time()
    adapter = build(a.scale, a.device, dtype)
    lm = adapter.model.language_model
    weights_gb = sum(p.numel() * p.element_size() for p in adapter.model.parameters()) / 1e9
    print(f"{adapter.name}: {sum(p.numel() for p in adapter.model.parameters()) / 1e9:.2f} B parameters "
          f"({weights_gb:.2f} GB in {a.dtype}) on {a.device}; lm_head untied: "
          f"{lm.lm_head.weight is not lm.shared.weight}; T5 activation {lm.config.dense_act_fn}", flush=True)
    first = adapter.calibration_samples(32, 0)
    fine = adapter.calibration_samples(128, 1)
    batches = adapter.batches(first, 8)
    rows = []
    ref = {}

    def row(stage, secs, peak, note=""):
        paper = PAPER.get(stage, ("", ""))
        rows.append((stage, secs, peak, paper[0], paper[1], note))
        print(f"  {stage}: {secs:.1f} s, peak {peak:.2f} GB {note}", flush=True)

    def over_budget(stage):
        if time.time() - t_start > a.budget_s:
            print(f"  {stage}: skipped (time budget of {a.budget_s:.0f} s spent)", flush=True)
            return True
        return False

    state = {k: v.detach().clone() for k, v in adapter.model.state_dict().items()} if a.scale == "tiny" else None

    def fwd():
        with torch.no_grad():
            for b in batches:
                adapter.loss(b)

    _, t, peak = measure(a.device, fwd)
    ref.update(t=t, peak=peak)
    row("no-grad forward (32 samples, reference)", t, peak)
    n_tensor = count_units(adapter, "block", "tensor")
    n_block = count_units(adapter, "block", "group")
    order = random.Random(0).sample(range(n_tensor), n_tensor)
    sample = sorted(order[: min(a.paper_units, n_tensor)])
    _, t, peak = measure(a.device, lambda: compute_scores(adapter, "zeroth", first, perturb="tensor",
                                                         difference="central", cache=False, units=sample,
                                                         progress=False))
    row("zeroth (paper, per tensor)", t * n_tensor / len(sample), peak,
        f"[central, full forwards; timed {len(sample)} of {n_tensor} tensors, x{n_tensor / len(sample):.0f}]")
    stages = [
        ("zeroth (ours, per tensor, cached)", dict(perturb="tensor"), n_tensor, a.ours_units),
        ("zeroth (ours, per block, cached)", dict(perturb="group"), n_block, None),
    ]
    for stage, kw, n, k in stages:
        if over_budget(stage):
            continue
        units = None if k is None or k >= n else sorted(order[:k]) if kw["perturb"] == "tensor" else None
        _, t, peak = measure(a.device, lambda: compute_scores(adapter, "zeroth", first, difference="forward",
                                                             units=units, progress=False, **kw))
        done = n if units is None else len(units)
        row(stage, t * n / done, peak, "[forward difference]" if units is None else
            f"[forward difference; timed {done} of {n} tensors, x{n / done:.1f} (fixed cost scaled too)]")
    for stage, memory in (("first-order", "plain"), ("first-order, low memory", "low")):
        if over_budget(stage):
            continue
        _, t, peak = measure(a.device, lambda: compute_scores(adapter, "first", first, memory=memory,
                                                             progress=False))
        row(stage, t, peak)
    if state is not None:
        same = all(torch.equal(v, adapter.model.state_dict()[k]) for k, v in state.items())
        print(f"  weights bit-identical after scoring: {same}", flush=True)
        if not same:
            raise SystemExit("scoring changed the weights")
    if not over_budget("wanda"):
        _, t, peak = measure(a.device, lambda: prune(adapter, 0.5, method="wanda", calibration=fine, batch_size=8,
                                                    return_masks=False, progress=False))
        row("wanda", t, peak)
    print()
    print("| stage | time (s) | x forward | peak memory (GB) | x forward | paper memory (GB) | paper time (s) | note |")
    print("|---|---|---|---|---|---|---|---|")
    for stage, secs, peak, pm, pt, note in rows:
        print(f"| {stage} | {secs:.1f} | {secs / ref['t']:.1f} | {peak:.2f} | {peak / ref['peak']:.2f} | {pm} | {pt} "
              f"| {note} |")
    print(f"\ntotal {time.time() - t_start:.0f} s; device: "
          f"{torch.cuda.get_device_name() if a.device.startswith('cuda') else 'cpu (process RSS, not comparable)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
