#!/usr/bin/env bash
# GPU memory/time check at the paper's scale (BLIP-2 Flan-T5-XL architecture, random bf16 weights).
# Needs an NVIDIA GPU and the project's requirements; no network. Meant to finish in under 10 minutes on an H200 (later stages are skipped past --budget-s).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# a model split over the GPU and the CPU (max_memory) must prune and score as on the GPU alone (skipped without a GPU)
split_rc=0
"$PY" bench/gpu_check.py --device-map || split_rc=$?
# what the 2:4 masks buy at inference: a T5-XL-shaped layer through the semi-structured sparse matmul (skipped on CPU)
"$PY" bench/semi_structured.py --out bench/results/semi_structured.md || split_rc=$?
"$PY" bench/gpu_check.py --scale full --device cuda --dtype bfloat16 "$@"
exit "$split_rc"
