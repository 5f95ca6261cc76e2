#!/bin/bash
# Multi-node training without a scheduler, with torchrun: run this on every node with the same MASTER_ADDR
# and its own NODE_RANK. Lightning reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR).
#
#   # node 0 (10.0.0.1) and node 1, 8 GPUs each:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash scripts/torchrun_multinode.sh configs/cifar10.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash scripts/torchrun_multinode.sh configs/cifar10.yaml
set -euo pipefail
CONFIG=${1:-configs/cifar10.yaml}
shift || true
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}

torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m src.main fit --config "$CONFIG" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE" --trainer.strategy ddp "$@"
