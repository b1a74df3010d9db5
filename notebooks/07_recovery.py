# %% [markdown]
# # 07 · Recovering accuracy by masked fine-tuning
#
# ECoFLaP is a one-shot, retraining-free method, but the authors also fine-tune their pruned BLIP and
# compare it with UPop, a structured method that prunes *while* training (the ECoFLaP README, section
# "BLIP", "Some additional results regarding BLIP models"). Here we prune, then fine-tune the model with
# every pruned weight held at exactly zero (`ecoflap_utils.finetune`), and watch held-out accuracy come
# back step by step.
#
# **You will learn** how fast a pruned BLIP-2 recovers under masked fine-tuning for uniform Wanda,
# ECoFLaP (zeroth-order scores, Wanda fine stage) and uniform SparseGPT at two sparsities; whether
# ECoFLaP's advantage survives fine-tuning by more than the noise (the spread over calibration seeds and the
# 95 % intervals over the questions); whether it pays to train the language model as well as the Q-Former;
# and how our numbers sit beside the paper's BLIP table. The default is the bundled `mini-blip2` (fine-tuned on its own *training* digits, evaluated on
# held-out ones); on a GPU set `MODEL` to `Salesforce/blip2-flan-t5-xl` and `FT_DATA`/`DATA` to files on disk.

# %%
import matplotlib.pyplot as plt
import pandas as pd

from ecoflap_utils import experiments as ex, load_model, plots, report
from ecoflap_utils import recovery as rc
from ecoflap_utils.io import write_json_atomic
from ecoflap_utils.records import check_seeds
plots.set_style()

# %% tags=["parameters"]
MODEL: str = "mini-blip2"  # bundled mini-blip2 on CPU; Salesforce/blip2-flan-t5-xl on a GPU
DEVICE: str = "cpu"  # torch device
DTYPE: str = "float32"  # float32 on CPU; bfloat16 on a GPU
TASK: str = "vqav2"  # held-out task (vqav2, okvqa, gqa, caption)
DATA: str = None  # evaluation path (None: the bundled held-out set)
FT_DATA: str = None  # fine-tuning path: VQAv2 train questions or COCO captions (None: bundled training samples)
METHODS: list = ["wanda", "ecoflap-zeroth", "sparsegpt"]  # see ecoflap_utils.experiments.METHODS
SPARSITIES: list = [0.5, 0.7]  # target sparsities
STEPS: int = 100  # fine-tuning steps per curve
EVAL_EVERY: int = 25  # held-out evaluation every so many steps (and at the end)
LR: float = 3e-4  # peak learning rate (AdamW, warm-up then cosine)
BATCH_SIZE: int = 16  # fine-tuning batch size
STACKS: list = ["qformer"]  # what is trained (BLIP-2's second stage: the Q-Former)
COMPARE_STACKS: list = ["qformer", "lm"]  # the other choice, for one method and sparsity ([]: skip)
COMPARE_AT: list = ["wanda", 0.5]  # that method and sparsity
EVAL_LIMIT: int = 200  # held-out items per evaluation (None: all)
CALIB_SAMPLES: int = 64  # fine-stage calibration samples
FIRST_STAGE_SAMPLES: int = 32  # coarse-stage samples
NUM_BEAMS: int = 1  # beam width of the answers
PERTURB: str = "tensor"  # zeroth-order estimator: tensor (the paper's) or group (a joint direction per block, faster)
SEEDS: list = [0, 1, 2]  # seeds (calibration samples, zeroth-order noise, fine-tuning batches): every curve's end points at each, its intermediate points at the first
PROTOCOL: str = None  # "paper": prune with the official code's settings for the model's family before fine-tuning (protocol.py); None: ours
CALIBRATION: str = None  # calibration data on disk for both pruning stages (CC3M shards or COCO captions, data/BENCHMARKS.md); None: the model's own samples
OUT_DIR: str = "runs/07_recovery"  # where results.json and figures go

