#!/usr/bin/env bash
# bash tools/dist_run.sh NPROC SCRIPT [script args]: SCRIPT on NPROC processes per node through torchrun, with
# `--launcher pytorch` appended for the mmengine scripts. The one launcher behind detection/ and segmentation/'s
# dist_train.sh and dist_test.sh. With GPUs: one process per GPU, NCCL; without: NPROC CPU processes over gloo.
# Several nodes: NNODES, NODE_RANK, MASTER_ADDR and PORT (the same PORT on every node; default 29500). On one node
# a free port is picked when PORT is not set.
set -e
if [ $# -lt 2 ]; then
    echo "usage: bash tools/dist_run.sh NPROC SCRIPT [script args]" >&2
    exit 2
fi
NPROC=$1
SCRIPT=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [ -z "$PORT" ]; then
    if [ "$NNODES" = 1 ]; then  # a free port, so that two runs on one machine do not collide
        PORT=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    else
        PORT=29500  # every node must use the same one
    fi
fi
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
REPO=$(cd "$(dirname "$0")/.." && pwd)

export PYTHONPATH="$REPO":$PYTHONPATH
export PYTHONFAULTHANDLER=${PYTHONFAULTHANDLER:-1}  # a process that crashes prints its Python stack
# The start-up checks (command line, config, data, checkpoint) run once, in one process, before any is started:
# a problem is one line, not one per process. A SIGTERM / SIGUSR1 meanwhile (SLURM signals the whole job) ends the
# command with the requeue status 75 before anything starts; from tools/torchrun.py on, the processes handle it.
stop=
trap 'stop=SIGTERM' TERM
trap 'stop=SIGUSR1' USR1
status=0
python "$SCRIPT" "${@:3}" --preflight || status=$?
if [ -n "$stop" ]; then
    echo "stopped by $stop before the processes started; nothing to save; run the same command again" >&2
    exit 75
fi
[ "$status" = 0 ] || exit "$status"
trap - TERM USR1
SCALABLEVIT_PREFLIGHT_DONE=1 \
exec python "$REPO/tools/torchrun.py" \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$NPROC" \
    --master_port="$PORT" \
    "$SCRIPT" --launcher pytorch "${@:3}"
