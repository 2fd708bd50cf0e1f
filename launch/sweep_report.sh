#!/usr/bin/env bash
# The report of a seed sweep, run by SLURM once every task of the sweep's job array has ended
# (python -m train.sweep submits it with --dependency=afterany:<array job id>):
#   sbatch -A <account> --dependency=afterany:<array job id> launch/sweep_report.sh SWEEP_DIR
# It names the tasks that left no run, then writes SWEEP_DIR/report/ (results.md and the plots)
# from the runs that finished, beside the seed's published rows. No GPU: a few CPU minutes.
#SBATCH --job-name=imagenet-sweep-report
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-.}" || exit 2
readonly EXIT_USAGE=2

if [[ $# -ne 1 || ! -f "${1:-}/tasks.tsv" ]]; then
    echo "usage: sbatch launch/sweep_report.sh SWEEP_DIR (a folder made by python -m train.sweep, with tasks.tsv)" >&2
    exit "$EXIT_USAGE"
fi
sweep_dir=$1
python=${PYTHON:-.venv/bin/python}

# tasks.tsv: a header line, then task id, train config, seed and run directory per task.
while IFS=$'\t' read -r task train_cfg seed run_dir; do
    if [[ ! -f "$run_dir/config.toml" ]]; then
        echo "warning: task $task ($train_cfg, seed $seed) left no run in $run_dir: see $sweep_dir/slurm-*_$task.out" >&2
    fi
done < <(tail -n +2 "$sweep_dir/tasks.tsv")

exec "$python" -m train.report "$sweep_dir" --out "$sweep_dir/report" --compare seed
