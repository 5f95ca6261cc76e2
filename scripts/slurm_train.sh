#!/bin/bash
# SLURM batch job: one task per GPU, Lightning's SLURM integration (it reads SLURM_* variables itself), automatic
# requeue when the time limit nears. Submit from the repository root (it holds .venv, from `make install`):
#
#   sbatch scripts/slurm_train.sh                                  # CIFAR-10, 1 node x 8 GPUs
#   sbatch scripts/slurm_train.sh configs/cifar10.yaml --trainer.max_steps 400000
#   sbatch --nodes 2 scripts/slurm_train.sh configs/cifar10.yaml   # 2 nodes (also edit --ntasks-per-node)
#
# Each job writes to its own folder, runs/slurm-<job id>/ (RUNS_DIR=... changes runs/), and resumes only from it:
# SLURM keeps the job id across requeues, so a requeued job continues its own run and a new job starts afresh,
# whatever other runs lie beside it. SLURM sends SIGUSR1 90 s before the time limit (--signal); Lightning's
# SLURMEnvironment then saves hpc_ckpt_N.ckpt in that folder (atomically, through our checkpoint IO) and requeues
# the job. On (re)start the job resumes from the newest of that folder's hpc_ckpt_*.ckpt and last.ckpt (the one
# our SIGTERM handler writes on preemption), if any. To continue a finished run in a new job, pass its checkpoint:
# `sbatch scripts/slurm_train.sh CONFIG --ckpt_path runs/slurm-123/<run_name>/version_<N>/checkpoints/last.ckpt`
# (used for the first start only; a requeue of the new job resumes from the new job's own folder).
#
# The log goes to <job name>-<job id>.out in the submit directory: SLURM opens it before this script runs, so it
# must be in a folder that exists (a path under runs/ fails on a fresh clone).
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
#SBATCH --output=%x-%j.out

set -euo pipefail
CONFIG=${1:-configs/cifar10.yaml}
shift || true
cd "${SLURM_SUBMIT_DIR:-.}"
: "${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch scripts/slurm_train.sh}"

# The project's environment (make install); PYTHON=... for another one. srun runs this same file on every node.
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
if [ ! -x "$PYTHON" ]; then
    echo "error: no $PYTHON: run 'make install' in $PWD first, or set PYTHON=/path/to/python" >&2
    exit 2
fi
for arg in "$@"; do
    if [ "${arg%%=*}" = "--trainer.default_root_dir" ]; then
        echo "error: this script sets --trainer.default_root_dir to \$RUNS_DIR/slurm-<job id>: set RUNS_DIR instead" >&2
        exit 2
    fi
done

ROOT="${RUNS_DIR:-runs}/slurm-${SLURM_JOB_ID}"

# Resume this job's own run, from its newest checkpoint: Lightning's hpc_ckpt_N.ckpt (saved on SIGUSR1, in the
# default_root_dir) or a last.ckpt under <run_name>/version_*/checkpoints/. Nothing outside $ROOT is looked at.
newest() { ls -t "$@" 2>/dev/null | head -n 1 || true; }
HPC=$(newest "$ROOT"/hpc_ckpt_*.ckpt)
LAST=$(newest "$ROOT"/*/*/checkpoints/last.ckpt)
RESUME=()
if [ -n "$HPC" ] && { [ -z "$LAST" ] || [ "$HPC" -nt "$LAST" ]; }; then
    RESUME=(--ckpt_path hpc)  # Lightning loads the highest-numbered hpc_ckpt_N.ckpt of default_root_dir
    echo "resuming job ${SLURM_JOB_ID} from $HPC" >&2
elif [ -n "$LAST" ]; then
    RESUME=(--ckpt_path last)  # src.main resolves it to the newest last.ckpt of this run under $ROOT
    echo "resuming job ${SLURM_JOB_ID} from $LAST" >&2
fi

# srun starts one process per GPU; Lightning picks up rank and world size from SLURM. The resume flags come after
# the user's arguments, so that on a requeue they replace a --ckpt_path given for the first start.
srun "$PYTHON" -m src.main fit --config "$CONFIG" \
    --trainer.num_nodes "$SLURM_NNODES" --trainer.devices "$SLURM_NTASKS_PER_NODE" --trainer.strategy ddp \
    --trainer.default_root_dir "$ROOT" "$@" ${RESUME[@]+"${RESUME[@]}"}
