#!/usr/bin/env bash
# one GPU of any kind; mixed precision bf16 from Ampere on, fp16 before (decided on each node from the GPUs).
#   sbatch -A <account> launch/1xGPU.sh configs/data/imagenet.toml configs/train/resnet50-sgd.toml [--set k=v ...]
# Submit from the repository root. GPU type names in --gres and the CPU count follow common
# cluster conventions: adjust them to your cluster's, or override them on the sbatch command line.
#SBATCH --job-name=imagenet-1xGPU
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
# SIGUSR1 ten minutes before the time limit: training writes a checkpoint, the job requeues.
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
cd "${SLURM_SUBMIT_DIR:-.}" || exit 2
# One GPU takes the whole global batch: train.micro_batch_size=auto finds the micro-batch that
# fits and accumulates gradients up to the recipe's batch. It goes right after the two config
# files, so that a --set of the user's (later) overrides it; arguments that start with an
# option are passed on as they are.
if (( $# >= 2 )) && [[ $1 != -* ]]; then
    set -- "$1" "$2" --set train.micro_batch_size=auto "${@:3}"
fi
exec bash launch/slurm_job.sh "$@"
