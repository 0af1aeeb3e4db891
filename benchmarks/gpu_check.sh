#!/usr/bin/env bash
# GPU check of MAML meta-training on a CUDA machine (written for an H100).
#
# Run from the repository root with a Python that has torch with CUDA:
#     bash benchmarks/gpu_check.sh
# Run on a CPU only to smoke-test: PYTHON=.venv/bin/python DEVICE=cpu ITERS=1 REPEATS=1 \
#     META_BATCH=4 bash benchmarks/gpu_check.sh
#
# Installs nothing but higher==0.2.1 (--no-deps, never touching torch), and only when it is
# missing and pip can fetch it; otherwise the benchmarks run with --no-higher. Steps, each under
# its own timeout: nvidia-smi -L; float64 meta-gradient check batched vs loop (BN on, second
# order); the benchmark at 1 and 15 query images per class (paper config, meta-batch 32) with the
# paper-run estimate; the 1-query benchmark again with cudnn.benchmark on. Expected (not yet
# measured) total on an H100: 1-2 minutes, mostly python/CUDA start-up; each step is capped at
# STEP_TIMEOUT=120 s. Everything goes to stdout and to
# ${OUT:-/tmp}/gpu_check.log. Exit status: 1 if any step failed (the later steps still run).
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
ITERS="${ITERS:-5}"
REPEATS="${REPEATS:-5}"
META_BATCH="${META_BATCH:-32}"
STEP_TIMEOUT="${STEP_TIMEOUT:-120}"
LOG="${OUT:-/tmp}/gpu_check.log"
mkdir -p "$(dirname "$LOG")"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

failed=()

step() { # step NAME CMD...: run CMD under the step timeout, record a failure, carry on
    local name="$1" rc=0 t0=$SECONDS
    shift
    echo
    echo "=== $name: $*"
    timeout "$STEP_TIMEOUT" "$@" || rc=$?
    echo "=== $name: rc=$rc, $((SECONDS - t0)) s"
    if [ "$rc" -ne 0 ]; then failed+=("$name (rc=$rc)"); fi
}

main() {
    echo "gpu_check.sh: $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi -L || echo "nvidia-smi -L failed"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available())'

    local higher_flag=()
    if ! "$PY" -c 'import higher' 2>/dev/null; then
        local carried
        carried="$(ls -d .venv/lib/python3*/site-packages/higher 2>/dev/null | head -n 1 || true)"
        if [ -n "$carried" ]; then
            mkdir -p /tmp/gpu_check_pkgs
            cp -r "$carried" /tmp/gpu_check_pkgs/
            export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_pkgs"
            echo "higher: using the carried copy $carried"
        elif timeout 60 "$PY" -m pip install --quiet --no-deps --retries 0 --timeout 5 \
            higher==0.2.1; then
            echo "higher: installed higher==0.2.1 with pip"
        else
            echo "higher: not available (pip failed), running with --no-higher"
        fi
        if ! "$PY" -c 'import higher' 2>/dev/null; then higher_flag=(--no-higher); fi
    fi

    local bench=("$PY" benchmarks/bench_meta_train.py --device "$DEVICE" --iters "$ITERS"
        --repeats "$REPEATS" --meta-batch "$META_BATCH" --paper-run-estimate
        ${higher_flag[@]+"${higher_flag[@]}"})
    step "grad check" "$PY" benchmarks/bench_meta_train.py --device "$DEVICE" --check-grad
    step "bench query 1" "${bench[@]}" --query 1
    step "bench query 15" "${bench[@]}" --query 15
    step "bench query 1, cudnn.benchmark" "${bench[@]}" --query 1 --cudnn-benchmark

    echo
    echo "gpu_check.sh: done in ${SECONDS} s"
    if [ "${#failed[@]}" -ne 0 ]; then
        printf 'FAILED: %s\n' "${failed[@]}"
        return 1
    fi
    echo "all steps passed"
}

main 2>&1 | tee "$LOG"
