#!/usr/bin/env bash
# One-shot GPU check of ScalableViT: run it first thing on a CUDA machine (< 8 minutes on one H200).
#
#   bash benchmarks/device_check.sh                 # results in $OUT if set, else benchmarks/results/device_check-<time>/
#   bash benchmarks/device_check.sh --out DIR       # results in DIR
#   bash benchmarks/device_check.sh --dry-run       # every step on CPU with tiny sizes (what CI runs)
#   bash benchmarks/device_check.sh --only correctness throughput
#
# The interpreter: $PYTHON if set, else `python` if there is one, else `python3`. Wheels in .whl/ at the repository
# root (benchmarks/fetch_device_wheels.sh fills it, for a machine without a package index) are installed first
# into /tmp/site, which goes first on PYTHONPATH ($DEVICE_CHECK_WHEELS and $DEVICE_CHECK_SITE change the two).
# Writes device_check.json, device_check.md and device_check.log; exits non-zero when a step failed.
# The steps and their options: python3 benchmarks/device_check.py --help
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
wheel_dir="${DEVICE_CHECK_WHEELS:-.whl}"
site="${DEVICE_CHECK_SITE:-/tmp/site}"
shopt -s nullglob
wheels=("$wheel_dir"/*.whl)
shopt -u nullglob
if (( ${#wheels[@]} )); then
    echo "[device_check] installing ${#wheels[@]} wheel(s) from $wheel_dir into $site (first on PYTHONPATH)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "${wheels[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" benchmarks/device_check.py "$@"
