"""``python -m ecoflap_utils ...``: thin commands over the package. Bad input exits with code 2."""
from __future__ import annotations

import argparse
import sys

from .cli_format import DefaultsFormatter
from .errors import UserError


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune a model and write it with its report",
                       formatter_class=DefaultsFormatter,
                       description="Prune a model layer by layer (Wanda, SparseGPT or magnitude), optionally at "
                                   "ECoFLaP's per-block sparsities, and write the pruned model, "
                                   "pruning_config.json, sparsity_report.csv and resources.json to --out.")
    p.add_argument("--model", required=True, help="model name (tiny-llama, tiny-blip2-t5, smollm2-135m, "
                   "open_clip:ARCH/PRETRAINED, a Hugging Face id or folder, or a pruned run's folder)")
    p.add_argument("--method", default="wanda", help="layer-wise pruner: wanda, sparsegpt or magnitude")
    p.add_argument("--sparsity", type=float, default=None,
                   help="target fraction of zeros over the pruned layers, in [0, 1); defaults to N/M with --nm")
    p.add_argument("--nm", default=None, help="N:M semi-structured pattern, e.g. 2:4 (N zeros in every M weights)")
    p.add_argument("--comparison", default=None,
                   help="Wanda/magnitude comparison group: row, matrix, global (magnitude only: one |W| threshold over "
                        "all pruned layers) or per stack, e.g. vision=matrix,text_encoder=row,text_decoder=row "
                        "(default: row) [P]")
    p.add_argument("--stacks", default=None,
                   help="comma-separated stacks to prune (default: the model's, e.g. vision,lm for BLIP-2)")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration samples for the fine stage "
                   "(default: 128) [P]")
    p.add_argument("--batch-size", type=int, default=None, help="fine-stage calibration batch size (default: 8) [P]")
    p.add_argument("--seed", type=int, default=0, help="seed of calibration sampling and noise")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    p.add_argument("--allocation", default="uniform",
                   help="how sparsity is spread over blocks: uniform, ecoflap or owl")
    p.add_argument("--scores", default="zeroth",
                   help="ECoFLaP block scores: zeroth, first, jvp or magnitude (with --allocation ecoflap)")
    p.add_argument("--granularity", default=None, help="score groups: layer, block or module (default: block) [P]")
    p.add_argument("--perturb", default=None,
                   help="zeroth-order perturbation: tensor (the paper's: one direction per weight tensor, summed over "
                        "the block; tracks sum_t ||g_t||) or group (one joint direction per block: faster, tracks "
                        "||g_block||, a different estimator) (default: tensor) [P]")
    p.add_argument("--difference", default=None,
                   help="zeroth-order finite difference: forward ((L(W+eps z)-L(W))/eps, L(W) once per batch: half "
                        "the forwards, same ranks) or central (the paper's two-point estimate) (default: forward) [P]")
    p.add_argument("--eps", type=float, default=None, help="zeroth-order finite-difference step (default: 1e-3) [P]")
    p.add_argument("--num-noise", default=None,
                   help="zeroth-order noise directions per batch, or auto: add directions until the split-half "
                        "stability reaches --stability or --max-noise directions per batch are spent (default: 1) [P]")
    p.add_argument("--stability", type=float, default=0.9, help="target split-half rank stability for --num-noise auto")
    p.add_argument("--max-noise", type=int, default=16, help="budget of --num-noise auto: directions per batch")
    p.add_argument("--variant", default=None,
                   help="first-order score: grad (sum |g|), weight_grad (sum |W*g|; the paper's BLIP-2 score at "
                        "--first-stage-batch-size 1) or grad_norm (default: grad) [P]")
    p.add_argument("--memory", default="plain",
                   help="first-order memory mode: plain (loss.backward()) or low (block checkpointing, each "
                        "gradient reduced and freed as it arrives: near a forward pass's memory, 1.02-1.20x at BLIP-2 XL scale "
                        "(1.04x with MALLOC_MMAP_THRESHOLD_=1048576), same scores)")
    p.add_argument("--first-stage-samples", type=int, default=None,
                   help="calibration samples for the coarse stage (default: 32) [P]")
    p.add_argument("--first-stage-batch-size", type=int, default=None,
                   help="batch size of the coarse stage (default: 8) [P]")
    p.add_argument("--max-sparsity", type=float, default=None,
                   help="cap on any group's sparsity (default: sparsity + 0.1) [P]")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="OWL: sparsity spread lambda")
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL: outlier threshold M (times the mean score)")
    p.add_argument("--sparsity-dict", default=None,
                   help="JSON or YAML file {parameter name: sparsity} to prune at (overrides --allocation)")
    p.add_argument("--protocol", default=None,
                   help="paper: the official ECoFLaP code's settings for the model's family (BLIP-2, CLIP, causal "
                        "LM; see docs/FIDELITY.md) for every option marked [P], recorded in pruning_config.json. "
                        "A [P] flag given explicitly must agree with the preset: one that contradicts it is refused "
                        "(drop the flag or drop --protocol); without --protocol, [P] options take the defaults shown")
    p.add_argument("--calibration", default=None, metavar="PATH",
                   help="calibration data on disk for both stages (CC3M/COCO pairs, webdataset shards "
                        "'cc3m/{00000..00331}.tar', an ImageFolder train split, the train split of one of CoOp's "
                        "datasets 'coop:/data/oxford_pets', C4 .json.gz, a .txt): the fine stage "
                        "draws --calib-samples items, the coarse stage --first-stage-samples, with --seed "
                        "(default: the model's bundled or generated samples). With --protocol paper, CLIP images get "
                        "CoOp's training augmentation (random resized crop + flip, drawn once per image from --seed)")
    p.add_argument("--calibration-format", default=None,
                   help="format of --calibration: coco, karpathy, csv, webdataset, text, jsonl, imagefolder or coop "
                        "(default: detected from the path)")
    p.add_argument("--image-root", default=None, help="folder the image paths of --calibration are relative to")
    p.add_argument("--calibration-template", default=None,
                   help="CLIP with an ImageFolder or a CoOp dataset: the class prompt (default: a CoOp dataset's "
                        "own CoOp template, e.g. 'a photo of a {}, a type of pet.'; 'a photo of a {}.' otherwise)")
    p.add_argument("--clip-objective", default=None,
                   help="CLIP with an ImageFolder: contrastive (each image with its class prompt, the official loss) "
                        "or classes (each image against all class prompts) (default: contrastive) [P]")
    p.add_argument("--seq-len", type=int, default=None,
                   help="language models: tokens per calibration window (default: the model's, 128 for the bundled "
                        "ones; 2048 with --protocol paper) [P]")
    p.add_argument("--lavis-names", action="store_true",
                   help="BLIP-2 only: also write scores.lavis.json and sparsity_dict.lavis.json keyed by the official "
                        "LAVIS names")
    p.add_argument("--out", required=True, help="output directory (must not hold a run unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--save-format", default="dense",
                   help="dense (plain safetensors) or compressed: the pruned layers of a Hugging Face model stored "
                        "sparse in compressed-tensors' sparse-bitmask layout (sparse-24-bitmask for 2:4), about "
                        "0.63x the disk at 50%% sparsity; read back with load_pruned (transformers >= 5 and vLLM no "
                        "longer read sparse checkpoints: io.decompress_checkpoint writes a dense copy). Not for CLIP")
    p.add_argument("--device-map", default=None,
                   help="spread a large model over devices with accelerate: auto, balanced, sequential, a JSON object "
                        "{module: device} or a .json file; each block's statistics and masks stay on its device. "
                        "Disk offload is refused")
    p.add_argument("--max-memory", default=None, help="with --device-map: room per device, e.g. 0=20GiB,cpu=64GiB")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_prune)


