#!/usr/bin/env bash
# The flagship conversion of the embedded default (SmolLM2-135M-Instruct) on one H100, as
# device-tool calls on one warm machine (each call at most 10 minutes):
#
#   bash benchmarks/flagship.sh code    # carry .whl .carry/p1: code and docs of installed
#                                       # packages; pass latency curves meanwhile
#   bash benchmarks/flagship.sh synth   # carry .carry/p2: self-distilled chats, time-limited
#   bash benchmarks/flagship.sh train   # frozen-AR conversion; the drafter comes back in $OUT
#   bash benchmarks/flagship.sh bench   # tidar bench, chat and HumanEval prompts
#   bash benchmarks/flagship.sh humaneval  # pass@1 of ar, lossless and mix betas
#
# Outputs land in $OUT (the device tool brings them back). Knobs: SYNTH_SECONDS, STEPS, RANK.
set -euo pipefail
. benchmarks/device_setup.sh
DATA=/root/data RUN=/root/run DRAFTER=/root/run/drafter.safetensors
OUT=${OUT:-/tmp/out}
tidar() { python3 -m tidar.cli "$@"; }

# Calibration prompts for the drafter's acceptance profile (not the bench's chat set).
CALIBRATE=(
  "Explain what a hash table is and when to use one."
  "Write a Python function that returns the n-th Fibonacci number."
  "What are three tips for writing a good email?"
  "Write a Python function that reverses the words in a sentence."
  "Summarize the water cycle in a few sentences."
  "Write a Python function that counts the vowels in a string."
  "What is the difference between a list and a tuple in Python?"
  "Give me a short plan for learning to cook."
)

case "$1" in
code)  # the GPU meanwhile measures the pass latency curves
  tidar data code --out $DATA/code --max-mb 150 --quiet > /tmp/code.log 2>&1 &
  python3 benchmarks/pass_latency.py --context 1024 --batch 1 4 16 64 --repeats 30 2>&1 \
    | grep -v Warning | tail -14
  wait
  cat /tmp/code.log
  ;;
synth)
  timeout "${SYNTH_SECONDS:-420}" python3 -m tidar.cli data synth --device cuda \
    --dtype bfloat16 --out $DATA/chat --num-prompts 200000 --batch-size 512 \
    --shard-size 2048 --greedy-fraction 0.9 --max-new-tokens 384 --quiet || true
  tidar data stats $DATA/chat $DATA/code --humaneval | tee "$OUT/data_stats.txt"
  ;;
train)
  args=()
  for p in "${CALIBRATE[@]}"; do args+=(--eval-prompt "$p"); done
  timeout 540 python3 -m tidar.cli convert --device cuda --mode frozen-ar --compile \
    --lora-rank "${RANK:-48}" --data $DATA/chat:0.7 $DATA/code:0.3 --out $RUN \
    --steps "${STEPS:-1400}" --warmup 100 --batch-size 64 --seq-len 512 \
    --eval-every 350 --save-every 350 "${args[@]}" 2>&1 | tr '\r' '\n' | grep -v "^convert:" \
    | tail -20 || true
  cp $DRAFTER $RUN/metrics.jsonl "$OUT/"
  ;;
bench)
  tidar bench --device cuda --compile --drafter $DRAFTER --prompt-set chat --num-prompts 8 \
    --batch-sizes 1,4,16,64 --max-new-tokens 256 --repeats 2 --betas 0.7,0.5,0.3 \
    --methods ar,lossless,mix,auto --out "$OUT/bench_chat" 2>&1 | grep -v Warning | tail -30
  tidar bench --device cuda --compile --drafter $DRAFTER --prompt-set humaneval \
    --num-prompts 16 --batch-sizes 1,16 --max-new-tokens 256 --repeats 2 --betas 0.5 \
    --methods ar,lossless,mix,auto --pass-repeats 0 --out "$OUT/bench_humaneval" 2>&1 \
    | grep -v Warning | tail -12
  ;;
humaneval)
  python3 benchmarks/humaneval_eval.py --drafter $DRAFTER --device cuda --dtype bfloat16 \
    --batch 32 --betas 0.9 0.7 0.5 0.3 2>&1 | tail -15
  tidar bench --device cuda --drafter $DRAFTER --prompt-set chat --num-prompts 4 \
    --batch-sizes 1,16 --max-new-tokens 128 --repeats 2 --methods hf,pld,ar,lossless \
    --pass-repeats 0 --out "$OUT/bench_hf" 2>&1 | grep -v Warning | tail -10
  ;;
*)
  echo "usage: $0 code|synth|train|bench|humaneval" >&2
  exit 2
  ;;
esac
