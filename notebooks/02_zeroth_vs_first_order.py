# %% [markdown]
# # 02 · Zeroth-order versus first-order scores
#
# ECoFLaP's coarse stage (Sec. 3.2) needs one importance number per block from the *whole model's*
# loss. First-order scores need a backward pass — activations for every layer kept in memory (22 GB
# instead of 9 GB for BLIP-2 in the paper's Table 1). ECoFLaP estimates a gradient norm from forward
# passes only: along a random Gaussian direction z, g_hat = (L(W + εz) − L(W)) / ε estimates z·g, and
# since E|z·g| = √(2/π)‖g‖₂, accumulating |g_hat| over batches tracks a gradient norm.
#
# *Which* norm depends on what is perturbed together. The paper's estimator, our default
# (`perturb="tensor"`), draws one direction per weight tensor and sums over the block's tensors: it
# tracks Σ_t ‖g_t‖. `perturb="group"` perturbs the whole block along one joint direction: T times
# fewer forwards for T tensors per block, but it tracks ‖g_block‖, a different quantity.
#
# **You will learn** how well each estimator ranks blocks against both exact references, how noisy a
# score is (standard errors, split-half stability), that a forward difference ranks like the paper's
# central difference at half the forwards, and what every score method costs in time and memory —
# including first order with block checkpointing, which removes most of the memory argument.

# %%
import matplotlib.pyplot as plt
import pandas as pd
import torch

from ecoflap_utils import experiments as ex, lessons, load_model, plots, report
from ecoflap_utils.io import write_json_atomic
from ecoflap_utils.scores import group_info, perturbed, score_groups, stability_message, unit_noise
plots.set_style()

# %% tags=["parameters"]
MODEL: str = "mini-clip"  # any model; the bundled mini-clip by default (smollm2-135m works too, slower)
DEVICE: str = "cpu"  # torch device
DTYPE: str = "float32"  # float32 on CPU
SAMPLE_COUNTS: list = [8, 16, 32]  # calibration samples for the rank-agreement table (multiples of BATCH_SIZE)
EPS: float = 0.001  # finite-difference step of the main runs (the paper: 1e-3)
EPS_VALUES: list = [0.0001, 0.001, 0.01]  # steps for the forward vs central difference table
PAPER_UNITS: int = 6  # tensors the paper's uncached central-difference code is timed on (then scaled)
BATCH_SIZE: int = 8  # first-stage batch size (the paper: 8)
SEQ_LEN: int = 64  # tokens per calibration sample for language models
SEED: int = 0  # noise and sampling seed
CALIBRATION: str = None  # calibration data on disk (CC3M shards, a CLIP train split, C4: data/BENCHMARKS.md); None: the model's own samples
OUT_DIR: str = "runs/02_zeroth_vs_first_order"  # where results.json and figures go

# %%
model = load_model(MODEL, device=DEVICE, dtype=DTYPE)
if hasattr(model, "seq_len"):
    model.seq_len = SEQ_LEN
info = group_info(model, score_groups(model, "block"))
print(model.describe())

# %% [markdown]
# ## The seed trick
#
# A perturbation never stores z: it is regenerated from an integer seed when needed, and the weights
# are restored *exactly* from a copy of the one tensor or block being perturbed (adding εz back is not
# bit-exact in floating point — one of the paper code's defects we do not repeat).

# %%
block = model.pruned_blocks()[0]
params = [model.model.get_parameter(w) for w in block.weights]
before = [p.detach().clone() for p in params]
with perturbed(params, seed=1234, scale=1e-3):
    changed = any(not torch.equal(p, b) for p, b in zip(params, before))
restored = all(torch.equal(p, b) for p, b in zip(params, before))
same_z = all(torch.equal(a, b) for a, b in zip(unit_noise(params, 1234), unit_noise(params, 1234)))
print(f"perturbed: {changed}; restored bit-exactly: {restored}; z regenerated identically: {same_z}")

