#!/usr/bin/env bash
# The gpu tier and the GPU figures in one command, on a machine with a CUDA GPU:
#
#     bash benchmarks/gpu_check.sh [RESULTS_FILE]     (default: gpu-check-results.md)
#
# 1. installs the project with the gpu extra (bitsandbytes) into .venv if it is not there;
# 2. runs the gpu test tier (tests/gpu: NF4 and int8 LoRA training, bf16 with and without
#    gradient checkpointing, SIGTERM resume, distillation with a 4-bit teacher);
# 3. measures training tokens/s and peak memory in bf16, NF4 and int8, and the checkpoint
#    overhead (benchmarks/gpu_figures.py);
# 4. measures serving tokens/s through vLLM when the serving environment .venv-serve exists.
#
# Every step has its own time limit, so the whole stays under 10 minutes; the results file
# gets the GPU's name, the test outcomes and the figures, whatever failed on the way.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check-results.md}
PY=.venv/bin/python
WORK=$(mktemp -d -t cheapspot-gpu-check-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)

if [ ! -x "$PY" ]; then
    make venv || { echo "gpu_check: could not create .venv" >&2; exit 1; }
fi
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA device here; nothing to check" >&2
    exit 2
fi
if ! "$PY" -c 'import bitsandbytes' 2>/dev/null; then
    .venv/bin/uv pip install --python "$PY" -q -e '.[operator,worker,dev,gpu]' ||
        echo "gpu_check: bitsandbytes could not be installed; NF4/int8 will be skipped" >&2
fi

{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    "$PY" -c 'import bitsandbytes as b; print("bitsandbytes", b.__version__)' 2>&1 | tail -1
    echo '```'
} > "$OUT"

echo "== gpu tier"
timeout 330 "$PY" -m pytest -p no:cacheprovider -m gpu tests/gpu -rA -q 2>&1 | tee "$WORK/tests.log"
tests_rc=${PIPESTATUS[0]}
{
    echo
    echo "## gpu tier (exit $tests_rc)"
    echo
    echo '```'
    grep -E '^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed' "$WORK/tests.log" | tail -30
    echo '```'
} >> "$OUT"

echo "== training figures"
timeout 180 "$PY" benchmarks/gpu_figures.py --out "$WORK/figures.json"
figures_rc=$?
{
    echo
    echo "## training figures (exit $figures_rc)"
    echo
    echo '```json'
    cat "$WORK/figures.json" 2>/dev/null || echo "{}"
    echo '```'
} >> "$OUT"

if [ -x .venv-serve/bin/python ]; then
    echo "== serving figures"
    "$PY" -m cheapspot_worker.tiny model "$WORK/serve-model" --arch qwen2 --hidden 1024 --layers 8 >/dev/null
    timeout 150 .venv-serve/bin/python benchmarks/gpu_serving.py --model "$WORK/serve-model" \
        --out "$WORK/serving.json"
    serving="exit $?"
else
    serving="skipped: no .venv-serve (the serving environment) here"
fi
{
    echo
    echo "## serving through vLLM ($serving)"
    echo
    echo '```json'
    cat "$WORK/serving.json" 2>/dev/null || echo "{}"
    echo '```'
    echo
    echo "Took $(( $(date +%s) - started )) s."
} >> "$OUT"
echo "results: $OUT"
[ "$tests_rc" -eq 0 ] && [ "$figures_rc" -eq 0 ]
