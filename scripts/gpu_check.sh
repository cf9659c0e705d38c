#!/usr/bin/env bash
# GPU check of vtprune on a CUDA machine with torch and triton preinstalled and NO network.
#
#   [WHEELS=DIR] [OUT=DIR] [PYTHON=python] scripts/gpu_check.sh
#
# Works in the repository root (wherever it is called from). Missing dependencies (transformers, ...) are
# installed from WHEELS, a folder made by scripts/gpu_wheels.sh on a networked machine, and the package with
# `pip install --no-deps -e .`; this happens before the clock starts. Then four steps, each under `timeout`,
# BUDGET_S=295 seconds in all (about 5 minutes on an H200); a failing step does not stop the others:
#
#   tests    python -m pytest -q tests/kernels        with TRITON_INTERPRET=0: Triton compiled for CUDA
#            (the tests' conftest sets TRITON_INTERPRET=1 unless it is already set, so "0" is how to say
#            "not interpreted")
#   kernel   python -m vtprune.benchmarks.kernel_bench --device cuda --dtype bfloat16 --out $OUT/kernel
#   perf     vtprune perf --arch llava-1.5-7b --device cuda --dtype bfloat16 --keep 192,128,64 --rounds 5
#            --out $OUT/perf   (full depth, random weights)
#   summary  scripts/gpu_summary.py on $OUT/kernel/kernel.json and $OUT/perf/results.json, printed last:
#            Triton's share of the copy bandwidth per layout (target >= 80%), and the keep-64 speed-up,
#            oracle fraction (>= 95%) and the oracle's ideal fraction (>= 85%)
#
#   vllm     only where vLLM imports (a vLLM GPU build and the vtprune plugin installed; outside BUDGET_S, T_VLLM
#            seconds): python -m vtprune.vllm.bench --arch llava-1.5-7b --methods none,random,visionzip,divprune
#            --keep 64 --requests 64 --max-tokens 32 --dtype bfloat16 (full depth, random weights): requests/s,
#            output tokens/s and time to first token, pruned vs unpruned, served by vLLM. Skipped, not failed,
#            where vLLM does not import.
#
# Per-step limits (seconds): T_TESTS=75 T_KERNEL=50 T_PERF=150 T_SUMMARY=15 T_VLLM=240. Each step's output is also in
# $OUT/<step>.log. OUT defaults to ./gpu_out (relative to the repository root).
# Exit status: 0 every step passed; 1 a step failed or timed out, or a target was missed (listed at the end);
# 2 the machine cannot run the check (no CUDA, no triton, missing packages and no WHEELS).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT="${OUT:-./gpu_out}"
PY="${PYTHON:-python}"
BUDGET_S="${BUDGET_S:-295}"
T_TESTS="${T_TESTS:-75}"
T_KERNEL="${T_KERNEL:-50}"
T_PERF="${T_PERF:-150}"
T_SUMMARY="${T_SUMMARY:-15}"
T_VLLM="${T_VLLM:-240}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=0 PYTHONUNBUFFERED=1

die() {
    echo "gpu_check: $*" >&2
    exit 2
}

# ------------------------------------------------------------------------------------------------ machine
command -v "$PY" >/dev/null || die "no '$PY' on PATH; set PYTHON=/path/to/python"
"$PY" - <<'EOF' || die "this check needs torch with a visible CUDA GPU (see the line above)"
import sys
try:
    import torch
except ImportError as err:
    sys.exit(f"torch does not import: {err}")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no CUDA device; "
             "check nvidia-smi and CUDA_VISIBLE_DEVICES")
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
EOF
"$PY" -c "import triton; print('gpu_check: triton', triton.__version__)" ||
    die "triton does not import; install the triton wheel that matches this torch (pip show torch lists it)"

