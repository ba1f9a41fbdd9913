#!/usr/bin/env bash
# One-shot GPU check of ScalableViT: run it first thing on a CUDA machine (< 8 minutes on one H100).
#
#   bash benchmarks/device_check.sh                 # results in $OUT if set, else benchmarks/results/device_check-<time>/
#   bash benchmarks/device_check.sh --out DIR       # results in DIR
#   bash benchmarks/device_check.sh --dry-run       # every step on CPU with tiny sizes (what CI runs)
#   bash benchmarks/device_check.sh --only correctness throughput
#
# Writes device_check.json, device_check.md and device_check.log; exits non-zero when a step failed.
# The steps and their options: python benchmarks/device_check.py --help
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
exec "$PYTHON" benchmarks/device_check.py "$@"