# %% [markdown]
# ## Two estimators, two exact references
#
# The exact references come from plain autograd on the same batches (`lessons.exact_gradient_norms`):
# per batch, Σ_t ‖g_t‖ and ‖g_block‖, summed over batches. Each estimator runs once on the largest
# sample count; the score for n samples is the sum over the first n / BATCH_SIZE batches, so every
# sample count sees the first n samples and the same noise draws. Each cell is a Spearman rank
# correlation over the blocks; the first row shows how differently the two references rank them.
# The samples are the model's own (bundled data for the bundled models, generated ones for a hub model),
# or, with `CALIBRATION` set, max(SAMPLE_COUNTS) items read from that path, which the records name.
# (No `PROTOCOL` here: this notebook sets the estimator's settings itself, and the paper's are EPS 1e-3 and
# BATCH_SIZE 8 for BLIP-2.)

# %%
calib, source = ex.calibration_for(model, CALIBRATION, max(SAMPLE_COUNTS), SEED)  # source: None when generated
rows, runs = lessons.compare_estimators(model, calib, SAMPLE_COUNTS, batch_size=BATCH_SIZE, eps=EPS, seed=SEED)
agree = pd.DataFrame(rows)
agree.pivot_table(index=["estimator", "reference"], columns="samples", values="spearman", sort=False)

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
series = {f"{e} vs {r}": g.sort_values("samples").spearman.to_numpy()
          for (e, r), g in agree.groupby(["estimator", "reference"], sort=False)}
plots.line_by_group(ax, sorted(agree.samples.unique()), series, xlabel="calibration samples", ylabel="Spearman")
ax.set_title(f"{model.name}: block-score rank agreement")
plots.save(fig, OUT_DIR, "02_rank_agreement")

# %% [markdown]
# ## Noise made visible
#
# One batch gives one draw of |z·g| per tensor, with a relative spread of about 0.75. Below: the
# default run's split-half rank stability (the Spearman correlation between the scores of two halves
# of the draws) and each block's score with one standard error (from the per-batch contributions;
# with a single batch there is none). Blocks whose bars overlap cannot be ranked by these scores.

# %%
default = runs["tensor"]
print(stability_message(default))
names = list(default.scores)
fig, ax = plt.subplots(figsize=(9, 3.8))
plots.bar_by_group(ax, names, [default.scores[g] for g in names], groups=[info[g]["modality"] for g in names],
                   ylabel="zeroth-order score (per tensor)")
se = [0.0 if pd.isna(default.stderr.get(g)) else default.stderr[g] for g in names]
ax.errorbar(range(len(names)), [default.scores[g] for g in names], yerr=se, fmt="none", ecolor="black", capsize=3)
ax.set_title(f"{model.name}: scores ± 1 s.e. ({max(SAMPLE_COUNTS)} samples)")
plots.save(fig, OUT_DIR, "02_score_noise")

# %% [markdown]
# ## The memory argument, revisited
#
# Every score method on the first SAMPLE_COUNTS[0] samples, timed and measured in this process with
# `ecoflap_utils.measure.track`: on a CPU the memory is the process RSS above what it held at the start
# (sampled every 5 ms), on a GPU the CUDA peak allocation. The paper's implementation (per tensor,
# central difference, the whole model rerun for every perturbation) is timed on PAPER_UNITS tensors
# and its time scaled to all of them. First order with `memory="low"` recomputes each block during the
# backward pass and reduces each gradient as soon as it exists: the same scores at about the memory of
# a forward pass. Small models hold little activation memory, so the gaps grow with the model.

# %%
calib0 = calib[: SAMPLE_COUNTS[0]]
cost_rows, cost_runs = lessons.cost_of_methods(model, calib0, batch_size=BATCH_SIZE, eps=EPS, seed=SEED,
                                               paper_units=PAPER_UNITS)
fig, ax = plt.subplots(figsize=(7.5, 4.5))
lessons.cost_scatter(ax, cost_rows)
ax.set_title(f"{model.name}: time vs peak memory, {len(calib0)} samples ({cost_rows[0]['memory_kind']})")
plots.save(fig, OUT_DIR, "02_cost")
pd.DataFrame(cost_rows)

