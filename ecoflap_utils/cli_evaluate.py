"""The ``evaluate`` subcommand: ``python -m ecoflap_utils evaluate --model NAME_OR_RUN --task TASK --out DIR``.

Thin: it parses flags and calls :func:`ecoflap_utils.evaluate.run_evaluate`. A UserError propagates
(``cli.main`` prints it on one line and exits with code 2).
"""
from __future__ import annotations

import argparse

from .cli_format import DefaultsFormatter
from .evaluate import TASKS, VQA_INFERENCE


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``evaluate`` to an ``argparse`` subparsers object; returns the new parser."""
    p = subparsers.add_parser(
        "evaluate", help="evaluate a dense or pruned model and write results.json",
        formatter_class=DefaultsFormatter,
        description="Evaluate a model (a name, or a pruned run's folder holding pruning_config.json) on one task "
                    "and write DIR/results.json ({model, method, sparsity, task, metrics, resources, config}); "
                    "generation tasks also write predictions.json, zero-shot writes clip_benchmark.json. "
                    "Data layouts: data/BENCHMARKS.md. Without --data the model's bundled held-out set is used. "
                    "Zero-shot on one of CoOp's 11 datasets: --data coop:/data/oxford_pets (its test split, its "
                    "single CoOp template).")
    p.add_argument("--model", required=True,
                   help="model name (tiny-clip, tiny-blip2-t5, smollm2-135m, open_clip:ARCH/PRETRAINED, a Hugging "
                        "Face id or folder) or a pruned run's folder (method and sparsity are read from it)")
    p.add_argument("--task", default=None, choices=TASKS,
                   help="what to evaluate: zeroshot/retrieval (CLIP), vqav2/okvqa/gqa/caption (BLIP-2), "
                        "perplexity (causal LM); default: the model's default task")
    p.add_argument("--data", default=None,
                   help="zeroshot: ImageFolder dir, CSV of path,label, or coop:FOLDER (one of CoOp's 11 datasets in "
                        "the layout of CoOp's DATASETS.md, read from its split files); retrieval: Karpathy JSON; vqav2/okvqa: "
                        "questions JSON or its folder; gqa: questions JSON; caption: COCO/NoCaps captions JSON; "
                        "perplexity: raw text file (default: the model's bundled held-out set)")
    p.add_argument("--annotations", default=None,
                   help="vqav2/okvqa: the annotations JSON (default: the one *annotations*.json next to the questions)")
    p.add_argument("--image-root", default=None,
                   help="folder the dataset's image paths are relative to (default: next to the annotation file)")
    p.add_argument("--split", default="test",
                   help="Karpathy split to read from a Karpathy JSON (test, val, ...); the split of a coop: dataset "
                        "(train, val or test)")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate on this many examples only (first ones; evenly spaced for zeroshot; windows "
                        "for perplexity)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size: images for CLIP tasks (default 64); questions or images per generate call for "
                        "vqav2/okvqa/gqa/caption (default 128 greedy, 32 with beam search, where each is --num-beams rows; 1 generates "
                        "one by one, with the same answers); windows for perplexity (default 1)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    p.add_argument("--classnames", default=None,
                   help="zeroshot: file with one class name per line, in label order (default: folder names or "
                        "CSV labels)")
    p.add_argument("--templates", default=None,
                   help="zeroshot: file with one prompt template per line, '{}' for the class name, or a set by "
                        "name: 'coop' (a coop: dataset's single CoOp template, CoOp's CUSTOM_TEMPLATES) or "
                        "'ensemble' (the 7 templates CLIP's authors picked for ImageNet) (default: coop on coop: "
                        "data, else ensemble)")
    p.add_argument("--prompt", default=None,
                   help="VQA prompt with '{}' for the question (default 'Question: {} Short answer:'); "
                        "caption prompt (default 'a photo of'; '' for none)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation length cap (default: 10 for VQA, 30 for captions)")
    p.add_argument("--num-beams", type=int, default=None,
                   help="beam width for generation (default 5, as LAVIS); 1 is greedy decoding, about 5 times faster")
    p.add_argument("--vqa-inference", default="generate", choices=VQA_INFERENCE,
                   help="vqav2/okvqa/gqa: 'generate' free-form answers (the paper's setting), or 'rank' the answers "
                        "of --answer-list by the model's likelihood and predict the likeliest (LAVIS's BLIP VQA "
                        "inference_method='rank'); the generation flags do not apply to rank")
    p.add_argument("--answer-list", default=None,
                   help="with --vqa-inference rank: file of candidate answers, one per line or a JSON list "
                        "(default: the distinct reference answers of the evaluated questions)")
    p.add_argument("--window", type=int, default=None,
                   help="perplexity: tokens per window (default: min(512, the model's context))")
    p.add_argument("--stride", type=int, default=None,
                   help="perplexity: tokens between window starts; less than --window scores only new tokens "
                        "(default: --window, non-overlapping)")
    p.add_argument("--protocol", default=None,
                   help="paper: the official evaluation settings (docs/FIDELITY.md): zeroshot the dataset's single "
                        "CoOp template; VQA prompt, 5 beams, <= 10 new tokens, transformers' min_length 1; captions "
                        "'a photo of', 5 beams, <= 30 new tokens, min_length 8 (7 new tokens on Flan-T5); perplexity "
                        "2048-token windows. A flag that contradicts it is refused; the record names the protocol")
    p.add_argument("--out", required=True, help="output directory for results.json (must not hold a run unless "
                                                "--overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_cmd_evaluate)
    return p


def _cmd_evaluate(a) -> int:
    from .evaluate import run_evaluate

    record = run_evaluate(
        model=a.model, task=a.task, data=a.data, out=a.out, limit=a.limit, batch_size=a.batch_size, device=a.device,
        dtype=a.dtype, classnames=a.classnames, templates=a.templates, annotations=a.annotations,
        image_root=a.image_root, split=a.split, prompt=a.prompt, max_new_tokens=a.max_new_tokens,
        num_beams=a.num_beams, window=a.window, stride=a.stride, vqa_inference=a.vqa_inference,
        answer_list=a.answer_list, protocol=a.protocol, overwrite=a.overwrite,
        progress=False if a.no_progress else None,
    )
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record["metrics"].items())
    print(f"{record['model']} [{record['method']}, sparsity {record['sparsity']}] {record['task']}: {shown}")
    print(f"wrote {a.out}/results.json")
    return 0
