#!/usr/bin/env bash
# Create .venv with everything trinity-titan needs, then (unless --no-train) train the debug model.
#
#   bash scripts/setup.sh              # set up and train the debug model on this machine (CPU is fine)
#   bash scripts/setup.sh --no-train   # set up only
#
# TORCH_SPEC picks the torch build. The default, torch==2.13.0, is the CPU wheel on CPU-only machines
# that ship it; on a GPU machine set e.g. TORCH_SPEC="torch==2.11.0" (any torch >= 2.11 with CUDA).
# TRITON_SPEC (default triton==3.9.0) is installed only with a torch build without CUDA or ROCm.
set -euo pipefail
cd "$(dirname "$0")/.."

TRAIN=1
[[ "${1:-}" == "--no-train" ]] && TRAIN=0
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TRITON_SPEC="${TRITON_SPEC:-triton==3.9.0}"

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
# Install torch first and on its own, so that no later requirement pulls a different (CUDA) build.
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[test,ft]"
# A CPU torch brings no triton (liger-kernel then pulls the newest): pin one whose interpreter runs
# Liger's fused loss on CPU, as the tests do (TRITON_INTERPRET=1). CUDA builds pin their own triton.
if .venv/bin/python -c "import sys, torch; sys.exit(bool(torch.version.cuda or torch.version.hip))"; then
  .venv/bin/python -m pip install --quiet "$TRITON_SPEC"
fi
.venv/bin/python -c "import importlib.metadata as m, torch, torchtitan, triton, torchft, trinity_titan; print('torch', torch.__version__, '| triton', triton.__version__, '| torchft', m.version('torchft'), '| trinity_titan', trinity_titan.__version__)"

if [[ "$TRAIN" == 1 ]]; then
  NGPU="${NGPU:-1}"
  .venv/bin/torchrun --nproc_per_node="$NGPU" --standalone -m torchtitan.train \
    --job.config_file train_configs/trinity_debug.toml
fi