# %% [markdown]
# ## Prune, evaluate, fine-tune, evaluate again
#
# Each method prunes a fresh copy of the model (coarse stage, then fine stage, as in notebook 04),
# which is evaluated, fine-tuned for `STEPS` steps with the pruned weights masked, and evaluated again at
# the end on the same `EVAL_LIMIT` held-out items. This is done once per seed in `SEEDS` (the dense model is
# evaluated once): the seed draws the calibration samples, the zeroth-order noise and the order of the
# fine-tuning batches, so the end points (pruned, and pruned then fine-tuned) carry a spread over seeds. The
# first seed's curves are also evaluated every `EVAL_EVERY` steps, to show their shape.
#
# `PERTURB` picks the zeroth-order estimator: the paper's per-tensor one by default. The bundled
# default grid sets `group` (one direction per block) for `mini-blip2`, whose 234 tensors made the
# per-tensor pass take 12 minutes of a run that has to fit `make run`'s half hour (notebook 03 compares
# the two estimators' allocations on this model).
#
# The pruning calibrates on the model's own samples by default, or, with `CALIBRATION` set, on
# image-caption pairs read from that path (the records name it); `PROTOCOL: paper` prunes with the official
# code's settings for the model's family, as in notebook 04, and refuses a `CALIB_SAMPLES`,
# `FIRST_STAGE_SAMPLES` or `PERTURB` that contradicts them. Fine-tuning reads `FT_DATA` either way.

# %%
SEEDS = check_seeds(SEEDS)  # a one-line error for an empty list or one that is not distinct integers
model = load_model(MODEL, device=DEVICE, dtype=DTYPE)
ex.check_protocol_parameters(model, PROTOCOL, calib_samples=CALIB_SAMPLES, first_stage_samples=FIRST_STAGE_SAMPLES,
                             perturb=PERTURB)
common = dict(steps=STEPS, eval_every=EVAL_EVERY, lr=LR, batch_size=BATCH_SIZE, eval_limit=EVAL_LIMIT, task=TASK,
              data=DATA, ft_data=FT_DATA, calib_samples=CALIB_SAMPLES, first_stage_samples=FIRST_STAGE_SAMPLES,
              seeds=SEEDS, num_beams=NUM_BEAMS, score_cache={}, progress=False, perturb=PERTURB, protocol=PROTOCOL,
              calibration=CALIBRATION)
records = rc.recovery_curves(model, methods=METHODS, sparsities=SPARSITIES, stacks=STACKS, **common)
if COMPARE_STACKS:
    records += rc.recovery_curves(model, methods=[COMPARE_AT[0]], sparsities=[COMPARE_AT[1]], stacks=COMPARE_STACKS,
                                  include_dense=False, **{**common, "seeds": SEEDS[:1]})  # the first seed only
write_json_atomic(f"{OUT_DIR}/results.json", records)
curves = rc.curve_frame(records)
curves

# %% [markdown]
# ## Held-out accuracy against fine-tuning steps
#
# One line per method and sparsity, the first seed's curve (solid: `STACKS` trained; dashed:
# `COMPARE_STACKS`), with 95 % bootstrap intervals over the evaluated items; the diamonds are the end points
# (step 0 and the last step) as the mean over all the seeds, their bars the min–max over the seeds (a line
# never joins one seed's point to a mean over seeds); the dotted line is the dense model.

# %%
metric = rc.main_metric_of(records)
first = rc.curve_frame([r for r in records if r["config"].get("seed") == SEEDS[0]], metric)  # the first seed's curves
ends = rc.end_frame(records, metric)  # every curve's end points, over all the seeds
fig, ax = plt.subplots(figsize=(7, 4.5))
for (m, s, t), g in first.groupby(["method", "sparsity", "trained"], sort=False):
    line = ax.errorbar(g["steps"], g[metric], yerr=[g[metric] - g["low"], g["high"] - g[metric]], marker="o", capsize=2,
                       linestyle="-" if t == "+".join(STACKS) else "--", label=f"{m} · {s:g} · {t} · seed {SEEDS[0]}")
    e = ends[(ends["method"] == m) & (ends["sparsity"] == s) & (ends["trained"] == t) & (ends["seeds"] > 1)]
    ax.errorbar(e["steps"] + 0.02 * STEPS, e[metric], yerr=[e[metric] - e["seed min"], e["seed max"] - e[metric]],
                fmt="D", capsize=5, markersize=8, alpha=0.5, color=line[0].get_color(),
                label=f"{m} · {s:g} · {t} · mean (min–max) over seeds" if len(e) else "_nolegend_")
