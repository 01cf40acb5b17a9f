#!/usr/bin/env bash
# megatron_llama quickstart: the main job end to end on a CPU machine, no download.
#
#   built-in corpus -> SentencePiece tokenizer -> indexed datasets -> pretrain the tiny
#   preset with TP=2 on 2 processes (validation loss falls) -> curves PNG -> Meta's
#   consolidated format (params.json + consolidated.00.pth + tokenizer.model) -> text
#   generated from the converted model (greedy, KV cache)
# Usage: bash examples/quickstart.sh [workdir]   (default: ./quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-quickstart}
. examples/use_venv.sh  # megatron-llama installed, or a virtualenv of its own
mkdir -p "$WORK"

megatron-llama info --presets-only
megatron-llama corpus --output "$WORK/data"
megatron-llama train-tokenizer --input "$WORK/data/code.jsonl" "$WORK/data/prose.jsonl" \
    --output-prefix "$WORK/data/tokenizer" --vocab-size 8192
for source in code prose; do
    megatron-llama preprocess --input "$WORK/data/$source.jsonl" \
        --output-prefix "$WORK/data/$source" --tokenizer "$WORK/data/tokenizer.model" --no-progress
done
megatron-llama pretrain --preset tiny --nproc-per-node 2 --tp 2 \
    --data "$WORK/data/blend.yaml" --tokenizer "$WORK/data/tokenizer.model" \
    --micro-batch 4 --global-batch 16 --train-steps 60 --warmup-steps 6 \
    --eval-interval 20 --eval-iters 2 --log-interval 5 --save "$WORK/checkpoints"
megatron-llama plot "$WORK/checkpoints/log.jsonl" --output "$WORK/curves.png"
megatron-llama convert --input "$WORK/checkpoints" --output "$WORK/meta" --to meta --force \
    --no-progress
ls -l "$WORK/meta"
megatron-llama generate --checkpoint "$WORK/meta" --prompt "def " --max-new-tokens 48
python - "$WORK/checkpoints/log.jsonl" <<'PY'
import json, sys
val = [json.loads(l) for l in open(sys.argv[1]) if '"val_loss"' in l]
print(f"validation loss: {val[0]['val_loss']:.3f} at step {val[0]['step']} -> "
      f"{val[-1]['val_loss']:.3f} at step {val[-1]['step']}")
PY
