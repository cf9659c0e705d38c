#!/usr/bin/env bash
# On a machine WITH network: download the wheels scripts/gpu_check.sh may need on an offline CUDA machine.
# Every exact pin of constraints.txt except torch and triton (the GPU machine brings its own), their
# dependencies, and the build backend for `pip install --no-deps -e .`, into one folder to carry over:
#
#   scripts/gpu_wheels.sh [DIR]                       # default ./gpu_wheels, for this python and platform
#   PYVER=3.11 PLATFORM=manylinux_2_28_x86_64 scripts/gpu_wheels.sh DIR  # another python / platform
#
# Then, on the GPU machine:  WHEELS=DIR scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEST="${1:-${WHEELS:-./gpu_wheels}}"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { echo "gpu_wheels: no '$PY' on PATH; set PYTHON=/path/to/python" >&2; exit 2; }

# Requirement lines of constraints.txt, comments and blanks dropped, torch / triton left out.
mapfile -t PINS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' constraints.txt |
    awk -F'[<>=!~;[]' '$1 != "" { n = tolower($1); if (n != "torch" && n != "triton") print $0 }')
if [ "${#PINS[@]}" -eq 0 ]; then
    echo "gpu_wheels: no pins found in constraints.txt" >&2
    exit 2
fi

TARGET=()
if [ -n "${PLATFORM:-}" ] || [ -n "${PYVER:-}" ]; then
    # Another interpreter / platform than this one: binary wheels only (pip cannot build for it).
    TARGET=(--only-binary=:all:)
    if [ -n "${PLATFORM:-}" ]; then TARGET+=(--platform "$PLATFORM"); fi
    if [ -n "${PYVER:-}" ]; then TARGET+=(--python-version "$PYVER"); fi
fi

mkdir -p "$DEST"
echo "gpu_wheels: ${PINS[*]} setuptools>=68 wheel -> $DEST"
"$PY" -m pip download --dest "$DEST" ${TARGET[@]+"${TARGET[@]}"} "${PINS[@]}" "setuptools>=68" wheel
echo "gpu_wheels: $(find "$DEST" -maxdepth 1 -name '*.whl' | wc -l) wheels in $DEST"
echo "gpu_wheels: carry $DEST to the GPU machine and run: WHEELS=$DEST scripts/gpu_check.sh"
