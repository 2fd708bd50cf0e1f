#!/usr/bin/env bash
# Two nodes, one training process on the CPUs of each, no GPUs, fp32: rehearse a multi-node job (a
# rendezvous across hosts, one checkpoint per job, the requeue) on a CPU partition or a test cluster,
# through the same batch job and node launcher as the GPU profiles.
#   sbatch -A <account> launch/2x1CPU.sh configs/data/imagenet.toml configs/train/resnet50-sgd.toml [--set k=v ...]
# Submit from the repository root, on a file system every node sees (the run directory is shared).
#SBATCH --job-name=imagenet-2x1CPU
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
# SIGUSR1 ten minutes before the time limit: training writes a checkpoint, the job requeues.
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
cd "${SLURM_SUBMIT_DIR:-.}" || exit 2
exec bash launch/slurm_job.sh --cpu-processes 1 "$@"
