"""``python -m ecoflap_utils ...``: thin commands over the package. Bad input exits with code 2."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune a model and write it with its report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Prune a model layer by layer (Wanda, SparseGPT or magnitude), optionally at "
                                   "ECoFLaP's per-block sparsities, and write the pruned model, "
                                   "pruning_config.json, sparsity_report.csv and resources.json to --out.")
    p.add_argument("--model", required=True, help="model name (tiny-llama, tiny-blip2-t5, smollm2-135m, "
                   "open_clip:ARCH/PRETRAINED, a Hugging Face id or folder, or a pruned run's folder)")
    p.add_argument("--method", default="wanda", help="layer-wise pruner: wanda, sparsegpt or magnitude")
    p.add_argument("--sparsity", type=float, default=None,
                   help="target fraction of zeros over the pruned layers, in [0, 1); defaults to N/M with --nm")
    p.add_argument("--nm", default=None, help="N:M semi-structured pattern, e.g. 2:4 (N zeros in every M weights)")
    p.add_argument("--comparison", default="row", help="Wanda/magnitude comparison group: row or matrix")
    p.add_argument("--stacks", default=None,
                   help="comma-separated stacks to prune (default: the model's, e.g. vision,lm for BLIP-2)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration samples for the fine stage")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size")
    p.add_argument("--seed", type=int, default=0, help="seed of calibration sampling and noise")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    p.add_argument("--allocation", default="uniform",
                   help="how sparsity is spread over blocks: uniform, ecoflap or owl")
    p.add_argument("--scores", default="zeroth",
                   help="ECoFLaP block scores: zeroth, first, jvp or magnitude (with --allocation ecoflap)")
    p.add_argument("--granularity", default="block", help="score groups: layer, block or module")
    p.add_argument("--perturb", default="group", help="zeroth-order perturbation scope: tensor (paper) or group")
    p.add_argument("--eps", type=float, default=1e-3, help="zeroth-order finite-difference step")
    p.add_argument("--num-noise", type=int, default=1, help="zeroth-order noise samples per batch")
    p.add_argument("--first-stage-samples", type=int, default=32, help="calibration samples for the coarse stage")
    p.add_argument("--first-stage-batch-size", type=int, default=8, help="batch size of the coarse stage")
    p.add_argument("--max-sparsity", type=float, default=None,
                   help="cap on any group's sparsity (default: sparsity + 0.1)")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="OWL: sparsity spread lambda")
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL: outlier threshold M (times the mean score)")
    p.add_argument("--sparsity-dict", default=None,
                   help="JSON or YAML file {parameter name: sparsity} to prune at (overrides --allocation)")
    p.add_argument("--out", required=True, help="output directory (must not hold a run unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_prune)


def _cmd_prune(a) -> int:
    from .pipeline import run_prune

    out = run_prune(
        model=a.model, method=a.method, sparsity=a.sparsity, nm=a.nm, comparison=a.comparison,
        stacks=a.stacks.split(",") if a.stacks else None, calib_samples=a.calib_samples, batch_size=a.batch_size,
        seed=a.seed, device=a.device, dtype=a.dtype, allocation=a.allocation, scores=a.scores,
        granularity=a.granularity, perturb=a.perturb, eps=a.eps, num_noise=a.num_noise,
        first_stage_samples=a.first_stage_samples, first_stage_batch_size=a.first_stage_batch_size,
        max_sparsity=a.max_sparsity, owl_lambda=a.owl_lambda, owl_m=a.owl_m, sparsity_dict=a.sparsity_dict,
        out=a.out, overwrite=a.overwrite, progress=not a.no_progress,
    )
    print(out["summary"])
    print(f"wrote {a.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ecoflap_utils",
                                     description="ECoFLaP: coarse-to-fine layer-wise pruning, step by step.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    from .cli_evaluate import add_evaluate_parser
    from .cli_runs import add_runs_parser

    add_evaluate_parser(sub)
    add_runs_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        print("interrupted: nothing was written to the output directory", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
