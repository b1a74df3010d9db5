# %% [markdown]
# # 03 · From scores to per-block sparsity
#
# ECoFLaP turns one global score per block into a sparsity per block (Sec. 3.2): keep K = N(1 − p)
# weights in total, hand them out in proportion to the scores, never prune any block beyond a cap
# (p + 0.1 by default), and hit the total exactly. OWL (Yin et al., 2024) is the alternative that uses
# the fraction of outlier Wanda scores per block; uniform is what layer-wise pruners do.
#
# **You will learn** the four steps of the allocation, what the cap and the granularity change, and
# how ECoFLaP, OWL and uniform allocations look block by block (the paper's Fig. 5).

# %%
import json
import matplotlib.pyplot as plt
import pandas as pd
import torch

from ecoflap_utils import experiments as ex, lessons, load_model, plots, report
from ecoflap_utils.io import write_json_atomic
from ecoflap_utils.report import format_table, summarize
plots.set_style()
from ecoflap_utils.allocate import allocate_sparsity
from ecoflap_utils.scores import count_units, group_info, owl_outlier_ratios, score_groups

# %% tags=["parameters"]
MODEL: str = "mini-blip2"  # bundled mini-blip2 on CPU; Salesforce/blip2-flan-t5-xl on a GPU
DEVICE: str = "cpu"  # torch device
DTYPE: str = "float32"  # float32 on CPU
TARGET: float = 0.6  # overall sparsity p
CAP_MARGINS: list = [0.05, 0.1, 0.2]  # cap on any block's sparsity: TARGET plus each margin
SCORES: str = "zeroth"  # zeroth, first, jvp or magnitude (zeroth and jvp: per tensor, the paper's estimator)
FIRST_STAGE_SAMPLES: int = 32  # coarse-stage calibration samples (the paper: 32)
SEED: int = 0  # seed
PROTOCOL: str = None  # "paper": the block scores with the official code's estimator (batches, central difference) for the model's family; None: ours
CALIBRATION: str = None  # calibration data on disk for the scores (CC3M shards, a CLIP train split, C4: data/BENCHMARKS.md); None: the model's own samples
OUT_DIR: str = "runs/03_sparsity_allocation"  # where results.json and figures go

# %% [markdown]
# ## Block scores
#
# One global score per block from `FIRST_STAGE_SAMPLES` calibration samples: the model's own by default,
# or, with `CALIBRATION` set, items read from that path (the records name it). Without `PROTOCOL` the
# estimator takes our defaults (per tensor, forward difference, batches of 8); `PROTOCOL: paper` uses the
# official code's settings for the model's family (central difference; batches of 8 for BLIP-2, 16 for CLIP,
# 1 for LLaMA) and refuses a `FIRST_STAGE_SAMPLES` other than the paper's (32 for zeroth-order scores).

# %%
model = load_model(MODEL, device=DEVICE, dtype=DTYPE)
ex.check_protocol_parameters(model, PROTOCOL, scores=SCORES, first_stage_samples=FIRST_STAGE_SAMPLES)
calib, source = ex.calibration_for(model, CALIBRATION, FIRST_STAGE_SAMPLES, SEED)  # source: None when generated
est = ex.score_settings(model, PROTOCOL, SCORES)  # {}: our estimator settings
scores, cost = ex.coarse_scores(model, SCORES, calibration=calib, seed=SEED, progress=False, **est)
owl = owl_outlier_ratios(model, calib)
groups = score_groups(model, "block")
info = group_info(model, groups)
print(f"{len(groups)} blocks scored in {cost['wall_s']:.1f} s ({count_units(model, 'block', 'tensor')} tensors perturbed)")

# %% [markdown]
# ## The four steps
#
# 1. **Budget**: keep K = ⌊N(1 − p)⌋ weights over all pruned blocks.
# 2. **Floor**: every block first keeps ⌈n_g(1 − cap)⌉ weights, so none is pruned beyond the cap.
# 3. **Share**: the rest of the budget goes out in proportion to the scores; a block that would get
#    more than all its weights is filled and passes the excess on.
# 4. **Round**: the last weights go to the largest remainders, so the total is exact.

