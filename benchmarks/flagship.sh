#!/usr/bin/env bash
# The flagship conversion of the embedded default (SmolLM2-135M-Instruct) on one H100, as
# device-tool calls on one warm machine (each call at most 10 minutes):
#
#   bash benchmarks/flagship.sh setup      # carry .whl .carry/b1: first half of GGUF+drafter
#   bash benchmarks/flagship.sh humaneval  # carry .whl .carry/b2: pass@1 of the shipped
#                                          # drafter (fp32: lossless is exact) for ar, lossless,
#                                          # mix betas; peers (hf, pld) against compiled ar;
#                                          # HumanEval-prompt speed per beta; code data meanwhile
#   bash benchmarks/flagship.sh code       # code and docs of installed packages; pass latency
#   bash benchmarks/flagship.sh synth      # self-distilled chats, time-limited
#   bash benchmarks/flagship.sh train      # MODE=frozen-ar|full conversion; drafter in $OUT
#                                          # when it fits (an adapter), metrics always
#   bash benchmarks/flagship.sh bench      # tidar bench, chat and HumanEval prompts
#   bash benchmarks/flagship.sh bench-resume  # the H200 chat bench of results section 3:
#                                          # its committed cells kept, the missing ones measured
#   bash benchmarks/flagship.sh compare    # both modes, same data and budget (STEPS, *_SECONDS)
#   bash benchmarks/flagship.sh eval-full  # the full-mode drafter: pass@1 and speed
#
# Outputs land in $OUT (the device tool brings them back). Knobs: SYNTH_SECONDS, STEPS, LORA_RANK,
# MODE, LR, TRAIN_SECONDS, BATCH (rows of 512 tokens a step), INIT (a drafter to continue).
set -euo pipefail
. benchmarks/device_setup.sh
DATA=/root/data MODE=${MODE:-frozen-ar} RUN=/root/run-${MODE:-frozen-ar}
DRAFTER=${DRAFTER:-$DRAFTER_SHIPPED}
OUT=${OUT:-/tmp/out}
tidar() { python3 -m tidar.cli "$@"; }

case "$1" in
setup)
  ls -l /root/parts
  ;;
humaneval)
  mkdir -p $DATA
  nohup python3 -m tidar.cli data code --out $DATA/code --max-mb 100 --quiet > $DATA/code.log 2>&1 &
  timeout 200 python3 -u benchmarks/humaneval_eval.py --drafter $DRAFTER --device cuda \
    --dtype float32 --batch 32 --workers 12 --betas 0.9 0.7 0.5 0.3 2> "$OUT/humaneval.log" \
    | tail -8 || echo "humaneval stopped: $?"
  timeout 220 python3 -m tidar.cli bench --device cuda --compile --drafter $DRAFTER \
    --prompt-set chat --num-prompts 4 --batch-sizes 1,4,16,64 --max-new-tokens 128 \
    --repeats 2 --methods hf,pld,ar --pass-repeats 0 --out "$OUT/bench_peers" 2>&1 \
    | grep -v Warning | tail -12 || true
  SYNTH_SECONDS=${SYNTH_SECONDS:-140} bash "$0" synth
  ;;
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
  # `data synth` drops chats containing a HumanEval prompt; the recount shows none is left.
  tidar data stats $DATA/chat $DATA/code --humaneval | tee "$OUT/data_stats.txt"
  ;;
train)
  args=()
  [ "$MODE" = full ] && args+=(--lr "${LR:-3e-5}")
  timeout "${TRAIN_SECONDS:-540}" python3 -m tidar.cli convert --device cuda --mode $MODE \
    --compile --lora-rank "${LORA_RANK:-48}" --data $DATA/chat:${CHAT:-0.7} $DATA/code:${CODE:-0.3} \
    --out $RUN --steps "${STEPS:-1400}" --warmup 100 --batch-size "${BATCH:-64}" --seq-len 512 \
    ${INIT:+--init-drafter "$INIT"} --eval-every "${EVAL_EVERY:-350}" \
    --save-every "${EVAL_EVERY:-350}" "${args[@]}" 2>&1 \
    | tr '\r' '\n' | grep -v "^convert:" | tail -20 || true
  cp $RUN/metrics.jsonl "$OUT/metrics_$MODE.jsonl"
  size=$(stat -c %s $RUN/drafter.safetensors)
  if [ "$MODE" = full ] && [ "${LORA_RANK:-48}" = 0 ]; then echo "drafter: $size bytes, stays here"
  else split -b 15M $RUN/drafter.safetensors "$OUT/drafter_$MODE.part."; fi
  ;;
compare)  # both modes on the same data and token budget, evaluations with the same prompts
  MODE=frozen-ar LORA_RANK=48 TRAIN_SECONDS=${FROZEN_SECONDS:-250} bash "$0" train
  MODE=full LORA_RANK=0 TRAIN_SECONDS=${FULL_SECONDS:-280} bash "$0" train
  # The chats come back compressed, so that a later session can carry them instead.
  tar -C $DATA -c chat | xz -T0 -6 | split -b 15M - "$OUT/chat.tar.xz."
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
bench-resume)
  mkdir -p "$OUT/bench_chat" && cp docs/results/bench/chat_h200/bench.json "$OUT/bench_chat/"
  tidar bench --device cuda --compile --drafter $DRAFTER --prompt-set chat --num-prompts 8 \
    --batch-sizes 1,4,16,64 --max-new-tokens 128 --repeats 2 --betas 0.7,0.5,0.3 \
    --methods hf,pld,ar,lossless,mix,auto --pass-repeats 0 --out "$OUT/bench_chat" --resume \
    2>&1 | grep -v Warning | tail -30
  ;;
eval-full)  # the full-mode drafter changes the AR model too: its own pass@1 and speed
  full=/root/run-full/drafter.safetensors
  timeout 240 python3 -u benchmarks/humaneval_eval.py --drafter $full --device cuda \
    --dtype float32 --batch 32 --workers 12 --methods ar lossless mix --betas 0.5 \
    --out humaneval_full.json 2> "$OUT/humaneval_full.log" | tail -4 || true
  for set in chat humaneval; do
    timeout 150 python3 -m tidar.cli bench --device cuda --compile --drafter $full \
      --prompt-set $set --num-prompts 8 --batch-sizes 1 --max-new-tokens 256 --repeats 1 \
      --betas 0.5 --methods ar,lossless,mix --pass-repeats 0 --out "$OUT/bench_full_$set" \
      2>&1 | grep -v Warning | tail -6 || true
  done
  ;;
*)
  echo "usage: $0 setup|humaneval|code|synth|train|compare|bench|bench-resume|eval-full" >&2
  exit 2
  ;;
esac
