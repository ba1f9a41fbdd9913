#!/usr/bin/env bash
# bash tools/dist_run.sh NPROC SCRIPT [script args]: SCRIPT on NPROC processes per node through torchrun, with
# `--launcher pytorch` appended for the mmengine scripts. The one launcher behind detection/ and segmentation/'s
# dist_train.sh and dist_test.sh. With GPUs: one process per GPU, NCCL; without: NPROC CPU processes over gloo.
# Several nodes: NNODES, NODE_RANK, MASTER_ADDR and PORT (the same PORT on every node; default 29500).
set -e
if [ $# -lt 2 ]; then
    echo "usage: bash tools/dist_run.sh NPROC SCRIPT [script args]" >&2
    exit 2
fi
NPROC=$1
SCRIPT=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
REPO=$(cd "$(dirname "$0")/.." && pwd)

PYTHONPATH="$REPO":$PYTHONPATH \
exec python -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$NPROC" \
    --master_port="$PORT" \
    "$SCRIPT" --launcher pytorch "${@:3}"
