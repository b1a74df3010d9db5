"""``python -m ecoflap_utils.zoo build mini-clip|mini-blip2 [--steps N] [--seed S] [--out DIR]``.

Trains a bundled model on CPU (see ``ecoflap_utils.zoo.train``) and writes its trained parts with
safetensors to ``--out`` (default ``data/<name>``, the shipped copy). Prints the dense quality reached.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError

DEFAULTS = {
    # name: (steps, batch size, learning rate)
    "mini-clip": (1000, 128, 1e-3),
    "mini-blip2": (1000, 16, 1e-3),
}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(prog="python -m ecoflap_utils.zoo", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train a bundled model and write its weights")
    b.add_argument("name", choices=sorted(DEFAULTS))
    b.add_argument("--steps", type=int, default=None, help="optimisation steps (default: the shipped recipe)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--batch-size", type=int, default=None)
    b.add_argument("--lr", type=float, default=None)
    b.add_argument("--threads", type=int, default=2, help="torch CPU threads (the recipe is timed on 2)")
    b.add_argument("--out", default=None, help="output folder (default data/NAME)")
    b.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N held-out images only")
    b.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bfloat16 autocast")
    b.add_argument("--clip-weights", default=None,
                   help="mini-blip2 only: mini-clip weights whose ViT becomes the frozen image encoder")
    args = ap.parse_args(argv)
    try:
        from . import train

        steps, bs, lr = DEFAULTS[args.name]
        out = Path(args.out) if args.out else Path(__file__).resolve().parents[2] / "data" / args.name
        pick = lambda given, default: default if given is None else given  # noqa: E731
        common = dict(steps=pick(args.steps, steps), seed=args.seed, out=out, batch_size=pick(args.batch_size, bs),
                      lr=pick(args.lr, lr), threads=args.threads, bf16=not args.no_bf16, eval_limit=args.eval_limit)
        if args.name == "mini-clip":
            if args.clip_weights:
                raise UserError("--clip-weights applies to mini-blip2 only")
            result = train.train_miniclip(**common)
        else:
            result = train.train_miniblip2(clip_weights=args.clip_weights, **common)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
