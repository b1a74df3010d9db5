"""llm-compressor's side of ``bench/peers.py``: run in llm-compressor's own venv (``bench/peers/requirements.txt``).

Usage (``bench/peers.py`` calls it): ``PEER_PYTHON bench/peers/peer_side.py SPEC_JSON``. SPEC holds ``model`` (a
``save_pretrained`` folder), ``calib`` (a ``torch.save``d LongTensor of windows), ``method`` (wanda, sparsegpt),
``sparsity``, ``nm`` ("2:4" or null), ``batch_size``, ``threads`` and ``out`` (a safetensors file for the pruned
linear weights). Prints one JSON line: fine-stage seconds, peak RSS and the calibration passes spent.

It imports nothing from ecoflap_utils: this venv pins torch <= 2.14.0 and transformers <= 5.17.
"""
from __future__ import annotations

import json
import sys
import time


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that over from the parent
    through fork and exec, so a child started by a large parent reports the parent's peak. Both sides of
    ``bench/peers.py`` read it with this function."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PassCounter:
    """How much calibration work a fine stage spends, in passes of the calibration set: the multiply-adds of every
    linear layer of the decoder blocks that ran (tokens x in x out, counted by forward hooks, which fire only
    when the matmul has run), over those of one pass of all calibration tokens through all of them; and
    ``lm_head``'s tokens over the calibration tokens. A block's attention products (no weights) are left out: at
    128 tokens they are about 4 % of a block. Both sides of ``bench/peers.py`` count with this class."""

    def __init__(self, model):
        import torch

        self.work = {"blocks": 0, "head": 0}
        self.per_token = 0
        self.handles = []
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                macs = module.in_features * module.out_features
                self.per_token += macs
                self.handles.append(module.register_forward_hook(
                    lambda m, a, out, macs=macs: self.add("blocks", a[0].shape[:-1].numel() * macs)))
        self.handles.append(model.lm_head.register_forward_pre_hook(
            lambda m, a: self.add("head", a[0].shape[:-1].numel())))

    def add(self, key: str, amount: int) -> None:
        self.work[key] += amount

    def passes(self, tokens: int) -> dict:
        for h in self.handles:
            h.remove()
        return {"block_passes": self.work["blocks"] / (tokens * self.per_token), "head_passes": self.work["head"] / tokens}


def main(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32,
                                                 attn_implementation=spec["attn"]).eval()
    windows = torch.load(spec["calib"])
    rows = [{"input_ids": w} for w in windows]
    loader = DataLoader(rows, batch_size=spec["batch_size"], shuffle=False)
    structure = spec["nm"] or "0:0"
    # lm_head is a Linear that llm-compressor's "Linear" target would prune too; ours never prunes it
    common = dict(sparsity=spec["sparsity"], mask_structure=structure, ignore=["re:.*lm_head"])
    if spec["method"] == "wanda":
        recipe = WandaPruningModifier(**common)
    elif spec["method"] == "sparsegpt":
        recipe = SparseGPTModifier(**common, block_size=128, dampening_frac=0.01)
    else:
        raise SystemExit(f"unknown method {spec['method']}")

    counter = PassCounter(model)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=loader, recipe=recipe, num_calibration_samples=len(rows),
            pipeline="sequential")
    seconds = time.perf_counter() - t0
    passes = counter.passes(windows.numel())
    weights = {f"{n}.weight": m.weight.detach().contiguous() for n, m in model.model.layers.named_modules(
        prefix="model.layers") if isinstance(m, torch.nn.Linear)}
    save_file(weights, spec["out"])
    return {**passes, "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "llmcompressor": __import__("llmcompressor").__version__}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
