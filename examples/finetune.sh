#!/usr/bin/env bash
# megatron_llama fine-tuning end to end on a CPU machine, no download:
#
#   built-in corpus -> tokenizer -> pretrain the tiny preset (TP=2) -> the built-in
#   instruction set (Alpaca records and chats) as token + loss-mask datasets ->
#   full fine-tuning from the pretraining checkpoint (TP=2, packed rows, response-only loss)
#   -> LoRA fine-tuning of the same base (PP=2, adapters only) -> merge the adapters and
#   export both to Hugging Face -> a chat answer from each
# Usage: bash examples/finetune.sh [workdir]   (default: ./finetune-example)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-finetune-example}
. examples/use_venv.sh  # megatron-llama installed, or a virtualenv of its own
mkdir -p "$WORK"
TOK="$WORK/data/tokenizer.model"

megatron-llama corpus --output "$WORK/data"
megatron-llama train-tokenizer --input "$WORK/data/code.jsonl" "$WORK/data/prose.jsonl" \
    "$WORK/data/alpaca.jsonl" --output-prefix "$WORK/data/tokenizer" --vocab-size 8192
for source in code prose; do
    megatron-llama preprocess --input "$WORK/data/$source.jsonl" \
        --output-prefix "$WORK/data/$source" --tokenizer "$TOK" --no-progress
done
# 1. a base model to fine-tune
megatron-llama pretrain --preset tiny --nproc-per-node 2 --tp 2 \
    --data "$WORK/data/blend.yaml" --tokenizer "$TOK" \
    --micro-batch 4 --global-batch 16 --train-steps 60 --warmup-steps 6 \
    --log-interval 10 --save "$WORK/base"
# 2. instructions -> tokens + loss masks (prompts masked; chats in the Llama 2 format)
megatron-llama finetune-data --input "$WORK/data/alpaca.jsonl" "$WORK/data/chat.jsonl" \
    --tokenizer "$TOK" --output-prefix "$WORK/data/sft" --max-tokens 257 --no-progress
# 3. full fine-tuning: the Alpaca recipe's shape (cosine, 3 % warmup, no weight decay) at
#    this model's 256 tokens, 16 rows per step, 6 epochs and a tiny model's learning rate
megatron-llama finetune --from "$WORK/base" --data "$WORK/data/sft" --epochs 6 \
    --nproc-per-node 2 --tp 2 --global-batch 16 --micro-batch 2 --lr 3e-4 \
    --log-interval 5 --save "$WORK/full"
# 4. LoRA on the same base, pipeline-parallel: only the adapters train and are saved
megatron-llama finetune --from "$WORK/base" --data "$WORK/data/sft" --epochs 6 \
    --nproc-per-node 2 --pp 2 --global-batch 16 --micro-batch 2 --lr 2e-3 \
    --lora-rank 16 --lora-alpha 32 --log-interval 5 --save "$WORK/lora"
# 5. export: the full run as it is, the LoRA run merged into its base
megatron-llama convert --input "$WORK/full" --to hf --output "$WORK/full-hf" --force \
    --no-progress
megatron-llama merge-lora --input "$WORK/lora" --to hf --output "$WORK/lora-hf" --force \
    --no-progress
ls -l "$WORK/lora-hf"
# 6. a chat turn from each (greedy), in the chat format the runs trained on
for run in full-hf lora-hf; do
    echo "== $run"
    megatron-llama generate --checkpoint "$WORK/$run" --chat --max-new-tokens 40 \
        --prompt "How many words are in this sentence? rotary tensor llama"
done
python - "$WORK" <<'PY'
import json, os, sys
for run in ("full", "lora"):
    recs = [json.loads(l) for l in open(os.path.join(sys.argv[1], run, "log.jsonl"))]
    train = [r for r in recs if "loss" in r]
    val = [r for r in recs if "val_loss" in r]
    pack = next(r["packing_efficiency"] for r in recs if "packing_efficiency" in r)
    print(f"{run}: packing efficiency {pack:.3f}; train loss {train[0]['loss']:.3f} at step "
          f"{train[0]['step']} -> {train[-1]['loss']:.3f} at step {train[-1]['step']}; "
          "validation loss " + " -> ".join(f"{r['val_loss']:.3f} (step {r['step']})" for r in val))
PY