# %%
sizes = {g: v["size"] for g, v in info.items()}
alloc = allocate_sparsity(scores, sizes, TARGET, method="ecoflap")
kept = sum(round((1 - alloc[g]) * sizes[g]) for g in sizes)
print(f"budget K = {int(sum(sizes.values()) * (1 - TARGET))}, kept = {kept}, max block sparsity = {max(alloc.values()):.3f}")
pd.DataFrame([{"block": g, **info[g], "score": scores[g], "sparsity": alloc[g]} for g in groups]).head(12)

# %% [markdown]
# ## ECoFLaP, OWL and uniform, block by block (Fig. 5)

# %%
rows = ex.allocation_table(model, scores, [TARGET], methods=("uniform", "ecoflap", "owl"), owl_ratios=owl)
alloc_df = pd.DataFrame(rows)
fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
for ax, (method, g) in zip(axes, alloc_df.groupby("allocation", sort=False)):
    plots.bar_by_group(ax, list(g.group), list(g.sparsity), groups=list(g.modality), ylabel="sparsity")
    ax.axhline(TARGET, color="black", lw=1, ls="--")
    ax.set_title(f"{method} allocation at p = {TARGET}")
plots.save(fig, OUT_DIR, "03_allocations")

# %% [markdown]
# ## The cap
#
# A tight cap keeps the allocation close to uniform; a loose one lets the scores decide. The paper
# uses p + 0.1.

# %%
caps = []
for m in CAP_MARGINS:
    sp = allocate_sparsity(scores, sizes, TARGET, method="ecoflap", max_sparsity=min(TARGET + m, 0.99))
    by_mod = pd.Series({g: sp[g] for g in sp}).groupby(pd.Series({g: info[g]["modality"] for g in sp})).mean()
    caps.append({"cap": TARGET + m, "min": min(sp.values()), "max": max(sp.values()), **by_mod.to_dict()})
pd.DataFrame(caps)

# %% [markdown]
# ## Per tensor or per group: the estimator moves the allocation
#
# The scores above use the paper's zeroth-order estimator: one direction per weight tensor, summed over
# the block, which tracks Σ_t ‖g_t‖ (notebook 02). Perturbing each block along one joint direction
# (`perturb="group"`) costs T times fewer forwards for T tensors per block and tracks ‖g_block‖
# instead. Below, ECoFLaP's allocation at TARGET from each, block by block, and each module's
# size-weighted mean sparsity.

# %%
group_scores, group_cost = ex.coarse_scores(model, SCORES, calibration=calib, seed=SEED, progress=False, **{**est, "perturb": "group"})
by_est = pd.DataFrame(lessons.allocation_by_estimator(model, {"per tensor": scores, "per group": group_scores}, TARGET))
piv = by_est.pivot(index="group", columns="estimator", values="sparsity").loc[list(groups), ["per tensor", "per group"]]
fig, ax = plt.subplots(figsize=(11, 3.8))
piv.plot.bar(ax=ax, width=0.8, color=plots.OKABE_ITO[:2])
ax.axhline(TARGET, color="black", lw=1, ls="--")
ax.set(ylabel="sparsity", xlabel="block", title=f"{model.name}: ECoFLaP at p = {TARGET}, per-tensor vs per-group scores")
plots.save(fig, OUT_DIR, "03_estimators")
means = pd.DataFrame(lessons.modality_sparsity(by_est.to_dict("records"))).T
means["scoring s"] = [cost["wall_s"], group_cost["wall_s"]]
means

# %% [markdown]
# ## Granularity
#
# A score per layer, per block (the paper's default) or per module (one per stack). Coarser groups
# are smoother, and with one joint direction per group (`perturb="group"`, used here) cheaper to score;
# per tensor, the cost is the same at every granularity. Finer groups can separate attention from MLP.

