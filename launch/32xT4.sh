#!/usr/bin/env bash
# 32 T4 GPUs: 4 nodes x 8; mixed precision fp16 (decided on each node from the GPUs).
#   sbatch -A <account> launch/32xT4.sh configs/data/imagenet.toml configs/train/resnet50-sgd.toml [--set k=v ...]
# Submit from the repository root. GPU type names in --gres and the CPU count follow common
# cluster conventions: adjust them to your cluster's, or override them on the sbatch command line.
#SBATCH --job-name=imagenet-32xT4
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:t4:8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
# SIGUSR1 ten minutes before the time limit: training writes a checkpoint, the job requeues.
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
cd "${SLURM_SUBMIT_DIR:-.}" || exit 2
exec bash launch/slurm_job.sh "$@"
