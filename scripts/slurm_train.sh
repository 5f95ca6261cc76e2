#!/bin/bash
# SLURM batch job: one task per GPU, Lightning's SLURM integration (it reads SLURM_* variables itself), automatic
# requeue when the time limit nears. SLURM sends SIGUSR1 90 s before the limit (--signal); Lightning's
# SLURMEnvironment then saves runs/hpc_ckpt_N.ckpt (atomically, through our checkpoint IO) and requeues the job,
# and the requeued job resumes from it.
#
#   sbatch scripts/slurm_train.sh                                  # CIFAR-10, 1 node x 8 GPUs
#   sbatch --nodes 2 scripts/slurm_train.sh configs/cifar10.yaml   # 2 nodes (also edit --ntasks-per-node)
#
#SBATCH --job-name=ddim-lightning
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm-%j.out

set -euo pipefail
CONFIG=${1:-configs/cifar10.yaml}
shift || true
cd "${SLURM_SUBMIT_DIR:-.}"
source .venv/bin/activate

# A requeued job: Lightning resumes by itself from the hpc_ckpt_*.ckpt it saved on SIGUSR1 in
# --trainer.default_root_dir (runs/). Without one, resume from this run's newest last.ckpt if there is one.
RESUME=()
RUN_NAME=$(python - "$CONFIG" <<'PY'
import sys, yaml
print(yaml.safe_load(open(sys.argv[1])).get("run_name", "ddpm"))
PY
)
if ! compgen -G "runs/hpc_ckpt_*.ckpt" > /dev/null && compgen -G "runs/${RUN_NAME}/*/checkpoints/last.ckpt" > /dev/null; then
    RESUME=(--ckpt_path last)
fi

# srun starts one process per GPU; Lightning picks up rank and world size from SLURM.
srun python -m src.main fit --config "$CONFIG" \
    --trainer.num_nodes "$SLURM_NNODES" --trainer.devices "$SLURM_NTASKS_PER_NODE" --trainer.strategy ddp \
    "${RESUME[@]}" "$@"
