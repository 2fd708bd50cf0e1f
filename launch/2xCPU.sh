#!/usr/bin/env bash
# Two training processes on the CPUs of one node, no GPUs, fp32: rehearse a job on a CPU partition
# (or a test cluster) through the same batch job and node launcher as the GPU profiles.
#   sbatch -A <account> launch/2xCPU.sh configs/data/imagenet.toml configs/train/resnet50-sgd.toml [--set k=v ...]
# Submit from the repository root. Give data loader workers CPUs of their own: raise
# --cpus-per-task with [dataloader] num_data_workers (on the sbatch command line or here).
#SBATCH --job-name=imagenet-2xCPU
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
# SIGUSR1 ten minutes before the time limit: training writes a checkpoint, the job requeues.
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
cd "${SLURM_SUBMIT_DIR:-.}" || exit 2
exec bash launch/slurm_job.sh --cpu-processes 2 "$@"
