#!/usr/bin/env bash
# bash dist_train.sh CONFIG GPUS [train.py options]: one process per GPU (CPU processes over gloo without GPUs).
# NNODES, NODE_RANK, MASTER_ADDR, PORT for several nodes (tools/dist_run.sh).
set -e
[ $# -ge 2 ] || { echo "usage: bash dist_train.sh CONFIG GPUS [train.py options]" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
exec bash "$HERE/../tools/dist_run.sh" "$2" "$HERE/train.py" "$1" "${@:3}"
