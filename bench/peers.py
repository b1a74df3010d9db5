"""The fine stage side by side with llm-compressor (the vLLM project's Wanda and SparseGPT) on SmolLM2-135M.

    .venv/bin/python bench/peers.py                       # builds llm-compressor's venv on first use (~3 min, 6 GB)
    .venv/bin/python bench/peers.py --peer-python /path/to/venv/bin/python --threads 2

Both sides get the same dense model (``save_pretrained`` of the bundled ``smollm2-135m``) and the same calibration
windows (``--samples`` windows of 128 tokens of the bundled calibration text, seed 0, written to one file), batches
of ``--batch``, the same attention kernel (``--attn``), and prune every linear layer of the 30 decoder blocks (not
``lm_head``). Each side runs in its own fresh process at ``--threads`` torch threads; for each method ours runs,
then the peer, back to back. Methods: Wanda 0.5, SparseGPT 0.5 (block 128, damping 0.01) and Wanda 2:4.

Per method and side: the fine stage's wall time (ours: ``prune.prune``; the peer: ``llmcompressor.oneshot``, with
its subgraph tracing), the process's peak RSS (model load included on both sides), the calibration passes spent
(``peer_side.PassCounter``, the same on both sides: the decoder blocks' linear-layer work over one pass of the calibration set, and the
calibration tokens ``lm_head`` saw, over their number), the
actual sparsity, the per-layer agreement of the zero patterns with the peer's, and the perplexity of both pruned
models on the bundled held-out text, both scored by our evaluator (``evaluate.perplexity_stats``, windows of 512).

llm-compressor pins torch <= 2.14.0 and transformers <= 5.17, so it lives in its own venv, built from
``bench/peers/requirements.txt`` into ``bench/peers/.venv`` unless ``--peer-python`` names one. It is never a
dependency of ecoflap_utils or its tests. Results: ``bench/results/peers.md``, with the command, the date, the
machine and its load before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ecoflap_utils.errors import UserError  # noqa: E402

PEER_DIR = ROOT / "bench" / "peers"
PEER_VENV = PEER_DIR / ".venv"
OUT = ROOT / "bench" / "results" / "peers.md"
METHODS = {"wanda": ("wanda", 0.5, None), "sparsegpt": ("sparsegpt", 0.5, None), "wanda-2:4": ("wanda", 0.5, "2:4")}
PEER_HINT = ("build one yourself (python -m venv DIR && DIR/bin/pip install -r bench/peers/requirements.txt) "
             "and pass --peer-python DIR/bin/python")


# --------------------------------------------------------------------------- the peer's venv
def peer_python(given: str | None, venv: Path = PEER_VENV) -> str:
    """The Python of llm-compressor's venv: ``given`` (checked), or ``venv``'s (built when missing; a build that
    fails is removed, so the next call starts again)."""
    if given is None:
        py = venv / "bin" / "python"
        if not py.exists():
            print(f"building llm-compressor's venv in {venv} (once; about 3 minutes and 6 GB)", file=sys.stderr)
            for step in ([sys.executable, "-m", "venv", str(venv)],
                         [str(py), "-m", "pip", "install", "-q", "-r", str(PEER_DIR / "requirements.txt")]):
                proc = subprocess.run(step, capture_output=True, text=True)
                if proc.returncode != 0:
                    shutil.rmtree(venv, ignore_errors=True)
                    why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                    raise UserError(f"could not build llm-compressor's venv in {venv} ({why}): {PEER_HINT}")
        given = str(py)
    try:
        probe = subprocess.run([given, "-c", "import llmcompressor"], capture_output=True, text=True)
    except OSError as e:
        raise UserError(f"--peer-python {given} cannot be run ({e.strerror}): {PEER_HINT}") from None
    if probe.returncode != 0:
        raise UserError(f"{given} cannot import llmcompressor: {PEER_HINT}")
    return given


# --------------------------------------------------------------------------- inputs both sides share
def prepare(work: Path, samples: int) -> tuple[Path, Path]:
    """The dense model folder and the calibration windows file (made once per work folder)."""
    import torch

    from ecoflap_utils.models import load_model

    dense, calib = work / "dense", work / f"calib-{samples}.pt"
    if not (dense / "config.json").exists() or not calib.exists():
        adapter = load_model("smollm2-135m")
        if not (dense / "config.json").exists():
            adapter.model.save_pretrained(dense)
            adapter.tokenizer.save_pretrained(dense)
        tmp = calib.with_suffix(".part")
        torch.save(torch.tensor(adapter.calibration_samples(samples, 0), dtype=torch.long), tmp)
        os.replace(tmp, calib)
    return dense, calib



def _peer_side():
    """``bench/peers/peer_side.py`` as a module (it imports only the standard library at the top): its
    ``PassCounter`` and ``peak_rss_mb`` measure our side exactly as they measure the peer's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("peer_side", PEER_DIR / "peer_side.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- our side (a child process)
