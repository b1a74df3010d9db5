# %% [markdown]
# # 01 · Motivation: why vision and language modules want different sparsity
#
# ECoFLaP (Sung, Yoon & Bansal, ICLR 2024) starts from an observation (Sec. 1 and Fig. 1): in a
# vision-language model the weights, gradients and Wanda scores of the vision encoder and of the
# language model are distributed very differently, so one sparsity for every layer (what layer-wise
# pruners such as Wanda and SparseGPT do) treats the two modules unequally.
#
# **You will learn** how to look at a model as ordered blocks with a stack and a modality, how the
# three importance signals differ between modules, and what uniform layer-wise pruning does to
# each module on its own as sparsity grows. On a CPU the default model is the bundled `mini-blip2`
# (a BLIP-2 whose language model is the pretrained SmolLM2-135M); set `MODEL` to
# `Salesforce/blip2-flan-t5-xl` on a GPU for the paper's model.

# %%
import json
import matplotlib.pyplot as plt
import pandas as pd
import torch

from ecoflap_utils import experiments as ex, lessons, load_model, plots, report
from ecoflap_utils.io import write_json_atomic
from ecoflap_utils.report import format_table, summarize
plots.set_style()

# %% tags=["parameters"]
MODEL: str = "mini-blip2"  # bundled mini-blip2 on CPU; Salesforce/blip2-flan-t5-xl on a GPU
DEVICE: str = "cpu"  # torch device
DTYPE: str = "float32"  # float32 on CPU; bfloat16 on a GPU
SPARSITIES: list = [0.3, 0.5, 0.7]  # uniform sparsities for the per-module sensitivity curve
CALIB_SAMPLES: int = 32  # calibration samples for Wanda statistics and gradients
EVAL_LIMIT: int = 200  # held-out examples evaluated per point (None: all)
NUM_BEAMS: int = 1  # beam search width for answers (the paper, after LAVIS: 5; 1 is about 4x faster on a CPU)
SEED: int = 0  # seed of calibration sampling
PROTOCOL: str = None  # "paper": the official code's Wanda settings (batch, per-matrix vision comparison) for the local scores and module curves; None: ours
CALIBRATION: str = None  # calibration data on disk for every cell (CC3M shards or COCO captions, data/BENCHMARKS.md); None: the model's own samples
OUT_DIR: str = "runs/01_motivation"  # where results.json and figures go

# %% [markdown]
# ## The model as blocks
#
# Every adapter lists the model's transformer blocks in the order a forward pass meets them, each with
# its *stack* and *modality*, and the linear weights a layer-wise pruner acts on. Like the paper, the
# Q-Former bridge is scored and cached but not pruned by default.

# %%
model = load_model(MODEL, device=DEVICE, dtype=DTYPE)
ex.check_protocol_parameters(model, PROTOCOL, calib_samples=CALIB_SAMPLES)  # refuses a CALIB_SAMPLES that PROTOCOL would change
blocks = pd.DataFrame([{"block": b.name, "stack": b.stack, "modality": b.modality, "pruned": b.prunable,
                        "weights": sum(model.model.get_parameter(w).numel() for w in b.weights)}
                       for b in model.blocks])
blocks.groupby(["stack", "modality", "pruned"], sort=False).agg(blocks=("block", "count"), weights=("weights", "sum"))

# %% [markdown]
# ## Three importance signals, per modality (Fig. 1)
#
# For every prunable weight we collect its magnitude |W|, its Wanda score |W_ij|·‖X_j‖₂ (the input
# norm comes from calibration data) and the magnitude of the loss gradient |∂L/∂W|. The histograms
# use log-spaced bins: the modules differ by orders of magnitude, not by a few percent.
#
# Calibration data, here and below: the model's own samples by default (for `mini-blip2`, digits from its
# bundled training split; for a BLIP-2 from the hub, generated images and token ids); with `CALIBRATION`
# set, `CALIB_SAMPLES` image-caption pairs read from that path (`ecoflap_utils.data.calibration`), such as
# the CC3M shards the paper calibrates on.

