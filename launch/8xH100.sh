#!/usr/bin/env bash
# 8 H100 GPUs on one node; mixed precision bf16 (decided on each node from the GPUs).
#   sbatch -A <account> launch/8xH100.sh configs/data/imagenet.toml configs/train/resnet50-sgd.toml [--set k=v ...]
# Submit from the repository root. GPU type names in --gres and the CPU count follow common
# cluster conventions: adjust them to your cluster's, or override them on the sbatch command line.
#SBATCH --job-name=imagenet-8xH100
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:h100:8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
# SIGUSR1 ten minutes before the time limit: training writes a checkpoint, the job requeues.
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
cd "${SLURM_SUBMIT_DIR:-.}" || exit 2
exec bash launch/slurm_job.sh "$@"