def ours(spec: dict) -> dict:
    """Our fine stage in this process: ``prune`` on the dense folder with the given windows."""
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(spec["threads"])
    from ecoflap_utils.models import load_model
    from ecoflap_utils.prune import prune

    adapter = load_model("smollm2-135m", weights=spec["model"], attn_implementation=spec["attn"])
    windows = torch.load(spec["calib"]).tolist()
    side = _peer_side()
    counter = side.PassCounter(adapter.model)
    same_inputs = SameInputs(adapter, spec) if spec.get("peer_wanda") else None
    t0 = time.perf_counter()
    prune(adapter, spec["sparsity"], method=spec["method"], nm=spec["nm"], calibration=windows,
          batch_size=spec["batch_size"], threads=spec["threads"], return_masks=False, progress=False,
          on_scores=same_inputs.compare if same_inputs else None)
    seconds = time.perf_counter() - t0
    passes = counter.passes(len(windows) * len(windows[0]))
    names = adapter.layer_names()
    save_file({n: adapter.model.get_parameter(n).detach().contiguous() for n in names}, spec["out"])
    extra = {"same_inputs": same_inputs.summary()} if same_inputs else {}
    return {**extra, **passes, "seconds": seconds, "peak_rss_mb": side.peak_rss_mb(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


class SameInputs:
    """llm-compressor's own Wanda functions (``wanda_sparsify.accumulate_row_scalars`` / ``sparsify_weight``, loaded
    from the peer's venv by path: they need only torch) fed the very inputs our fine stage gives each layer, and
    their masks compared with ours layer by layer. This separates the method from the rounding that makes the
    two pipelines' pruned outputs, and so their deeper layers' inputs, drift apart. Its hooks add to the measured
    time; ``--no-same-inputs`` leaves them out."""

    def __init__(self, adapter, spec: dict):
        import importlib
        import importlib.util

        from ecoflap_utils.prune import parse_nm, select_prune_mask

        load = importlib.util.spec_from_file_location("peer_wanda_sparsify", spec["peer_wanda"])
        self.peer = importlib.util.module_from_spec(load)
        load.loader.exec_module(self.peer)
        self.select, self.nm, self.sparsity = select_prune_mask, parse_nm(spec["nm"]), spec["sparsity"]
        self.model, self.scalars, self.samples, self.done, self.agree = adapter.model, {}, {}, set(), {}
        self.handles, self.active = [], False
        # count only what the statistics passes see (not the capture forward, nor the propagation)
        from contextlib import contextmanager

        P = importlib.import_module("ecoflap_utils.prune")  # the module (the package exports the function)

        plain = P.input_statistics

        @contextmanager
        def watched(*args, **kwargs):
            with plain(*args, **kwargs) as stats:
                self.active = True
                try:
                    yield stats
                finally:
                    self.active = False

        P.input_statistics = watched
        self.restore = lambda: setattr(P, "input_statistics", plain)
        for name in adapter.layer_names():
            module = adapter.model.get_submodule(name.rsplit(".", 1)[0])
            self.handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self.add(name, m, a[0])))

    def add(self, name, module, x):
        if not self.active or name in self.done:
            return
        if name not in self.scalars:
            self.scalars[name], self.samples[name] = self.peer.make_empty_row_scalars(module), 0
        self.scalars[name], self.samples[name] = self.peer.accumulate_row_scalars(
            x, module, self.scalars[name], self.samples[name])

    def compare(self, name, score):
        import torch

        module = self.model.get_submodule(name.rsplit(".", 1)[0])
        n, m = self.nm or (0, 0)
        with torch.no_grad():
            theirs = self.peer.sparsify_weight(module, {module: self.scalars.pop(name)}, self.sparsity, n, m) == 0
        ours = self.select(score, self.sparsity, nm=self.nm) | (module.weight == 0)
        self.agree[name] = float((ours == theirs).float().mean())
        self.done.add(name)

    def summary(self) -> dict:
        self.restore()
        for h in self.handles:
            h.remove()
        worst = min(self.agree.items(), key=lambda kv: kv[1])
        return {"layers": len(self.agree), "identical_layers": sum(v == 1.0 for v in self.agree.values()),
                "worst": list(worst)}


