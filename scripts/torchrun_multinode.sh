#!/bin/bash
# Multi-node training without a scheduler, with torchrun: run this on every node with the same MASTER_ADDR
# and its own NODE_RANK. Lightning reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR).
# It runs with the project's environment, <repository>/.venv (from `make install`); PYTHON=... for another one.
#
#   # node 0 (10.0.0.1) and node 1, 8 GPUs each:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash scripts/torchrun_multinode.sh configs/cifar10.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash scripts/torchrun_multinode.sh configs/cifar10.yaml
set -euo pipefail
CONFIG=${1:-configs/cifar10.yaml}
shift || true
# A config given relative to where the command runs stays valid after the cd below.
if [ -e "$CONFIG" ]; then CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"; fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root: configs/ and src/ resolve from here
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
if [ ! -x "$PYTHON" ]; then
    echo "error: no $PYTHON: run 'make install' in $PWD first, or set PYTHON=/path/to/python" >&2
    exit 2
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

# `python -m torch.distributed.run` is torchrun; it starts every worker with the same interpreter ($PYTHON).
"$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m src.main fit --config "$CONFIG" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE" --trainer.strategy ddp "$@"
