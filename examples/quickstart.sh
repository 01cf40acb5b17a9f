#!/usr/bin/env bash
# megatron_llama quickstart on any machine (CPU is fine; no download beyond pip packages).
#
# Today it installs the package if needed, shows the presets and detected kernels, and proves
# on 2 local processes that TP, TP+SP, PP (1F1B and interleaved), DP and activation recompute
# compute exactly what one process computes. The pretraining, conversion and generation steps
# join this script as their issues land (see README "Status").
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import megatron_llama, megatron.core" 2>/dev/null; then
    pip install torch==2.13.0            # CPU wheel on CPU hosts; keep your CUDA build on GPUs
    pip install -e .
fi
export WANDB_MODE=${WANDB_MODE:-offline}
megatron-llama info
echo
megatron-llama selfcheck
