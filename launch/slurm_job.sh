#!/usr/bin/env bash
# The batch job behind every launch/<profile>.sh: one node launcher per node, stop signals
# passed on to training, and a requeue when training stopped with a checkpoint.
#
#   launch/slurm_job.sh [--cpu-processes N] DATA.toml TRAIN.toml [--set section.key=value ...] [--output-dir DIR]
#   launch/slurm_job.sh [--cpu-processes N] --sweep SWEEP_DIR   (a task of a job array from python -m train.sweep)
#
# Run by the profile scripts inside the job, from the directory the job was submitted from
# (the repository root); the CPU profiles pass --cpu-processes (N processes per node on its
# CPUs, no GPUs). The run directory is runs/<SLURM_JOB_ID>, or the --output-dir given: a
# requeued job keeps its id and its arguments, so it finds its checkpoints there and resumes.
# Environment: PYTHON (default .venv/bin/python), MIXED_PRECISION (bf16, fp16 or no: instead of
# deciding from the GPUs), NETWORK_INTERFACE (the interface between nodes, e.g. ib0:
# NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME).
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
launcher_args=()
if [[ "${1:-}" == --cpu-processes ]]; then
    if [[ ! "${2:-}" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: --cpu-processes: expected a number of processes >= 1, got '${2:-}'" >&2
        exit "$EXIT_USAGE"
    fi
    launcher_args+=(--cpu-processes "$2")
    shift 2
fi
# A sweep's array tasks all get "--sweep DIR"; task N's own arguments (its train config, seed
# and run directory) are the lines of DIR/tasks/N.args. A requeued task keeps its
# SLURM_ARRAY_TASK_ID (it is how SLURM names it: <array job id>_<task id>), hence its run.
if [[ "${1:-}" == --sweep ]]; then
    if [[ $# -ne 2 || -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
        echo "error: --sweep DIR is for the tasks of a job array that python -m train.sweep submits" >&2
        exit "$EXIT_USAGE"
    fi
    task_file=$2/tasks/$SLURM_ARRAY_TASK_ID.args
    if [[ ! -f "$task_file" ]]; then
        echo "error: no arguments for task $SLURM_ARRAY_TASK_ID of this array: $task_file not found" >&2
        exit "$EXIT_USAGE"
    fi
    mapfile -t task_args < "$task_file"
    set -- "${task_args[@]}"
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
previous=
preflight=0
for arg in "$@"; do  # a run directory given (a sweep task's, a run resubmitted by hand) is the one
    if [[ "$previous" == --output-dir ]]; then output_dir=$arg; fi
    if [[ "$arg" == --output-dir=* ]]; then output_dir=${arg#--output-dir=}; fi
    if [[ "$arg" == --preflight ]]; then preflight=1; fi
    previous=$arg
done
# scontrol given an array's own job id acts on every task of the array, and that id is also
# the SLURM_JOB_ID of one of its tasks: a task is named <array job id>_<task id> instead.
job=$SLURM_JOB_ID
if [[ -n "${SLURM_ARRAY_JOB_ID:-}" && -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    job=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
fi
# A preflight writes nothing into the run directory: the node configs go to a temporary folder.
if (( ! preflight )); then
    launcher_args+=(--config-dir "$output_dir/launch")
fi
if [[ -n "${MIXED_PRECISION:-}" ]]; then
    if [[ ! "$MIXED_PRECISION" =~ ^(bf16|fp16|no)$ ]]; then
        echo "error: MIXED_PRECISION=$MIXED_PRECISION: expected bf16, fp16 or no" >&2
        exit "$EXIT_USAGE"
    fi
    launcher_args+=(--mixed-precision "$MIXED_PRECISION")
fi
if [[ -n "${NETWORK_INTERFACE:-}" ]]; then
    launcher_args+=(--network-interface "$NETWORK_INTERFACE")
fi
echo "job $job (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: run directory $output_dir"

# One task per node; each node launcher starts that node's training processes (one per GPU).
# --kill-on-bad-exit: once a node has ended badly (training lost a peer and stopped with 75, or
# it failed), the other nodes' tasks are ended too rather than left waiting on a hung one.
# Each node launcher leaves its status in the config folder (node-<rank>.status).
status_dir=$output_dir/launch
rm -f "$status_dir"/node-*.status
srun --nodes="${SLURM_NNODES:-1}" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    --kill-on-bad-exit=1 \
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

# srun's status is the highest of the nodes': a node lost (killed, or ended by srun) hides that
# the others stopped at a checkpoint. Training resumes from the last one when every node either
# said 75 or was lost (no status, or killed by a signal: srun ends the others once one is lost,
# sometimes before they have seen it), none reporting a failure of its own (1-127 but 75).
if (( status != 0 && status != EXIT_PREEMPTED && ! preflight )); then
    preempted=0 failed=0 lost=()
    for (( node = 0; node < ${SLURM_NNODES:-1}; node++ )); do
        node_status=$(cat "$status_dir/node-$node.status" 2>/dev/null) || node_status=
        if [[ "$node_status" == "$EXIT_PREEMPTED" ]]; then
            preempted=1
        elif [[ "$node_status" =~ ^[0-9]+$ ]] && (( node_status > 0 && node_status < 128 )); then
            failed=1
        elif [[ "$node_status" != 0 ]]; then
            lost+=("$node")
        fi
    done
    if (( ! failed && (preempted || ${#lost[@]}) )); then
        if (( ${#lost[@]} )); then
            echo "node(s) ${lost[*]} ended without a status of their own (lost, or ended by srun), no node" \
                 "failed: status $EXIT_PREEMPTED, to resume from the last checkpoint"
        else
            echo "srun reported status $status, but every node stopped at a checkpoint: status $EXIT_PREEMPTED"
        fi
        status=$EXIT_PREEMPTED
    fi
fi

case $status in
    0)
        echo "training finished: $output_dir"
        ;;
    "$EXIT_PREEMPTED")
        echo "training stopped with a checkpoint: requeueing job $job to resume in $output_dir"
        if ! scontrol requeue "$job"; then
            echo "error: scontrol requeue failed; to resume, submit again with --output-dir $output_dir" >&2
        fi
        ;;
    *)
        echo "training failed with status $status: not requeued" >&2
        ;;
esac
exit "$status"
