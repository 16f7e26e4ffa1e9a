#!/usr/bin/env bash
# GPU device checks, in one go (~5-8 minutes on one H200): bash bench/gpu_check.sh
#
# What it runs, each step bounded in time, on after a failure, a PASS/FAIL summary at the end:
#   1. env     GPU, driver, torch and the packages the server imports
#   2. models  `python3 -m reranker_server make-test-models /tmp/gpu-models --full-size`
#              (MiniLM-L12 int8 ONNX for stage 1, MiniLM-L6-H384 for stage 2, random weights,
#              nothing downloaded; the real BERT tokenizer when one was carried, see below)
#   3. tests   the `gpu` tests (tests/test_gpu.py: detection, engine on CUDA, real OOM ->
#              stage 1, fp16 vs fp32 parity within 1e-3 on the full-size model, memory cap, the
#              auto plan on CUDA) and tests/test_plan.py (the plan with the fake device)
#   4. memcap  bench/gpu_memcap.py: the OOM ladder forced by a per-process memory fraction,
#              another process holding most of the card (3 GiB left: still on the GPU; 256 MiB
#              left: `low_vram` from stage 1; let go: the GPU again)
#   5. bench   bench/gpu_bench.py: stage 2 pairs/s and p50 for 10/100/1,000 candidates, fp32 vs
#              fp16 (with the largest score difference), a batch-size sweep
#   6. costs   bench/plan_costs.py --device cuda: the plan's warm-up estimates vs measured stage
#              times, and what RERANKER_STAGE1=auto would choose for 20 and 100 documents
#   7. e2e     bench/plan_e2e.py --device cuda: end-to-end p50 for 20 and 100 documents with
#              RERANKER_STAGE1=always vs auto (real `reranker-server serve` on 127.0.0.1)
#
# How to run it from a session that is lent a GPU (the device tool):
#   a. Here, once (needs pip and a Python with this project installed, e.g. the main .venv):
#        PIP_PYTHON=.venv/bin/python bash bench/gpu_check.sh --fetch-wheels
#      It downloads into .whl/ (git-ignored) the wheels the GPU image lacks -- fastapi,
#      starlette, pydantic, pydantic-core, pydantic-settings, python-dotenv, typing-inspection,
#      annotated-types, annotated-doc, typing-extensions, opentelemetry-api, uvicorn, FlashRank,
#      redis -- pinned to the versions installed in PIP_PYTHON, built for CPython 3.12 x86-64,
#      and copies the real BERT tokenizer (/work/shared/models/bert-base-uncased-tokenizer) into
#      .whl/tokenizer (about 5 MB in all). The device machine has no internet.
#   b. run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#      The reply's output_tail ends with the summary; the whole log and the summary come back as
#      $OUT/gpu_check.log and $OUT/gpu_check_summary.md. Then give_back.
#   c. Copy the tables into docs/gpu.md ("GPU figures") and the README.
#
# Environment: PYTHON (default python3, the one with torch there), GPU_CHECK_BUDGET_S (default
# 540: steps that would start past it are skipped), MODELS (default /tmp/gpu-models).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}

if [ "${1:-}" = "--fetch-wheels" ]; then
    PIP_PY=${PIP_PYTHON:-.venv/bin/python}
    mkdir -p .whl
    pins=$("$PIP_PY" - <<'EOF'
import importlib.metadata as m
names = """fastapi starlette pydantic pydantic_core pydantic-settings python-dotenv
typing-inspection annotated-types annotated-doc typing_extensions opentelemetry-api uvicorn
FlashRank redis""".split()
for name in names:
    try:
        print(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        pass
EOF
    ) || exit 1
    # shellcheck disable=SC2086  # one argument per pin
    "$PIP_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl $pins || exit 1
    tokenizer=/work/shared/models/bert-base-uncased-tokenizer
    if [ -d "$tokenizer" ]; then
        rm -rf .whl/tokenizer && cp -r "$tokenizer" .whl/tokenizer
    fi
    ls .whl && du -sh .whl
    exit 0
fi

OUT_DIR=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_check.log
SUMMARY=$OUT_DIR/gpu_check_summary.md
exec > >(tee "$LOG") 2>&1

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH=$ROOT
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "FAIL: installing .whl/*.whl"; exit 1; }
    export PYTHONPATH=/tmp/site:$ROOT
else
    echo "no .whl/ folder: fastapi, pydantic, flashrank, ... must already be installed" \
        "(fix: run 'bash bench/gpu_check.sh --fetch-wheels' here and carry .whl)"
fi
MODELS=${MODELS:-/tmp/gpu-models}
TOKENIZER_ARGS=()
[ -d .whl/tokenizer ] && TOKENIZER_ARGS=(--tokenizer .whl/tokenizer)

BUDGET=${GPU_CHECK_BUDGET_S:-540}
START=$SECONDS
declare -a RESULTS=()

# step NAME LIMIT_S COMMAND...: run with a time limit (never past the budget), record the result.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 30 ]; then
        RESULTS+=("| $name | SKIPPED | budget spent |")
        echo "=== $name: skipped (budget of ${BUDGET}s spent)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo
    echo "=== $name (at most ${limit}s): $*"
    local began=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local took=$((SECONDS - began))
    local verdict=PASS
    [ "$rc" -ne 0 ] && verdict="FAIL (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))"
    RESULTS+=("| $name | $verdict | ${took}s |")
    echo "=== $name: $verdict in ${took}s"
}

read -r -d '' ENV_PY <<'EOF'
import sys
import torch
import transformers, sentence_transformers, onnxruntime
import fastapi, pydantic, flashrank, uvicorn  # the carried wheels

print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available:", torch.cuda.is_available(), "|", torch.cuda.get_device_name(0))
print("transformers", transformers.__version__, "| sentence-transformers",
      sentence_transformers.__version__, "| onnxruntime", onnxruntime.__version__,
      "| fastapi", fastapi.__version__, "| pydantic", pydantic.__version__)
EOF
step nvidia-smi 30 nvidia-smi
step env 60 "$PY" -c "$ENV_PY"
if [ ! -d "$MODELS/cross-encoder" ]; then
    step models 240 "$PY" -m reranker_server make-test-models "$MODELS" --full-size \
        "${TOKENIZER_ARGS[@]}"
fi
step tests 200 env RERANKER_TEST_FULL_MODELS="$MODELS" "$PY" -m pytest -p no:cacheprovider -q \
    -m "gpu or not slow" tests/test_gpu.py tests/test_plan.py
step memcap 120 "$PY" bench/gpu_memcap.py --models "$MODELS"
step bench 150 "$PY" bench/gpu_bench.py --models "$MODELS" --repeats 5
step costs 120 "$PY" bench/plan_costs.py --models "$MODELS" --device cuda
step e2e 240 "$PY" bench/plan_e2e.py --models "$MODELS" --device cuda --requests 20

{
    echo "## bench/gpu_check.sh, $(date -u +%Y-%m-%dT%H:%MZ), $((SECONDS - START))s"
    echo
    echo "| step | result | time |"
    echo "|---|---|---|"
    printf '%s\n' "${RESULTS[@]}"
} | tee "$SUMMARY"
printf '%s\n' "${RESULTS[@]}" | grep -q "FAIL" && exit 1
exit 0