# %%
stats = ex.weight_statistics(model, calib_samples=CALIB_SAMPLES, seed=SEED, calibration=CALIBRATION)
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
for ax, (kind, label) in zip(axes, [("weight", "|W|"), ("wanda", "Wanda score |W|·‖X‖"), ("gradient", "|∂L/∂W|")]):
    plots.hist_by_group(ax, {mod: v[kind] for mod, v in stats.items()}, xlabel=label, log=True)
    ax.set_title(label)
plots.save(fig, OUT_DIR, "01_distributions")
pd.DataFrame({mod: {f"median {k}": float(pd.Series(v[k]).median()) for k in v} for mod, v in stats.items()})

# %% [markdown]
# ## Local scores per layer: the real BLIP-2 and this model
#
# The authors also plotted one number per weight tensor of the real BLIP-2 Flan-T5-XL, its *local
# score*. In their code (github `ylsung/ECoFLaP`, commit 59dac0a, `LAVIS/`) the Wanda score of a layer
# is W_metric = |W| · sqrt(scaler_row) (`lavis/compression/pruners/wanda_pruner.py`, lines 260 and 541),
# where scaler_row_j is the sum over calibration tokens of x_j² divided by the number of calibration
# samples (`WrappedGPT.add_batch`, lines 71-84). Its mean over the tensor (the commented-out `setattr(...,
# "importance_score", W_metric.cpu().abs().mean().item())`, lines 262 and 543; SparseGPT's is the mean
# of W² / diag(H⁻¹)², `sparsegpt_pruner.py` lines 166-168) was saved per parameter to
# `importance_scores/*.pth` (`evaluate_blip.py` lines 474-479) and plotted per layer by `LAVIS/plot.py`
# (`wanda()` and `sparsegpt()`, lines 322-457, y label "Local Score of Wanda"; layer order from
# `compare()`, lines 11-23). The statistics were gathered while pruning block by block at sparsity 0.5.
#
# The two files in `data/official/` are those scores (588 tensors: 156 vision, 432 language), copied
# from `LAVIS/importance_scores/cc3m-blipt5_{wanda,sparsegpt}_pruner_0.5-1.0-1.0.pth` of that
# repository, which is under the MIT license (Copyright (c) 2022 Yi-Lin Sung; the license is
# `data/official/LICENSE-ECoFLaP`). No model is needed to plot them. Beside them,
# `lessons.local_wanda_scores` computes the same quantity for the model this notebook runs, in the
# same way (uniform Wanda at 0.5, scores taken before each layer is pruned, weights restored after),
# on this run's calibration samples; with `PROTOCOL: paper` the pruning uses the official code's batch
# size and comparison (per matrix on the vision encoder), as the authors' runs did.

# %%
official = {m: pd.DataFrame(lessons.official_local_scores(m)) for m in ("wanda", "sparsegpt")}
calib, source = ex.calibration_for(model, CALIBRATION, CALIB_SAMPLES, SEED)  # source: None when generated
ours = lessons.local_wanda_scores(model, calib, sparsity=0.5, **ex.prune_settings(model, PROTOCOL))
panels = {("blip2-flan-t5-xl", "wanda (authors' file)"): official["wanda"],
          ("blip2-flan-t5-xl", "sparsegpt (authors' file)"): official["sparsegpt"],
          (model.name, "wanda (this run)"): pd.DataFrame(lessons.local_score_rows(model, ours))}

# %%
colour = {"vision": plots.OKABE_ITO[0], "language": plots.OKABE_ITO[1]}
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for ax, ((name, method), df) in zip(axes, panels.items()):
    for mod, g in df.groupby("modality", sort=False):
        ax.scatter(g.layer, g.score, s=8, color=colour.get(mod, "grey"), label=mod)
    ax.set(yscale="log", xlabel="layer index (model order)", ylabel="local score", title=f"{name}: {method}")
    ax.legend()
plots.save(fig, OUT_DIR, "01_local_scores")
local = [ex.record(n, m, 0.5, "local_scores", lessons.modality_medians(df.to_dict("records")),
                   config=ex.calibration_config(PROTOCOL, fine=source) if "this run" in m else None)
         for (n, m), df in panels.items()]