# %%
gran = []
for g_name in ("block", "module"):
    gs = score_groups(model, g_name)
    sc, c = (group_scores, group_cost) if g_name == "block" else ex.coarse_scores(
        model, SCORES, calibration=calib, seed=SEED, progress=False, **{**est, "perturb": "group", "granularity": g_name})
    sz = {g: v["size"] for g, v in group_info(model, gs).items()}
    sp = allocate_sparsity(sc, sz, TARGET)
    gran.append({"granularity": g_name, "groups": len(gs), "score_s": c["wall_s"], "min": min(sp.values()), "max": max(sp.values())})
pd.DataFrame(gran)

# %%
records, conf = [], ex.calibration_config(PROTOCOL, first_stage=source, first_stage_samples=FIRST_STAGE_SAMPLES)
for method, g in alloc_df.groupby("allocation", sort=False):
    by_mod = g.groupby("modality").apply(lambda d: (d.sparsity * d["size"]).sum() / d["size"].sum(), include_groups=False)
    records.append(ex.record(model.name, method, TARGET, "allocation",
                             {"min_sparsity": g.sparsity.min(), "max_sparsity": g.sparsity.max(),
                              **{f"{k}_sparsity": float(v) for k, v in by_mod.items()}}, config=conf))
g = by_est[by_est.estimator == "per group"]
records.append(ex.record(model.name, "ecoflap (per-group scores)", TARGET, "allocation",
                         {"min_sparsity": g.sparsity.min(), "max_sparsity": g.sparsity.max(),
                          **{f"{k}_sparsity": v for k, v in lessons.modality_sparsity(g.to_dict("records"))["per group"].items()}},
                         config=conf))
write_json_atomic(f"{OUT_DIR}/results.json", records)
pd.DataFrame([{"allocation": r["method"], **r["metrics"]} for r in records])

# %% [markdown]
# ## What this shows
#
# The allocation follows the scores within the cap: blocks the loss depends on more keep more
# weights. The table below is this run's `results.json` (per allocation: the lowest and highest block
# sparsity and each module's weighted average; `ecoflap` uses the default per-tensor scores,
# `ecoflap (per-group scores)` the per-group ones), and the sentences under it read the same records:
# how far each module's average moves from p under each estimator, and each module's share of the
# prunable weights, which bounds how far its average can move.
#
# Two things limit what any allocation can do on `mini-blip2`: the language model holds almost all the
# prunable weights (the last sentence), so its average cannot move far from p, and notebook 01 showed
# that it is the fragile module. Scores measure the loss's sensitivity to small perturbations around
# the dense weights, not the damage of removing half of them; whether an allocation helps accuracy is
# the question of notebooks 04–06. The two estimators target different norms (Σ_t ‖g_t‖ against
# ‖g_block‖, notebook 02), so where they disagree on the vision/language split, the choice of
# estimator, not only the data, decides the allocation.
#
# The default grid (`grids/default.yaml`) runs this notebook on `mini-blip2` with FIRST_STAGE_SAMPLES 8
# instead of the paper's 32: the per-tensor estimator perturbs every weight tensor of mini-blip2
# separately (234 tensors against 36 blocks). Measured while writing this notebook, with
# OMP_NUM_THREADS=1 on two CPU cores shared with other jobs: at 8 samples the per-tensor pass took 402 s
# and the per-group pass 33 s, so 32 samples (about four times as long) do not fit the grid's time budget.
# With 8 samples each score is one draw per tensor: read the allocation as an illustration of the
# method, not a stable result.

# %%
records = report.load_records(OUT_DIR)
print(report.save_headline(records, OUT_DIR, columns="metric"))  # also headline.csv and headline.md
for method in ("ecoflap", "ecoflap (per-group scores)"):
    print(report.describe(records, method, ["vision_sparsity", "language_sparsity"]))
share = pd.Series(sizes).groupby(pd.Series({g: info[g]["modality"] for g in sizes})).sum() / sum(sizes.values())
print(f"On {model.name}, the prunable weights by module: " + ", ".join(f"{m} {v:.0%}" for m, v in share.items()) + ".")
