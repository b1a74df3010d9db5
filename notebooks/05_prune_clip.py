# %% [markdown]
# # 05 · Pruning CLIP with ECoFLaP
#
# CLIP is a dual encoder: an image tower and a text tower trained contrastively. ECoFLaP prunes both
# with one global allocation (Sec. 4.3, the CLIP table), calibrating on the contrastive loss over
# *training* images, never the evaluation split — as the official code does too
# (`CoOp/trainers/zsclip.py` draws calibration batches of 16 from each dataset's train split,
# `dm.train_loader_x`).
#
# **You will learn** how zero-shot accuracy falls with sparsity under uniform Wanda, SparseGPT and
# ECoFLaP, and how to build a per-dataset table like the paper's. The default is the bundled
# `mini-clip` (a small ViT trained here with a frozen pretrained MiniLM text tower), calibrated on its
# own samples (digits from its bundled training split); on a GPU set `MODEL` to
# `open_clip:ViT-B-16/openai`, `DATASETS` to ImageFolder trees on disk and `CALIBRATION` to each
# dataset's train split, which then calibrates the pruning for that dataset (both stages; the records
# name it), and `PROTOCOL: paper` for the official CoOp code's settings (batches of 16, as above).

# %%
import json
import matplotlib.pyplot as plt
import pandas as pd
import torch

from ecoflap_utils import experiments as ex, load_model, plots, report
from ecoflap_utils.io import write_json_atomic
from ecoflap_utils.report import format_table, summarize
plots.set_style()

# %% tags=["parameters"]
MODEL: str = "mini-clip"  # bundled mini-clip on CPU; open_clip:ViT-B-16/openai on a GPU
DEVICE: str = "cpu"  # torch device
DTYPE: str = "float32"  # float32 on CPU
DATASETS: dict = {}  # name -> ImageFolder/CSV path for zero-shot sets ({}: the bundled held-out set)
METHODS: list = ["wanda", "sparsegpt", "ecoflap-zeroth", "ecoflap-first"]  # see ecoflap_utils.experiments.METHODS
SPARSITIES: list = [0.5, 0.6, 0.7]  # target sparsities
CALIB_SAMPLES: int = 128  # fine-stage calibration samples
FIRST_STAGE_SAMPLES: int = 32  # coarse-stage samples
EVAL_LIMIT: int = 1000  # held-out images per evaluation (None: all)
SEED: int = 0  # seed
PROTOCOL: str = None  # "paper": every pruning step with the official CoOp code's settings for CLIP (protocol.py); None: ours
CALIBRATION: dict = None  # dataset name -> its train split on disk (ImageFolder), one per name of DATASETS; None: the model's own samples
OUT_DIR: str = "runs/05_prune_clip"  # where results.json and figures go

# %%
model = load_model(MODEL, device=DEVICE, dtype=DTYPE)
ex.check_protocol_parameters(model, PROTOCOL, calib_samples=CALIB_SAMPLES, first_stage_samples=FIRST_STAGE_SAMPLES)
sets = DATASETS or {"bundled": None}
calib_of = ex.calibration_per_dataset(CALIBRATION, sets)  # name -> path (None: the model's own samples)
records = []
for name, path in sets.items():
    rs = ex.sparsity_sweep(model, methods=METHODS, sparsities=SPARSITIES, task="zeroshot", data=path, limit=EVAL_LIMIT,
                           calib_samples=CALIB_SAMPLES, first_stage_samples=FIRST_STAGE_SAMPLES, seed=SEED,
                           protocol=PROTOCOL, calibration=calib_of[name])
    records += [{**r, "config": {**r["config"], "dataset": name}} for r in rs]
write_json_atomic(f"{OUT_DIR}/results.json", records)

# %%
fig, ax = plt.subplots(figsize=(6, 4))
plots.metric_vs_sparsity(ax, records, "acc1")
ax.set_title(f"{model.name} · zero-shot top-1")
plots.save(fig, OUT_DIR, "05_acc1_vs_sparsity")

# %% [markdown]
# ## A table shaped like the paper's CLIP table
#
# One row per method and sparsity, one column per dataset, and the average.

# %%
df = pd.DataFrame([{"method": r["method"], "sparsity": r["sparsity"], "dataset": r["config"].get("dataset", "bundled"),
                    "acc1": r["metrics"]["acc1"]} for r in records])
pivot = df.pivot_table(index=["sparsity", "method"], columns="dataset", values="acc1")
pivot["average"] = pivot.mean(axis=1)
pivot.round(2)

# %% [markdown]
# ## What this shows
#
# Zero-shot accuracy needs both towers to keep their embeddings aligned. The table below is this
# run's `results.json` (top-1 by method and sparsity, dense in column 0; one block of rows per
# dataset when there are several), and the sentences under it compare each method with uniform
# Wanda at each sparsity from the same records: how many of the points Wanda loses it keeps.
#
# On the bundled defaults, `make run` measured on `mini-clip` (1,000 held-out digits, dense 97.6 %
# top-1), for uniform Wanda, SparseGPT, ECoFLaP zeroth and first: 97.4, 97.7, 97.8, 97.7 at 0.5;
# 95.5, 98.0, 97.0, 96.5 at 0.6; 82.4, 97.2, 92.2, 90.7 at 0.7. In that run nothing was lost at 0.5,
# ECoFLaP's allocation recovered about two thirds of uniform Wanda's loss at 0.7 with zeroth-order
# scores as well as with first-order ones (as the paper reports), and SparseGPT alone was better
# still: with weight updates, uniform sparsity is not yet a problem at that size. Those zeroth-order
# scores came from 32 samples, which notebook 02 showed to rank `mini-clip`'s blocks noisily; the
# allocation helped anyway. We have not isolated why (the split between the two towers, or the
# order of blocks inside one): an open question in NOTES.md.

# %%
records = report.load_records(OUT_DIR)
rows = ("dataset", "method") if len(sets) > 1 else ("method",)
print(report.save_headline(records, OUT_DIR, rows=rows))  # also headline.csv and headline.md in OUT_DIR
for name in sets:
    for s in SPARSITIES:
        for a in [m for m in METHODS if m != "wanda"]:
            print(report.compare(records, a=a, b="wanda", sparsity=s, where={"dataset": name} if len(sets) > 1 else None))
