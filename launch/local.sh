#!/usr/bin/env bash
# Train on this machine's GPUs, one process per GPU, without SLURM:
#
#   launch/local.sh DATA.toml TRAIN.toml [--set section.key=value ...] [--output-dir DIR]
#
# Mixed precision follows the GPUs (bf16 from compute capability 8.0 on, fp16 below);
# CUDA_VISIBLE_DEVICES picks the GPUs. SIGUSR1 or SIGTERM to the launcher makes training write
# a checkpoint and stop with status 75; the same command with the same --output-dir resumes.
# Environment: PYTHON (default: the repository's .venv/bin/python), MIXED_PRECISION (bf16, fp16 or no).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

if (( $# < 2 )); then
    echo "usage: launch/local.sh DATA.toml TRAIN.toml [--set section.key=value ...] [--output-dir DIR]" >&2
    exit 2
fi
data_cfg=$1
train_cfg=$2
shift 2
python=${PYTHON:-$here/../.venv/bin/python}
launcher_args=(--local)
if [[ -n "${MIXED_PRECISION:-}" ]]; then
    launcher_args+=(--mixed-precision "$MIXED_PRECISION")
fi
# Whatever the number of GPUs, the micro-batch that fits is found and gradients are accumulated
# up to the recipe's global batch (train.micro_batch_size=auto; a later --set overrides it).
exec "$python" "$here/node_launcher.py" "${launcher_args[@]}" -- --data-cfg "$data_cfg" --train-cfg "$train_cfg" \
    --set train.micro_batch_size=auto "$@"