# %%
plain, low = cost_runs["first (plain)"].scores, cost_runs["first (low memory)"].scores
low_diff = lessons.max_relative_difference(plain, low)
print(f"low-memory vs plain first order: max relative difference of the block scores {low_diff:.1e}, "
      f"Spearman {lessons.spearman(plain, low):.3f}")

# %% [markdown]
# ## Forward or central difference
#
# The paper's central difference costs two perturbed forwards per direction; a forward difference
# costs one, and takes the unperturbed L(W) of each batch from the dense forward that fills the prefix
# cache, which both run anyway. At the same draws (same
# seeds, batches and tensors) the two give nearly the same scores: the table has their Spearman
# correlation, the largest relative difference of a block score and each run's forward passes
# (`ScoreResult.config["forwards"]`), for the default per-tensor estimator at EPS and, cheaper, the
# per-group one at each of EPS_VALUES. A larger ε adds the forward difference's O(ε) bias.

# %%
fwd = cost_runs["zeroth per tensor (forward)"]
diff_t, _ = lessons.difference_agreement(model, calib0, [EPS], perturb="tensor", batch_size=BATCH_SIZE, seed=SEED,
                                         forward=fwd)
diff_g, _ = lessons.difference_agreement(model, calib0, EPS_VALUES, perturb="group", batch_size=BATCH_SIZE, seed=SEED)
diffs = pd.DataFrame(diff_t + diff_g)
diffs

# %%
records = lessons.notebook02_records(model.name, rows, diff_t + diff_g, cost_rows, default,
                                     samples=len(calib0), low_memory_diff=low_diff, calibration=source)
write_json_atomic(f"{OUT_DIR}/results.json", records)
print(f"{len(records)} records and figures in {OUT_DIR}")

# %% [markdown]
# ## What this shows
#
# The tables below are this run's `results.json`: Spearman correlation of each estimator with each
# exact reference by number of calibration samples; forward against central difference by ε; the
# cost of each method; and the split-half stability of the default run. The sentences under them read
# the same records. Three things to look for. First, the per-tensor estimator is the one that targets
# Σ_t ‖g_t‖ and the per-group one ‖g_block‖; where the two references rank the blocks alike (first
# row), the cheaper per-group estimator loses nothing but noise. Second, a score is only as good as
# its stability: with the paper's 32 samples in batches of 8 there are four draws per tensor, and
# blocks whose error bars overlap are ordered by chance. Third, the memory argument: on a model this
# small the activations a backward pass keeps are a few MB, so on a CPU the RSS differences between
# methods are near the sampling noise of `track` and time is what separates them; low-memory first
# order gives the same scores as plain first order (its max relative difference is in the cost records)
# and keeps a backward pass near a forward pass's memory, which is what matters at BLIP-2 scale
# (`bench/results/paper_scale*.md`, BLIP-2 Flan-T5-XL on a CPU: 1.02x a no-grad forward's peak at batch 1;
# at batch 8 1.20x, or 1.04x once glibc returns freed memory; plain autograd needs about 2x).
#
# The default grid (`grids/default.yaml`) runs this notebook on `mini-clip` with the defaults above
# (SAMPLE_COUNTS 8, 16, 32 and the three EPS_VALUES), no faster variant: since the smaller counts reuse
# the 32-sample run's first batches, the notebook costs one 32-sample pass per estimator plus the
# one-batch cost and difference runs (measured while writing it: 142 s end to end through papermill,
# model loading included, on two CPU cores shared with other jobs at a load average of about 5).

# %%
records = report.load_records(OUT_DIR)
task = lambda t: [r for r in records if r["task"] == t]
print(report.save_headline(task("score_agreement"), OUT_DIR, "spearman", columns="samples"))  # + .csv, .md
print(report.headline_markdown(task("finite_difference"), ["spearman", "max_rel_diff"], columns="metric", rows=("method", "eps")))
print(report.headline_markdown(task("cost"), ["wall_s", "peak_delta_mb"], columns="metric"))
for method in dict.fromkeys(r["method"] for r in task("score_agreement")):
    print(report.trend(records, method, metric="spearman", by="samples", where={"task": "score_agreement"}))
print(report.describe(task("stability"), "zeroth per tensor") if task("stability") else stability_message(default))
