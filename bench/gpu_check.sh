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
semi_rc=0
"$PY" bench/semi_structured.py --out bench/results/semi_structured.md || semi_rc=$?
"$PY" bench/gpu_check.py --scale full --device cuda --dtype bfloat16 "$@"
[ "$split_rc" -ne 0 ] && echo "the device-map stage failed (exit $split_rc)" >&2
[ "$semi_rc" -ne 0 ] && echo "the semi-structured 2:4 stage failed (exit $semi_rc)" >&2
[ "$split_rc" -eq 0 ] && [ "$semi_rc" -eq 0 ]