def run_side(python: str, script: Path, spec: dict, timeout: float) -> dict:
    """Run one side in a fresh process; its last stdout line, parsed (or ``{"error": ...}``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    args = [python, str(script)] + (["--child"] if script == Path(__file__).resolve() else []) + [json.dumps(spec)]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}",
                "stderr": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- comparison
def zero_patterns(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v == 0 for k, v in load_file(str(path)).items()}


def agreement(ours_path: Path, peer_path: Path) -> dict:
    """Per-layer share of positions where both zero patterns agree, the worst layers, and both actual sparsities."""
    a, b = zero_patterns(ours_path), zero_patterns(peer_path)
    if a.keys() != b.keys():
        raise RuntimeError(f"the two sides pruned different layers: {sorted(a.keys() ^ b.keys())[:3]}")
    per = {k: float((a[k] == b[k]).float().mean()) for k in a}
    numel = {k: a[k].numel() for k in a}
    total = sum(numel.values())
    worst = sorted(per.items(), key=lambda kv: kv[1])[:3]
    return {"layers": len(per), "identical_layers": sum(v == 1.0 for v in per.values()), "min_layer": worst[0][1],
            "all": sum(per[k] * numel[k] for k in per) / total, "worst": worst,
            "sparsity_ours": sum(float(a[k].sum()) for k in a) / total,
            "sparsity_peer": sum(float(b[k].sum()) for k in b) / total}


def perplexities(dense: Path, files: dict[str, Path], windows: int) -> dict[str, dict]:
    """Our evaluator's perplexity (and bootstrap interval over windows) of the dense model and each pruned file."""
    import torch
    from safetensors.torch import load_file

    from ecoflap_utils.data.text import eval_text
    from ecoflap_utils.evaluate import perplexity_stats
    from ecoflap_utils.models import load_model

    adapter = load_model("smollm2-135m", weights=str(dense))
    original = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    text, out = eval_text(), {}
    for key, path in {"dense": None, **files}.items():
        with torch.no_grad():
            adapter.model.load_state_dict(original)
            if path is not None:
                for name, w in load_file(str(path)).items():
                    adapter.model.get_parameter(name).copy_(w)
        st = perplexity_stats(adapter, text, window=512, limit=windows, progress=False)
        out[key] = {"ppl": st["perplexity"], "ci": st["intervals"].get("perplexity"), "windows": st["windows"]}
    return out


