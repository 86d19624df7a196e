#!/bin/bash
# Issue 18: Qwen2.5-Coder-0.5B keep 0.6, loss-aware ranks + 120 fine-tuning steps (the demo's recipe), then
# HumanEval (first 40) of the factorized Q8_0 GGUF against dense torch and dense Q8_0 in one validate run.
cd "$(dirname "$0")/../.."
Q=/root/.cache/basel-edge/models/Qwen2.5-Coder-0.5B-Instruct
W=${WORK:-/tmp/basel-qwen-keep06}; mkdir -p $W  # results committed in eval/results/compress-qwen2.5-coder-0.5b-keep0.6
exec 9>/tmp/basel-heavy.lock; flock 9
T0=$(date +%s)
/usr/bin/time -v -o $W/compress.time .venv/bin/basel-edge compress --model $Q --task python-code --method svd-llm --keep 0.6 \
   -o $W/loss-0.6 --overwrite --quiet > $W/compress.log 2>&1 || { echo compress failed; exit 1; }
T1=$(date +%s)
/usr/bin/time -v -o $W/finetune.time .venv/bin/basel-edge finetune $W/loss-0.6 --task python-code --steps 120 \
   --seq-len 256 --batch-size 2 -o $W/loss-ft-0.6 --overwrite --quiet > $W/finetune.log 2>&1 || { echo finetune failed; exit 1; }
T2=$(date +%s)
echo "compress $((T1-T0)) s, finetune $((T2-T1)) s, total $((T2-T0)) s" | tee $W/times.txt
.venv/bin/basel-edge export --target gguf $W/loss-ft-0.6 -o $W/qwen-loss-ft-0.6-q8_0.gguf --overwrite --quiet > $W/export.log 2>&1 || { echo export failed; exit 1; }
.venv/bin/basel-edge export --target gguf $Q -o $W/qwen-dense-q8_0.gguf --overwrite --quiet >> $W/export.log 2>&1 || { echo export dense failed; exit 1; }
.venv/bin/basel-edge validate --baseline $Q $W/qwen-dense-q8_0.gguf $W/qwen-loss-ft-0.6-q8_0.gguf --humaneval --limit 40 \
   --reps 3 -o $W/he > $W/validate.log 2>&1 || echo validate failed
echo finished > $W/done
