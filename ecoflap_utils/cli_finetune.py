"""The ``finetune`` subcommand: ``python -m ecoflap_utils finetune --model RUN --steps N --out DIR``.

Thin: it parses flags and calls :func:`ecoflap_utils.finetune.run_finetune`. A UserError propagates
(``cli.main`` prints it on one line and exits with code 2); nothing is written then.
"""
from __future__ import annotations

import argparse

from .cli_format import DefaultsFormatter


def _warmup(text: str) -> float | int:
    """``0.1`` is a fraction of the steps, ``20`` a number of steps."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction (0.1) nor a step count (20)") from None


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``finetune`` to an ``argparse`` subparsers object; returns the new parser."""
    p = subparsers.add_parser(
        "finetune", help="fine-tune a pruned run with its zeros kept and write it as a new run",
        formatter_class=DefaultsFormatter,
        description="Masked fine-tuning of a pruned model (a folder written by `prune`): the chosen stacks are "
                    "trained with AdamW (linear warm-up, cosine decay) on the model's task loss while every pruned "
                    "weight stays exactly zero. Writes a run like prune's to --out, atomically: the model, "
                    "pruning_config.json (the input's settings plus a 'finetune' entry), sparsity_report.csv "
                    "(unchanged), resources.json (the input's stages plus 'finetune') and loss_curve.json; "
                    "`evaluate --model OUT` evaluates it. Without --data the model's bundled training samples "
                    "are used (mini-blip2: VQA and caption samples of the digits' training split).")
    p.add_argument("--model", required=True,
                   help="a pruned run's folder (the --out of `prune`); with --dense also a model name or a dense "
                        "model's folder")
    p.add_argument("--steps", type=int, required=True, help="optimiser steps")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--data", default=None,
                   help="BLIP-2: a VQAv2 questions JSON (or its folder) or image-caption pairs (a COCO captions "
                        "or Karpathy JSON - its train and restval rows - or a CSV/TSV, read as calibration reads "
                        "them); CLIP: image-caption pairs; causal LM: a raw text file (default: the model's "
                        "bundled training samples)")
    p.add_argument("--annotations", default=None,
                   help="VQA: the annotations JSON (default: the one *annotations*.json next to the questions)")
    p.add_argument("--image-root", default=None,
                   help="folder the dataset's image paths are relative to (default: next to the data file)")
    p.add_argument("--stacks", default=None,
                   help="comma-separated stacks to train, e.g. qformer,lm (default: qformer for BLIP-2 with the "
                        "query tokens and the LM projection; vision,text_encoder for CLIP; lm for a causal LM)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per step")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on weight matrices (default 0)")
    p.add_argument("--warmup", type=_warmup, default=0.1,
                   help="linear warm-up: a fraction of the steps (0.1) or a number of steps (20)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, sampling and dropout (default 0)")
    p.add_argument("--dense", action="store_true",
                   help="fine-tune a dense model (no zeros to keep); refused for a pruned run")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass (for GPUs: on a CPU without bfloat16 units it is many times slower)")
    p.add_argument("--out", required=True, help="output directory (must not hold a run unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--device-map", default=None,
                   help="spread a large model over devices with accelerate: auto, balanced, sequential, a JSON object "
                        "{module: device} or a .json file (weights offloaded to the CPU cannot be trained; disk is "
                        "refused)")
    p.add_argument("--max-memory", default=None, help="with --device-map: room per device, e.g. 0=20GiB,cpu=64GiB")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_finetune)
    return p


def _cmd_finetune(a) -> int:
    from .finetune import run_finetune
    from .models.devices import parse_device_map, parse_max_memory

    out = run_finetune(model=a.model, steps=a.steps, out=a.out, lr=a.lr, data=a.data, annotations=a.annotations,
                       image_root=a.image_root, stacks=a.stacks, batch_size=a.batch_size, weight_decay=a.weight_decay,
                       warmup=a.warmup, seed=a.seed, dense=a.dense, device=a.device, autocast=a.bf16,
                       overwrite=a.overwrite, progress=False if a.no_progress else None,
                       device_map=parse_device_map(a.device_map), max_memory=parse_max_memory(a.max_memory))
    r = out["result"]
    print(f"fine-tuned {', '.join(r.config['stacks'])} of {out['adapter'].name} for {len(r.losses)} steps "
          f"({r.wall_s:.1f} s, {r.seconds_per_step:.3f} s/step): loss {r.initial_loss:.4f} -> {r.final_loss:.4f}; "
          f"{r.config['kept_zeros']} pruned weights kept at zero")
    print(f"wrote {a.out}")
    return 0