# ------------------------------------------------------------------------------------------- dependencies
# Distributions the four steps import (module:distribution), torch and triton excepted.
missing=$("$PY" - <<'EOF'
import importlib.util
mods = {"transformers": "transformers", "tokenizers": "tokenizers", "safetensors": "safetensors",
        "huggingface_hub": "huggingface_hub", "numpy": "numpy", "PIL": "pillow", "yaml": "pyyaml",
        "tqdm": "tqdm", "matplotlib": "matplotlib", "pytest": "pytest", "hypothesis": "hypothesis"}
print(" ".join(dist for mod, dist in mods.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
    if [ -z "${WHEELS:-}" ]; then
        die "missing packages: $missing. Make a wheel folder on a networked machine with" \
            "scripts/gpu_wheels.sh, carry it here and run WHEELS=DIR $0"
    fi
    [ -d "$WHEELS" ] || die "WHEELS=$WHEELS is not a folder"
    # The exact pins, torch and triton left out so pip never touches the preinstalled ones.
    pins="$(mktemp)"
    trap 'rm -f "$pins"' EXIT
    grep -Eiv '^[[:space:]]*(torch|triton)[[:space:]]*([<>=!~;[]|$)' constraints.txt >"$pins"
    echo "gpu_check: installing $missing from $WHEELS"
    "$PY" -m pip install --no-index --find-links "$WHEELS" -c "$pins" $missing ||
        die "pip could not install $missing from $WHEELS (made for another python or platform?)"
fi
here="$(pwd -P)"
installed=$(cd / && "$PY" -c "import os, vtprune; print(os.path.dirname(os.path.dirname(os.path.realpath(
    vtprune.__file__))))" 2>/dev/null || true)  # where this python imports vtprune from, seen from outside
if [ "$installed" != "$here" ]; then
    echo "gpu_check: installing this checkout: pip install --no-deps -e ."
    if [ -n "${WHEELS:-}" ]; then  # the build backend, offline
        "$PY" -m pip install --no-index --find-links "$WHEELS" "setuptools>=68" wheel >/dev/null || true
    fi
    "$PY" -m pip install --no-deps --no-build-isolation -e . ||
        die "pip install --no-deps -e . failed (it needs setuptools>=68 and wheel;" \
            "a WHEELS folder from scripts/gpu_wheels.sh has them)"
fi

# ------------------------------------------------------------------------------------------------- steps
mkdir -p "$OUT"
START=$SECONDS
FAILED=()

run_step() {  # run_step NAME LIMIT_S COMMAND...: runs it under timeout, output to the terminal and NAME.log
    local name=$1 limit=$2
    shift 2
    # The summary's seconds are kept back from the budget, so it always runs.
    local left=$((BUDGET_S - T_SUMMARY - (SECONDS - START)))
    if [ "$name" != summary ] && [ "$limit" -gt "$left" ]; then limit=$left; fi
    if [ "$limit" -lt 5 ]; then
        echo "=== [$name] skipped: the ${BUDGET_S}s budget is spent"
        FAILED+=("$name (skipped, no time left)")
        return 0
    fi
    echo "=== [$name] $* (timeout ${limit}s)"
    local t0=$SECONDS rc=0
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
    local took=$((SECONDS - t0))
    if [ "$rc" -eq 0 ]; then
        echo "=== [$name] ok (${took}s)"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "=== [$name] TIMED OUT after ${limit}s"
        FAILED+=("$name (timed out after ${limit}s)")
    elif [ "$name" = summary ] && [ "$rc" -eq 3 ]; then
        FAILED+=("summary (a target was missed or a kernel result was wrong: see the table)")
    else
        echo "=== [$name] FAILED (exit $rc, ${took}s)"
        FAILED+=("$name (exit $rc)")
    fi
}

run_step tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider tests/kernels
run_step kernel "$T_KERNEL" "$PY" -m vtprune.benchmarks.kernel_bench --device cuda --dtype bfloat16 \
    --out "$OUT/kernel"
# `python -m vtprune.cli perf` is `vtprune perf`, run by this python whatever PATH holds.
run_step perf "$T_PERF" "$PY" -m vtprune.cli perf --arch llava-1.5-7b --device cuda --dtype bfloat16 \
    --keep 192,128,64 --rounds 5 --out "$OUT/perf"
run_step summary "$T_SUMMARY" "$PY" scripts/gpu_summary.py --kernel "$OUT/kernel/kernel.json" \
    --perf "$OUT/perf/results.json"

if "$PY" -c "import vllm" >/dev/null 2>&1; then
    BUDGET_S=$((SECONDS - START + T_SUMMARY + T_VLLM))  # its own time, after the budgeted steps
    run_step vllm "$T_VLLM" "$PY" -m vtprune.vllm.bench --arch llava-1.5-7b --methods none,random,visionzip,divprune \
        --keep 64 --requests 64 --max-tokens 32 --dtype bfloat16
else
    echo "=== [vllm] skipped: vllm does not import here (the serving throughput needs a vLLM build for this GPU)"
fi

echo "gpu_check: $((SECONDS - START))s for the steps; logs and results in $OUT"
if [ "${#FAILED[@]}" -gt 0 ]; then
    printf 'gpu_check: FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "gpu_check: every step passed"
