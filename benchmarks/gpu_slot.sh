#!/usr/bin/env bash
# One lent GPU slot, prepared (about 15 minutes of device time in all, one command at most 10,
# 64 MiB carried): everything the GPU issue measures, in order of value, each step under its
# own timeout so a failure costs only its step. Writes under $OUT (default gpu-out/):
#   check/            float64 graph vs eager meta-gradients per recipe, graph vs eager timings
#   bench-<preset>/   graph vs eager ms per iteration of the other paper rows
#   profile-20w1s/    torch profiler table of the eager 20-way 1-shot iteration (its kernels)
#   5w1s-seed<S>/     paper-omniglot-5w1s trained until MINUTES, scored on the GPU (eval.json)
# Carry: data/prepared/omniglot (make gpu-slot-files) and gpu-wheels/ (pydantic for the GPU
# machine's Python). Try it on the CPU first: DEVICE=cpu SMOKE=1 benchmarks/gpu_slot.sh
# (tiny iteration counts, the same code paths but capture). Continue a run in the next slot by
# carrying its folder back to $OUT/5w1s-seed<S>/: the same command resumes it.
set -u
OUT=${OUT:-gpu-out}
DEVICE=${DEVICE:-cuda}
SEED=${SEED:-0}
MINUTES=${MINUTES:-4}
SMOKE=${SMOKE:-}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -d gpu-wheels ] && ! "$PY" -c "import pydantic" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --find-links gpu-wheels --target /tmp/gpu-py pydantic \
    >"$OUT/pip.log" 2>&1
  export PYTHONPATH=/tmp/gpu-py${PYTHONPATH:+:$PYTHONPATH}
fi
run() { # timeout_s name args...: one step, its log in $OUT/<name>.log
  local limit=$1 name=$2
  shift 2
  echo "== $name ($(date +%T))"
  timeout "$limit" "$PY" benchmarks/gpu_train.py --device "$DEVICE" ${PREPARED:+--prepared "$PREPARED"} \
    "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $? ($(date +%T)); $(tail -n 1 "$OUT/$name.log")"
}
if [ -n "$SMOKE" ]; then
  ITERS="--bench-iters 2 --warmup 2" PROFILE=2 EVAL="--eval-limit 5" TRAIN="--iterations 4 --log-every 2"
else
  ITERS="--bench-iters 50" PROFILE=20 EVAL="" TRAIN=""
fi
run 150 check --preset paper-omniglot-5w1s --out "$OUT/check" --minutes 0 --check \
  --bench graph batched $ITERS
for preset in paper-omniglot-20w1s paper-omniglot-5w5s paper-omniglot-20w5s; do
  run 90 "bench-$preset" --preset "$preset" --out "$OUT/bench-$preset" --minutes 0 \
    --bench graph batched $ITERS
done
run 90 profile-20w1s --preset paper-omniglot-20w1s --out "$OUT/profile-20w1s" --minutes 0 \
  --strategy batched --profile "$PROFILE" $ITERS
run $((60 * MINUTES + 150)) "5w1s-seed$SEED" --preset paper-omniglot-5w1s --seed "$SEED" \
  --out "$OUT/5w1s-seed$SEED" --minutes "$MINUTES" --evaluate $EVAL $TRAIN