def _cmd_prune(a) -> int:
    from .models.devices import parse_device_map, parse_max_memory
    from .pipeline import run_prune

    out = run_prune(
        model=a.model, method=a.method, sparsity=a.sparsity, nm=a.nm, comparison=a.comparison,
        stacks=a.stacks.split(",") if a.stacks else None, calib_samples=a.calib_samples, batch_size=a.batch_size,
        protocol=a.protocol, calibration=a.calibration, calibration_format=a.calibration_format,
        image_root=a.image_root, calibration_template=a.calibration_template, clip_objective=a.clip_objective,
        seq_len=a.seq_len, lavis_names=a.lavis_names,
        seed=a.seed, device=a.device, dtype=a.dtype, allocation=a.allocation, scores=a.scores,
        granularity=a.granularity, perturb=a.perturb, difference=a.difference, eps=a.eps, num_noise=a.num_noise,
        stability=a.stability, max_noise=a.max_noise, variant=a.variant, memory=a.memory,
        first_stage_samples=a.first_stage_samples, first_stage_batch_size=a.first_stage_batch_size,
        max_sparsity=a.max_sparsity, owl_lambda=a.owl_lambda, owl_m=a.owl_m, sparsity_dict=a.sparsity_dict,
        out=a.out, overwrite=a.overwrite, progress=not a.no_progress, save_format=a.save_format,
        device_map=parse_device_map(a.device_map), max_memory=parse_max_memory(a.max_memory),
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
    from .cli_finetune import add_finetune_parser; add_finetune_parser(sub)  # noqa: E702
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
        print(f"interrupted: {getattr(args, 'interrupted', 'nothing was written to the output directory')}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
