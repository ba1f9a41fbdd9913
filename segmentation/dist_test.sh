#!/usr/bin/env bash
# bash dist_test.sh CONFIG CHECKPOINT GPUS [--aug-test] [--eval mIoU] [test.py options]: one process per GPU
# (CPU processes over gloo without GPUs). NNODES, NODE_RANK, MASTER_ADDR, PORT for several nodes (tools/dist_run.sh).
set -e
[ $# -ge 3 ] || { echo "usage: bash dist_test.sh CONFIG CHECKPOINT GPUS [test.py options]" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
exec bash "$HERE/../tools/dist_run.sh" "$3" "$HERE/test.py" "$1" "$2" "${@:4}"
