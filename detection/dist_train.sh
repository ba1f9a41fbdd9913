#!/usr/bin/env bash
# bash dist_train.sh CONFIG GPUS [train.py options]
# One process per GPU through torchrun; with no GPU, GPUS CPU processes over gloo. NNODES, NODE_RANK, PORT and
# MASTER_ADDR set a multi-node run.
set -e
if [ $# -lt 2 ]; then
    echo "usage: bash dist_train.sh CONFIG GPUS [train.py options]" >&2
    exit 2
fi
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-$((29500 + RANDOM % 1000))}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
HERE=$(cd "$(dirname "$0")" && pwd)

PYTHONPATH="$HERE/..":$PYTHONPATH \
python -m torch.distributed.run \
    --nnodes=$NNODES \
    --node_rank=$NODE_RANK \
    --master_addr=$MASTER_ADDR \
    --nproc_per_node=$GPUS \
    --master_port=$PORT \
    "$HERE/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