ax.axhline(next(r["metrics"][metric] for r in records if r["method"] == "dense"), color="k", linestyle=":", label="dense")
ax.set(xlabel="fine-tuning steps", ylabel=metric, title=f"{model.name} · {TASK} · recovery")
ax.legend(fontsize=7)
plots.save(fig, OUT_DIR, "07_accuracy_vs_steps")

# %% [markdown]
# ## Which stacks to train
#
# BLIP-2's own second stage trains only the Q-Former (and the projection) against a frozen language
# model. After pruning, the language model is where the damage is (it holds most of the weights), so
# training it too might recover more — at the cost of back-propagating into, and keeping optimiser
# state for, every surviving LM weight. The end points of both choices, with their cost (the mean over the
# seeds, their min and max, and the mean 95 % item interval):

# %%
rc.end_frame(records, metric)

# %% [markdown]
# ## A table shaped like the authors' BLIP table at 0.5 sparsity
#
# Part (a) quotes the ECoFLaP README (github.com/ylsung/ECoFLaP, section "BLIP", "Some additional results
# regarding BLIP models"): BLIP (not BLIP-2) at 0.5 sparsity, four benchmarks. UPop's row is *reported,
# not run* — UPop is a structured, progressive pruning method that we did not implement. Part (b) is
# this run: the model that ran, its held-out VQA accuracy only, as the mean over the seeds (min–max over
# the seeds) [95 % item interval].

# %%
table = rc.upop_table(records, sparsity=0.5, trained="+".join(STACKS))
table.to_csv(f"{OUT_DIR}/upop_table.csv")
table

# %% [markdown]
# ## What this shows
#
# The table below is this run's `results.json` at the end points (pruned, and pruned then fine-tuned,
# dense in column 0; each cell the mean over the seeds, their min–max, and the 95 % interval over the
# questions), and the sentences are computed from the same records: how much of what each method lost the
# fine-tuning gives back, and how ECoFLaP compares with uniform Wanda after it. A sentence says two
# points *differ* only when neither their item intervals nor their ranges over seeds overlap.
#
# On `mini-blip2`, Wanda at 0.5 answers nothing useful (0 % on the held-out questions: its 135M
# language model stops following the visual prompt, notebook 04), yet training only the Q-Former
# (none of its weights pruned) for a few dozen steps brings most of it back: the damage is in what the
# pruned LM expects as input, and the bridge can re-learn to feed it. That is the paper's picture in
# miniature (its fine-tuned ECoFLaP is within a point of the full BLIP), but on a toy task of printed
# digits; it says nothing about how far fine-tuning closes the gap on VQAv2.
#
# The bundled default (`grids/default.yaml`: Wanda and ECoFLaP at 0.5, seeds 0-2, 32 fine-stage samples, 15
# steps of 16 on the Q-Former, every evaluation on 500 questions) measured once: dense 97.8 [96.4, 99.0]; both
# methods at 0 % before fine-tuning at every seed; after it, uniform Wanda 71.1 (60.6–84.8 over the seeds)
# [67.2, 74.7] and ECoFLaP 79.9 (72.6–83.8) [76.5, 83.4]. Fine-tuning clearly gives back most of the loss for
# both, at every seed. ECoFLaP came out ahead at two seeds of three (ECoFLaP minus Wanda −1.6, +12.0 and +16.0
# points) and the item intervals of the means no longer overlap, but the ranges over seeds do: no clear
# difference by the rule above. The seed (calibration samples, noise and the order of the fine-tuning batches)
# moves a fine-tuned model by up to 24 points, several times the item interval of 500 questions (about ±4), so
# it is what decides. The same comparison with 20 steps, 64 fine-stage samples and 500 questions (session 8)
# read the other way round: Wanda 83.9 (66–94), ECoFLaP 78.0 (70–91), seed by seed −3, +7 and −21.6; and with
# 100 questions (session 7) Wanda 84.3, ECoFLaP 79.7. `grids/full.yaml` runs 30 steps and the curves'
# intermediate points.

# %%
shown = rc.labelled(records, trained="+".join(STACKS))
print(report.save_headline(shown, OUT_DIR))  # also headline.csv and headline.md in OUT_DIR
for s in SPARSITIES:
    for m in METHODS:
        print(report.compare(shown, a=f"{m} · FT", b=f"{m} · no FT", sparsity=s))
    for m in [m for m in METHODS if m != "wanda"]:
        print(report.compare(shown, a=f"{m} · FT", b="wanda · FT", sparsity=s))
