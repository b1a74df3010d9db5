"""mini-blip2 under uniform Wanda: VQA accuracy by greedy generation and by likelihood ranking, 100 held-out questions.

    OMP_NUM_THREADS=1 .venv/bin/python bench/rank_vs_generate.py   # about 4 minutes
"""
import time

from ecoflap_utils import load_model, prune
from ecoflap_utils.evaluate import evaluate
from ecoflap_utils.experiments import restored
m = load_model("mini-blip2")
for s in (0.0, 0.3, 0.5, 0.7):
    with restored(m):
        if s: prune(m, s, method="wanda", calib_samples=64, progress=False)
        out = {}
        for inf in ("generate", "rank"):
            t = time.time()
            r = evaluate(m, "vqav2", limit=100, num_beams=1, vqa_inference=inf, progress=False)
            r = r.get("metrics", r)
            out[inf] = (round(r["vqa_accuracy"], 1), round(time.time() - t, 1))
        print(s, out, flush=True)
