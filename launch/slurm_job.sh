#!/usr/bin/env bash
# The batch job behind every launch/<profile>.sh: one node launcher per node, stop signals
# passed on to training, and a requeue when training stopped with a checkpoint.
#
#   launch/slurm_job.sh DATA.toml TRAIN.toml [--set section.key=value ...] [--output-dir DIR]
#
# Run by the profile scripts inside the job, from the directory the job was submitted from
# (the repository root). The run directory is runs/<SLURM_JOB_ID>: a requeued job keeps its
# id, so it finds its checkpoints there and resumes. Environment: PYTHON (default
# .venv/bin/python), MIXED_PRECISION (bf16, fp16 or no: instead of deciding from the GPUs),
# NETWORK_INTERFACE (the interface between nodes, e.g. ib0: NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME).
set -uo pipefail  # no -e: the training status is looked at below

# The trainer's status after a stop signal once its checkpoint is written (EX_TEMPFAIL,
# train/preemption.py): "run me again". Only this status requeues the job.
readonly EXIT_PREEMPTED=75
readonly EXIT_USAGE=2

usage() {
    echo "usage: sbatch -A <account> launch/<profile>.sh DATA.toml TRAIN.toml [--set section.key=value ...]" >&2
    exit "$EXIT_USAGE"
}

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "error: SLURM_JOB_ID is not set: submit this with sbatch (on a workstation use launch/local.sh)" >&2
    exit "$EXIT_USAGE"
fi
(( $# >= 2 )) || usage
data_cfg=$1
train_cfg=$2
shift 2
for file in "$data_cfg" "$train_cfg"; do
    if [[ ! -f "$file" ]]; then
        echo "error: config file not found: $file (paths are relative to $PWD, where the job was submitted)" >&2
        exit "$EXIT_USAGE"
    fi
done
python=${PYTHON:-.venv/bin/python}
if ! command -v "$python" >/dev/null; then
    echo "error: no Python at $python: run 'make test' once in the repository, or set PYTHON" >&2
    exit "$EXIT_USAGE"
fi

output_dir=runs/$SLURM_JOB_ID
launcher_args=(--config-dir "$output_dir/launch")
if [[ -n "${MIXED_PRECISION:-}" ]]; then
    launcher_args+=(--mixed-precision "$MIXED_PRECISION")
fi
if [[ -n "${NETWORK_INTERFACE:-}" ]]; then
    launcher_args+=(--network-interface "$NETWORK_INTERFACE")
fi
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: run directory $output_dir"

# One task per node; each node launcher starts that node's GPU processes.
srun --nodes="${SLURM_NNODES:-1}" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "$python" launch/node_launcher.py "${launcher_args[@]}" -- \
    --data-cfg "$data_cfg" --train-cfg "$train_cfg" --output-dir "$output_dir" "$@" &
srun_pid=$!

# SLURM's warning signal (#SBATCH --signal=B:USR1@...) reaches only this shell; srun passes
# the signals it gets on to its tasks, the node launchers, which pass them to training.
# SIGTERM is not trapped: it comes with scancel (and at the hard time limit) to every process
# of the job, training still writes its checkpoint, and a cancelled job must stay cancelled.
interrupted=0
# shellcheck disable=SC2317  # only called by the traps below
forward() {
    interrupted=1
    echo "received SIG$1: asking training to write a checkpoint and stop"
    kill -s "$1" "$srun_pid" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward USR2' USR2

while true; do
    interrupted=0
    wait "$srun_pid"
    status=$?
    # A trapped signal cuts `wait` short with 128+n while training goes on: wait again.
    if (( interrupted && status > 128 )); then
        continue
    fi
    break
done

case $status in
    0)
        echo "training finished: $output_dir"
        ;;
    "$EXIT_PREEMPTED")
        echo "training stopped with a checkpoint: requeueing job $SLURM_JOB_ID to resume in $output_dir"
        if ! scontrol requeue "$SLURM_JOB_ID"; then
            echo "error: scontrol requeue failed; to resume, submit again with --output-dir $output_dir" >&2
        fi
        ;;
    *)
        echo "training failed with status $status: not requeued" >&2
        ;;
esac
exit "$status"
