#!/bin/bash
# Issue 18: Qwen2.5-Coder-0.5B keep 0.6, loss-aware ranks + fine-tuning, then HumanEval (first 40) of the
# factorized Q8_0 GGUF against dense torch (and dense Q8_0 with DENSE_GGUF=1) in one validate run.
# Knobs (environment): LOSS=ce|kl|kl+ce, STEPS (fine-tuning steps of 2 x 256 tokens), THREADS, SCHEDULE,
# TASK (fine-tuning task: python-code, or python-functions for chat-formatted function requests), COMPILE=1
# (finetune --compile),
# WORK (scratch folder; an existing $WORK/loss-0.6 compression is reused). Results committed under
# eval/results/compress-qwen2.5-coder-0.5b-keep0.6*/ (the first run: LOSS=ce STEPS=120 THREADS=1
# SCHEDULE=constant, before cosine and bf16 autocast existed).
cd "$(dirname "$0")/../.."
Q=/root/.cache/basel-edge/models/Qwen2.5-Coder-0.5B-Instruct
LOSS=${LOSS:-ce}; STEPS=${STEPS:-120}; THREADS=${THREADS:-2}; SCHEDULE=${SCHEDULE:-cosine}
TASK=${TASK:-python-code}
W=${WORK:-/tmp/basel-qwen-keep06}; mkdir -p $W
# this variant's name: every knob that is not at its default shows in it
V=$LOSS-$STEPS$([ $TASK = python-code ] || echo "-$TASK")$([ $SCHEDULE = cosine ] || echo "-$SCHEDULE")
V=$V$([ $THREADS = 2 ] || echo "-t$THREADS")${COMPILE:+-compile}
exec 9>/tmp/basel-heavy.lock; flock 9
if [ ! -f $W/loss-0.6/config.json ]; then
  /usr/bin/time -v -o $W/compress.time .venv/bin/basel-edge compress --model $Q --task python-code \
     --method svd-llm --keep 0.6 --threads $THREADS -o $W/loss-0.6 --overwrite --quiet > $W/compress.log 2>&1 \
     || { echo compress failed; exit 1; }
fi
/usr/bin/time -v -o $W/ft-$V.time .venv/bin/basel-edge finetune $W/loss-0.6 --task $TASK --steps $STEPS \
   --seq-len 256 --batch-size 2 --loss $LOSS --schedule $SCHEDULE --threads $THREADS ${COMPILE:+--compile} -o $W/ft-$V --overwrite \
   --quiet > $W/ft-$V.log 2>&1 || { echo finetune failed; exit 1; }
.venv/bin/basel-edge export --target gguf $W/ft-$V -o $W/qwen-$V-q8_0.gguf --overwrite --quiet > $W/export-$V.log 2>&1 \
   || { echo export failed; exit 1; }
ARTIFACTS=$W/qwen-$V-q8_0.gguf
if [ -n "$DENSE_GGUF" ]; then
  [ -f $W/qwen-dense-q8_0.gguf ] || .venv/bin/basel-edge export --target gguf $Q -o $W/qwen-dense-q8_0.gguf \
     --overwrite --quiet >> $W/export-$V.log 2>&1 || { echo export dense failed; exit 1; }
  ARTIFACTS="$W/qwen-dense-q8_0.gguf $ARTIFACTS"
fi
.venv/bin/basel-edge validate --baseline $Q $ARTIFACTS --humaneval --limit 40 --reps 3 -o $W/he-$V \
   > $W/validate-$V.log 2>&1 || echo validate failed
echo finished > $W/done-$V
