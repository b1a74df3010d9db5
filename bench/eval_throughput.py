"""Evaluation throughput: items per second of BLIP-2 VQA generation on mini-blip2 and of zero-shot classification
on mini-clip, before and after batched generation, in one process on one machine.

    nice .venv/bin/python bench/eval_throughput.py            # about 5 minutes on a busy 2-core machine
    nice .venv/bin/python bench/eval_throughput.py --items 200 --one-by-one-items 200 --threads 2

Rows (mini-blip2, bundled held-out VQA questions, digit and parity questions interleaved; LAVIS's VQA settings:
prompt "Question: {} Short answer:", at most 10 new tokens, at least 1, length penalty -1 for beams):

* one by one: ``generate_answers(batch_size=1)``, one question per ``Blip2ForConditionalGeneration.generate`` call
  (the one-by-one path, kept reachable);
* previous code: the loop ``generate_answers`` ran before this change (:func:`previous_generate`, reproduced here):
  16 questions per ``generate`` in input order, left padding, beam search through ``generate`` alone (the prompt
  run once per beam);
* batched: ``generate_answers`` at its default batch (``evaluate.generate_batch``: ``GREEDY_BATCH`` questions
  greedy, ``GENERATE_BATCH`` with beams; sorted by prompt length; beam search with the prompt's cache shared by
  the beams).

A second table times greedy decoding at several batch sizes on ``--batch-items`` questions (500: a headline
evaluation of the default grid), on the dense mini-blip2 and on the same model pruned by Wanda at 0.5 (64
calibration samples, seed 0), whose answers run to the 10-token limit: the case that sets the cost of notebook
07's evaluations. "same answers" there compares with the first batch size's answers.

Each is timed on the same questions, greedy (``num_beams=1``) and beam 5; "same answers" says whether its answers
equal the one-by-one answers string for string. mini-clip: ``zeroshot_classification`` (bundled held-out digits,
the class prompts encoded once per run and timed with it) one image per forward vs the default 64.
Wall time and process CPU time are both shown: on a shared machine wall time moves with the load, CPU time
much less. Results: a Markdown table on stdout and in ``bench/results/eval_throughput.md`` with the command, the
date, the machine and its load (``uptime``) before and after.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ecoflap_utils import evaluate as E  # noqa: E402
from ecoflap_utils.models import load_model  # noqa: E402
from ecoflap_utils.models.images import image_batch  # noqa: E402

OUT = ROOT / "bench" / "results" / "eval_throughput.md"
VQA_SETTINGS = dict(max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)


def previous_generate(adapter, images, prompts, *, num_beams, batch_size=16, max_new_tokens=10, min_new_tokens=1,
                      length_penalty=-1.0) -> list[str]:
    """``evaluate.generate_answers`` as it was before batched generation was reworked: ``batch_size`` questions
    per ``model.generate`` in input order, left padding for a decoder-only LM, beams expanded by ``generate``."""
    inp = E._Blip2Inputs.of(adapter)
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams, pad_token_id=inp.pad,
               min_new_tokens=min(min_new_tokens, max_new_tokens), eos_token_id=inp.text_cfg.eos_token_id)
    if num_beams > 1:
        gen["length_penalty"] = length_penalty
    answers = []
    for lo in range(0, len(images), batch_size):
        seqs = [inp.prefix(p) for p in prompts[lo : lo + batch_size]]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), inp.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            span = slice(width - len(s), width) if inp.decoder_only else slice(0, len(s))
            ids[i, span], mask[i, span] = torch.tensor(s), 1
        pixel = image_batch(adapter, images[lo : lo + batch_size])
        with torch.inference_mode():
            out = adapter.model.generate(pixel_values=pixel, input_ids=ids.to(inp.device),
                                         attention_mask=mask.to(inp.device), **gen)
        if inp.decoder_only:
            out = out[:, width:]
        answers += [inp.tokenizer.decode(r.tolist(), skip_special_tokens=True).strip() for r in out]
    return answers


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def vqa_rows(adapter, items: int, one_by_one_items: int):
    rows = adapter.bundled_eval_data("vqav2")[:items]
    images, prompts = [r["image"] for r in rows], [E.VQA_PROMPT.format(r["question"]) for r in rows]
    refs = [r["answers"] for r in rows]
    out = []
    for beams in (1, 5):
        n1 = min(one_by_one_items, items)
        configs = [
            ("one by one", 1, n1, lambda n, b=beams: E.generate_answers(
                adapter, images[:n], prompts[:n], num_beams=b, batch_size=1, progress=False, **VQA_SETTINGS)),
            ("previous code", 16, items, lambda n, b=beams: previous_generate(
                adapter, images[:n], prompts[:n], num_beams=b, **VQA_SETTINGS)),
            ("batched (default)", E.generate_batch(beams), items, lambda n, b=beams: E.generate_answers(
                adapter, images[:n], prompts[:n], num_beams=b, progress=False, **VQA_SETTINGS)),
        ]
        base = None
        for label, batch, n, fn in configs:
            preds, wall, cpu = timed(lambda: fn(n))
            if base is None:
                base = preds
            k = min(len(base), len(preds))
            out.append({"model": "mini-blip2", "task": "VQA (bundled)", "decoding": "greedy" if beams == 1
                        else f"beam {beams}", "path": label, "batch": batch, "items": n, "wall_s": wall,
                        "cpu_s": cpu, "metric": f"{E.score_vqa(preds, refs[:n]):.1f}",
                        "same": "reference" if preds is base else ("yes" if preds[:k] == base[:k] else "NO")})
            print(f"  {out[-1]['decoding']:7s} {label:18s} {n / wall:6.2f} items/s", flush=True)
    return out


def batch_rows(adapter, items: int, batches) -> list[dict]:
    """Greedy VQA at each batch size in ``batches``, dense and then pruned by Wanda at 0.5 (in place)."""
    from ecoflap_utils.prune import prune

    rows = adapter.bundled_eval_data("vqav2")[:items]
    images, prompts = [r["image"] for r in rows], [E.VQA_PROMPT.format(r["question"]) for r in rows]
    refs = [r["answers"] for r in rows]
    out = []
    for model in ("dense", "Wanda 0.5"):
        if model != "dense":
            prune(adapter, 0.5, method="wanda", calib_samples=64, seed=0, progress=False)
        base = None
        for batch in batches:
            preds, wall, cpu = timed(lambda b=batch: E.generate_answers(
                adapter, images, prompts, num_beams=1, batch_size=b, progress=False, **VQA_SETTINGS))
            base = preds if base is None else base
            out.append({"model": model, "batch": batch, "items": len(preds), "wall_s": wall, "cpu_s": cpu,
                        "default": batch == E.generate_batch(1), "metric": f"{E.score_vqa(preds, refs):.1f}",
                        "same": "reference" if preds is base else ("yes" if preds == base else "NO")})
            print(f"  {model:9s} batch {batch:4d} {len(preds) / wall:6.2f} items/s", flush=True)
    return out


def batch_table(rows) -> str:
    head = ["mini-blip2", "questions per call", "items", "wall s", "items/s (wall)", "items/s (CPU)",
            "x first batch (wall)", "metric", "same answers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    base = {}
    for r in rows:
        rate = r["items"] / r["wall_s"]
        base.setdefault(r["model"], rate)
        lines.append("| " + " | ".join([
            r["model"], f"{r['batch']}{' (default)' if r['default'] else ''}", str(r["items"]), f"{r['wall_s']:.1f}",
            f"{rate:.2f}", f"{r['items'] / r['cpu_s']:.2f}", f"{rate / base[r['model']]:.2f}", r["metric"],
            r["same"]]) + " |")
    return "\n".join(lines)


def clip_rows(items: int):
    adapter = load_model("mini-clip")
    data = adapter.bundled_eval_data("zeroshot")
    out = []
    base = None
    for label, batch in (("one by one", 1), ("batched (default)", 64)):
        res, wall, cpu = timed(lambda b=batch: E.evaluate(adapter, "zeroshot", data, limit=items, batch_size=b,
                                                          progress=False))
        base = base if base is not None else res["acc1"]
        out.append({"model": "mini-clip", "task": "zero-shot (bundled)", "decoding": "-", "path": label,
                    "batch": batch, "items": res["n"], "wall_s": wall, "cpu_s": cpu, "metric": f"{res['acc1']:.1f}",
                    "same": "reference" if label == "one by one" else ("yes" if res["acc1"] == base else "NO")})
        print(f"  zero-shot {label:18s} {res['n'] / wall:7.1f} items/s", flush=True)
    return out


def table(rows) -> str:
    head = ["model", "task", "decoding", "path", "batch", "items", "wall s", "items/s (wall)", "items/s (CPU)",
            "x one by one (wall)", "metric", "same answers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    base = {}
    for r in rows:
        key = (r["model"], r["decoding"])
        rate = r["items"] / r["wall_s"]
        base.setdefault(key, rate)
        lines.append("| " + " | ".join([
            r["model"], r["task"], r["decoding"], r["path"], str(r["batch"]), str(r["items"]), f"{r['wall_s']:.1f}",
            f"{rate:.2f}", f"{r['items'] / r['cpu_s']:.2f}", f"{rate / base[key]:.2f}", r["metric"], r["same"]]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=100, help="mini-blip2 questions per configuration")
    ap.add_argument("--one-by-one-items", type=int, default=50,
                    help="questions for the one-by-one rows, the first of the --items (fewer keeps the bench short)")
    ap.add_argument("--batch-items", type=int, default=500,
                    help="questions for the greedy batch-size table (dense and Wanda 0.5); 0 skips that table")
    ap.add_argument("--batches", default="32,128,256", help="greedy batch sizes for that table, comma-separated")
    ap.add_argument("--clip-items", type=int, default=500, help="mini-clip held-out images per configuration")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine)")
    ap.add_argument("--out", default=str(OUT), help="where the Markdown result goes")
    a = ap.parse_args(argv)
    if min(a.items, a.clip_items, a.threads, a.one_by_one_items) < 1 or a.batch_items < 0:
        print("error: --items, --one-by-one-items, --clip-items and --threads must be positive (--batch-items may "
              "be 0)", file=sys.stderr)
        return 2
    try:
        batches = [int(x) for x in a.batches.split(",") if x.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        print(f"error: --batches {a.batches!r} must be positive integers separated by commas, e.g. 32,128",
              file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    command = "nice .venv/bin/python bench/eval_throughput.py" + "".join(
        " " + shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    load_before, started = uptime(), datetime.now()
    t0 = time.perf_counter()
    print(f"loading mini-blip2 ({load_before})", flush=True)
    blip = load_model("mini-blip2")
    rows = vqa_rows(blip, a.items, a.one_by_one_items)
    brows = batch_rows(blip, a.batch_items, batches) if a.batch_items else []
    del blip
    rows += clip_rows(a.clip_items)
    total = time.perf_counter() - t0
    load_after = uptime()
    import transformers

    text = "\n".join([
        "# Evaluation throughput: batched generation on mini-blip2, zero-shot on mini-clip",
        "",
        f"`{command}` on {started:%Y-%m-%d %H:%M}, {total:.0f} s in all (model loading included).",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__} with "
        f"{torch.get_num_threads()} intra-op thread(s), transformers {transformers.__version__}, process niceness "
        f"{os.nice(0)}. Shared with other jobs; `uptime` before: `{load_before}`; after: `{load_after}`.",
        "",
        table(rows),
        "",
        "* VQA: the bundled held-out questions (digit and parity questions interleaved, so prompts of two lengths), "
        "LAVIS's settings (at most 10 new tokens, at least 1; length penalty -1 with beams); metric = VQA accuracy "
        "on the items of the row. Zero-shot: metric = top-1 accuracy.",
        "* one by one = `generate_answers(batch_size=1)`; previous code = the batched loop before this change "
        "(16 questions per `generate`, input order, beams expanded before the prompt's forward); batched = "
        f"`generate_answers` at its default ({E.GREEDY_BATCH} questions per call greedy, {E.GENERATE_BATCH} with beams, "
        "sorted by prompt length, the "
        "prompt's key/value cache computed once and shared by the beams). same answers: equal, string for string, "
        "to the one-by-one answers on the items both evaluated.",
        "* x one by one: wall-time speed-up over the one-by-one row of the same model and decoding. Wall times move "
        "with the machine's load; CPU time (this process) much less.",
        "",
    ] + ([
        f"## Greedy decoding: questions per call ({brows[0]['items']} questions)",
        "",
        batch_table(brows),
        "",
        "* The same questions at each batch size, dense and then pruned by Wanda at 0.5 (64 calibration samples, "
        "seed 0; its answers run to the 10-token limit). same answers: equal, string for string, to the first "
        "batch size's answers. A greedy step reads every weight once whatever the batch, so larger batches pay "
        "until the arithmetic dominates.",
        "",
    ] if brows else []))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print("\n" + table(rows))
    print(f"\nwrote {a.out} ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