pd.DataFrame([{"model": r["model"], "scores": r["method"], **r["metrics"]} for r in local])

# %% [markdown]
# ## Uniform layer-wise pruning, one module at a time
#
# Now prune *only* the vision blocks, or *only* the language blocks, with uniform Wanda, and measure the
# task metric on held-out data. If the two curves fall at different sparsities, the modules tolerate
# pruning differently — and a single sparsity for all layers is a compromise that ECoFLaP's coarse
# stage (notebooks 02–03) replaces with a per-block sparsity from a global score. (`PROTOCOL: paper`
# prunes with the official code's batch size and per-stack comparison; the records carry the protocol and,
# with `CALIBRATION`, where the calibration samples came from.)

# %%
beams = {"num_beams": NUM_BEAMS}
m, iv = ex.evaluate_task_with_intervals(model, limit=EVAL_LIMIT, **beams)
dense = ex.record(model.name, "dense", 0.0, model.default_task, m, intervals=iv)
sens = ex.stack_sensitivity(model, sparsities=SPARSITIES, calib_samples=CALIB_SAMPLES, limit=EVAL_LIMIT, seed=SEED,
                            eval_kw=beams, calibration=CALIBRATION, protocol=PROTOCOL)
table = pd.DataFrame([{"pruned": r["config"].get("pruned", "nothing"), "sparsity": r["sparsity"], **r["metrics"]} for r in [dense] + sens])
table

# %%
metric = next(iter(dense["metrics"]))
fig, ax = plt.subplots(figsize=(6, 4))
plots.metric_vs_sparsity(ax, [dense] + sens, metric)
ax.set_title(f"{model.name}: pruning one module at a time")
plots.save(fig, OUT_DIR, "01_sensitivity")

# %%
write_json_atomic(f"{OUT_DIR}/results.json", [dense] + sens + local)
print(f"results and figures in {OUT_DIR}")

# %% [markdown]
# ## What this shows
#
# The table below is this run's `results.json` (the task metric by what was pruned and sparsity,
# dense in column 0), and the sentences under it compare the modules from the same records: if one
# module's row falls at a lower sparsity than the other's, the modules tolerate pruning differently.
#
# On the bundled defaults, `make run` measured on `mini-blip2` (100 held-out questions): pruning only
# the vision encoder with uniform Wanda kept 98 % VQA accuracy at 0.3 and 0.5, pruning only the
# SmolLM2-135M language model dropped it to 46 % at 0.3 and 0 % at 0.5, and the language model's |W|
# sat an order of magnitude above the vision encoder's while gradients overlapped. (A 135M language
# model is far more fragile than the paper's 3B Flan-T5; data/README.md has the numbers.) Wherever
# the rows differ, the *right* sparsity depends on the module, and a layer-wise pruner cannot see
# that, since it only compares weights inside one layer. The next notebooks compute a global,
# loss-aware score per block cheaply (02) and turn it into per-block sparsities (03).
#
# The second table holds the local scores per layer: for the authors' BLIP-2 Flan-T5-XL files and for
# this run's model, the median local score of the vision and of the language layers and their ratio
# (the last sentences). A local score is only compared *within* a layer by Wanda or SparseGPT, so a
# ratio far from 1 means the two modules' scores live on different scales: one threshold for all
# layers would prune one module much harder than the other.

# %%
records = report.load_records(OUT_DIR)
local = [r for r in records if r["task"] == "local_scores"]
print(report.save_headline([r for r in records if r not in local], OUT_DIR))  # also headline.csv and headline.md
print(report.headline_markdown(local, columns="metric", floatfmt=".3g"))
modules = list(dict.fromkeys(r["method"] for r in sens))  # "wanda (vision only)", "wanda (language only)"
for a, b in zip(modules, modules[1:]):
    for s in SPARSITIES:
        print(report.compare([r for r in records if r not in local], a=a, b=b, sparsity=s))
for r in local:
    print(f"{r['model']}, {r['method']}: the median vision local score is {r['metrics'].get('vision_over_language', float('nan')):.3g} times the median language one.")