# --------------------------------------------------------------------------- report
def load_note() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def table(results: dict, ppl: dict, meta: dict) -> str:
    lines = [
        "# Fine stage side by side with llm-compressor (SmolLM2-135M)", "",
        f"Command: `{meta['command']}`", "",
        f"Date: {meta['date']}. Machine: {meta['machine']}. Before: {meta['load_before']}; after: "
        f"{meta['load_after']}.", "",
        f"Ours: torch {meta['ours_torch']}. Peer: llm-compressor {meta['peer_version']}, torch {meta['peer_torch']}. "
        f"{meta['samples']} windows of 128 tokens, batch {meta['batch']}, {meta['threads']} threads on each side, "
        f"`{meta['attn']}` attention. Each side in its own process; ours then the peer's, per method.", "",
        f"Perplexity: our evaluator on the bundled held-out text, {ppl['dense']['windows']} windows of 512 tokens; "
        f"dense {ppl['dense']['ppl']:.2f}.", "",
        "| method | side | fine stage s | peak RSS MB | block passes (linear work) | lm_head passes | actual sparsity | "
        "perplexity (95 % interval) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    agree_lines = ["", "Masks: the zero patterns of the two pruned models, layer by layer (each pipeline fed its own pruned "
                   "outputs forward). Last column: llm-compressor's own Wanda functions fed the inputs our fine stage "
                   "gave each layer, against our mask (the method alone, without the two pipelines' rounding).", "",
                   "| method | layers with identical masks | positions agreeing (all) | worst layer | worst layers | "
                   "same inputs: identical layers |", "|---|---|---:|---:|---|---|"]
    for method, r in results.items():
        for side in ("ours", "peer"):
            s = r[side]
            if "error" in s:
                lines.append(f"| {method} | {side} | failed: {s['error']} | | | | | |")
                continue
            p = ppl.get(f"{method}/{side}", {})
            ci = p.get("ci")
            ci_text = f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else ""
            sp = r["agree"][f"sparsity_{side}"] if "agree" in r else float("nan")
            lines.append(f"| {method} | {side} | {s['seconds']:.1f} | {s['peak_rss_mb']:.0f} | "
                         f"{s['block_passes']:.2f} | {s['head_passes']:.2f} | {sp:.4f} | "
                         f"{p.get('ppl', float('nan')):.2f}{ci_text} |")
        if "agree" in r:
            a = r["agree"]
            worst = ", ".join(f"`{k}` {v:.4f}" for k, v in a["worst"])
            same = r.get("same_inputs") or {}
            same_text = (f"{same['identical_layers']} of {same['layers']} (worst {same['worst'][1]:.6f})"
                         if "layers" in same else same.get("error") or "not run")
            agree_lines.append(f"| {method} | {a['identical_layers']} of {a['layers']} | {a['all']:.5f} | "
                               f"{a['min_layer']:.4f} | {worst} | {same_text} |")
    why = ["", "Why the masks differ (llm-compressor 0.14.0.1's installed source; ours by function name):", "",
           "- Wanda: the same rule on both sides: |W| times the root of the summed squared inputs, the lowest half "
           "of each row by a stable sort (`modifiers/pruning/wanda/wanda_sparsify.py` L95-97; ours "
           "`prune.select_prune_mask`), 2:4 by `topk` of each group of 4 (L86-92; ours a stable sort of each group). "
           "Their statistic is a running mean, rescaled per batch (L45-49, as locuslab/wanda `lib/layerwrapper.py` "
           "L31-35); ours a plain float32 sum (`stats._Stats.add`). On identical inputs that leaves the last bit of "
           "a score, which decides the rare tie within one unit in the last place (last column). End to end, once "
           "one such tie falls the other way the pruned block outputs differ in their last bits, each side's deeper "
           "layers see other inputs, and the patterns drift apart with depth while perplexity stays equal. Which "
           "rounding flips first is not pinned down: not the torch build (the same agreement with the peer on our "
           "torch 2.14.1), not the explicit causal mask its traced subgraphs pass (bit-identical layer output "
           "either way), not the statistic's formula alone (docs/FIDELITY.md).",
           "- SparseGPT: the peer prunes `tmp <= thresh` with `thresh` the element at index int(s * numel) of each "
           "128-column block's sorted scores (`modifiers/pruning/sparsegpt/sgpt_sparsify.py` L164-165), one weight "
           "more than the target per block, as IST-DASLab/sparsegpt does (`sparsegpt.py` L97-98); we prune exactly floor(s * numel) "
           "(`prune.sparsegpt_prune`, docs/FIDELITY.md \"Exact kept totals\"). It also zeroes the weights of inputs "
           "never seen (L100, as `sparsegpt.py` L68) and scales its Hessian as a running mean of sqrt(2/n)-scaled inputs (L48-52); the "
           "damping (0.01 of the mean diagonal, L104) and the float32 Cholesky (L107) are the same. So no layer "
           "matches exactly, from the first one on.",
           "- Work: the peer's sequential pipeline runs every subgraph twice, a calibration pass and a propagation "
           "pass (`pipelines/sequential/pipeline.py` L136-178), the last subgraph (norm and `lm_head`) included. "
           "Ours runs the first block once to capture the stack's inputs (`capture.capture_calls`, `skip_later`), "
           "stops each block's statistics pass once its last pruned layer has seen its input (`down_proj`: "
           "`stats.input_statistics`, `stop_when_seen`), forms X^T X once for layers fed one tensor (q/k/v, "
           "gate/up), skips the last block's propagation and never runs `lm_head`."]
    ratios = ["", "Fine-stage time, ours / peer: " + "; ".join(
        f"{m} {r['ours']['seconds'] / r['peer']['seconds']:.2f}x" for m, r in results.items()
        if "error" not in r["ours"] and "error" not in r["peer"]) + "."]
    return "\n".join(lines + agree_lines + ratios + why) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-python", help="Python of a venv with llmcompressor (default: the --peer-venv's)")
    ap.add_argument("--peer-venv", default=str(PEER_VENV), help="where to build llm-compressor's venv when "
                    "--peer-python is not given (default bench/peers/.venv)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on each side (default 2)")
    ap.add_argument("--samples", type=int, default=128, help="calibration windows of 128 tokens (default 128)")
    ap.add_argument("--batch", type=int, default=8, help="calibration batch size on both sides (default 8)")
    ap.add_argument("--methods", default="wanda,sparsegpt,wanda-2:4", help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention kernel on both sides")
    ap.add_argument("--eval-windows", type=int, default=32, help="perplexity windows of 512 tokens (default 32)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "peers"), help="folder for the shared inputs and outputs")
    ap.add_argument("--out", default=str(OUT), help="Markdown results file")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds each side may take per method")
    ap.add_argument("--no-same-inputs", action="store_true",
                    help="skip the untimed check of the peer's Wanda functions on our layers' inputs")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite --out from the last run's WORK/results.json without running anything")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(ours(json.loads(a.child))))
        return 0
    if a.report_only:
        saved = Path(a.work) / "results.json"
        if not saved.exists():
            print(f"error: {saved} does not exist: run the bench first (without --report-only)", file=sys.stderr)
            return 2
        from ecoflap_utils.io import write_text_atomic

        last = json.loads(saved.read_text())
        write_text_atomic(a.out, table(last["results"], last["perplexity"], last["meta"]))
        return 0
    try:
        methods = [m.strip() for m in a.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise UserError(f"unknown method {bad[0] if bad else a.methods!r}; choose from {', '.join(METHODS)}")
        if a.threads < 1 or a.samples < 1 or a.batch < 1 or a.eval_windows < 1:
            raise UserError("--threads, --samples, --batch and --eval-windows must be positive whole numbers")
        peer = peer_python(a.peer_python, Path(a.peer_venv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    dense, calib = prepare(work, a.samples)
    import torch

    probe = subprocess.run([peer, "-c", "import llmcompressor.modifiers.pruning.wanda.wanda_sparsify as m; "
                            "print(m.__file__)"], capture_output=True, text=True)
    peer_wanda = probe.stdout.strip().splitlines()[-1] if probe.returncode == 0 and probe.stdout.strip() else None
    load_before = load_note()
    results: dict = {}
    for m in methods:
        method, sparsity, nm = METHODS[m]
        tag = m.replace(":", "")
        spec = dict(model=str(dense), calib=str(calib), method=method, sparsity=sparsity, nm=nm,
                    batch_size=a.batch, threads=a.threads, attn=a.attn)
        r = results[m] = {}
        for side, python, script in (("ours", sys.executable, Path(__file__).resolve()),
                                     ("peer", peer, PEER_DIR / "peer_side.py")):
            out = work / f"{tag}-{side}.safetensors"
            print(f"{m}: {side} ...", file=sys.stderr, flush=True)
            r[side] = run_side(python, script, {**spec, "out": str(out)}, a.timeout)
            r[side]["file"] = str(out)
            print(f"{m}: {side} {json.dumps({k: v for k, v in r[side].items() if k != 'stderr'})}", file=sys.stderr)
        if "error" not in r["ours"] and "error" not in r["peer"]:
            r["agree"] = agreement(Path(r["ours"]["file"]), Path(r["peer"]["file"]))
        if method == "wanda" and peer_wanda and not a.no_same_inputs:  # untimed: the peer's functions on our inputs
            print(f"{m}: the peer's Wanda on our inputs ...", file=sys.stderr, flush=True)
            check = run_side(sys.executable, Path(__file__).resolve(),
                             {**spec, "out": str(work / f"{tag}-same.safetensors"), "peer_wanda": peer_wanda},
                             a.timeout)
            r["same_inputs"] = check.get("same_inputs", {"error": check.get("error")})
    load_after = load_note()
    files = {f"{m}/{side}": Path(r[side]["file"]) for m, r in results.items() for side in ("ours", "peer")
             if "error" not in r[side]}
    print("perplexity ...", file=sys.stderr, flush=True)
    ppl = perplexities(dense, files, a.eval_windows)
    peer_info = next((r["peer"] for r in results.values() if "error" not in r["peer"]), {})
    meta = dict(command=" ".join(["python bench/peers.py", shlex.join(argv if argv is not None else sys.argv[1:])]).strip(),
                date=datetime.now().strftime("%Y-%m-%d %H:%M"), machine=f"{platform.machine()}, {os.cpu_count()} cores",
                load_before=load_before, load_after=load_after, ours_torch=torch.__version__,
                peer_version=peer_info.get("llmcompressor", "?"), peer_torch=peer_info.get("torch", "?"),
                samples=a.samples, batch=a.batch, threads=a.threads, attn=a.attn)
    text = table(results, ppl, meta)
    from ecoflap_utils.io import write_text_atomic

    write_text_atomic(a.out, text)
    (work / "results.json").write_text(json.dumps({"results": results, "perplexity": ppl, "meta": meta}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
