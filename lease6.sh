#!/bin/bash
# Session 24 lease 6: full mode's step profiled, flex tiles autotuned (as committed).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:$PWD/benchmarks
OUT=$OUT/prof timeout 200 python benchmarks/train_throughput.py --modes full --batch 128 --compile on --steps 8 --profile 2 > $OUT/prof.log 2>&1
echo "rc=$?"; grep -v "^AUTOTUNE\|^  triton\|^{\"num\|SingleProcess" $OUT/prof.log | tail -30
