"""Seed sweeps: training configs x seeds as one SLURM job array, and the report when it ends.

``python -m train.sweep --profile P --data-cfg D.toml [--train-cfg T.toml ...] [--seeds 1 2 3]``
run from the repository root, as the launch scripts are. Without ``--train-cfg`` the grid is
the one behind the seed's table: its five ResNet-50 recipes x seeds 1, 2, 3 (15 runs).

1. Every (config, seed) of the grid is validated as the trainer would at start-up, for the
   profile's number of processes, before anything is written or submitted: a typo in one
   ``--set`` would otherwise fail every task after its wait in the queue.
2. The sweep folder (``--output-dir``, default ``runs/sweep-<date>-<time>``) gets
   ``tasks.tsv`` (task id, train config, seed, run directory) and ``tasks/<id>.args``: task
   N's arguments for ``launch/slurm_job.sh``, one per line.
3. One job array through the profile's own script, so it keeps the profile's GPUs, time
   limit, stop signal and requeue: ``sbatch --array=0-<N-1> launch/<P>.sh --sweep DIR``.
   Each task trains in ``DIR/<config name>-seed<seed>``, a name tied to its task id, which a
   requeued task keeps (``runs/<SLURM_JOB_ID>`` would do too, but is known only once the task
   starts, and the report job has to know where to look before).
4. The report, ``launch/sweep_report.sh DIR``, submitted with ``--dependency=afterany:<array
   job id>``: SLURM starts it once every task has ended, however it ended.

``--dry-run`` checks the same and prints the grid and both sbatch commands, writing nothing.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .cli import load_checked_config
from .errors import UserError, report_error
from .files import write_atomically, write_json
from .report import SEED_KEY

# The seed's table: ResNet-50 with each of its optimizers, 3 runs each.
SEED_TABLE_CONFIGS = [Path(f"configs/train/resnet50-{recipe}.toml")
                      for recipe in ("sgd", "adam", "sf-sgd", "sgd-sam-v1", "sgd-sam-v2")]
SEED_TABLE_SEEDS = [1, 2, 3]
LAUNCH = Path("launch")
PROFILE_CONFIGS = Path("accelerate_configs")
REPORT_SCRIPT = LAUNCH / "sweep_report.sh"
ARRAY_ID_PLACEHOLDER = "<array job id>"


@dataclass(frozen=True)
class Task:
    index: int
    train_cfg: Path
    seed: int
    run_dir: Path

    def arguments(self, data_cfg: Path, overrides: list[str]) -> list[str]:
        """What ``launch/slurm_job.sh`` gets for this task."""
        sets = [part for override in overrides for part in ("--set", override)]
        return [str(data_cfg), str(self.train_cfg), *sets, "--set", f"{SEED_KEY}={self.seed}",
                "--output-dir", str(self.run_dir)]


def plan_tasks(train_cfgs: list[Path], seeds: list[int], sweep_dir: Path) -> list[Task]:
    """The grid, config-major: task ``i`` is config ``i // len(seeds)`` with seed ``i % len(seeds)``."""
    for name, values in (("--train-cfg", [str(p) for p in train_cfgs]), ("--seeds", seeds)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise UserError(f"{name}: {', '.join(repeated)} given more than once")
    stems = [cfg.stem for cfg in train_cfgs]
    clash = sorted({stem for stem in stems if stems.count(stem) > 1})
    if clash:
        raise UserError(f"--train-cfg: two files named {clash[0]}.toml would share run directories; rename one")
    return [Task(i * len(seeds) + j, cfg, seed, sweep_dir / f"{cfg.stem}-seed{seed}")
            for i, cfg in enumerate(train_cfgs) for j, seed in enumerate(seeds)]


def profiles() -> list[str]:
    """The launch scripts that start a training job (each hands over to slurm_job.sh)."""
    hands_over = re.compile(r"^exec bash launch/slurm_job\.sh ", re.M)
    return sorted(p.stem for p in LAUNCH.glob("*.sh") if hands_over.search(p.read_text(encoding="utf-8")))


def profile_processes(profile: str) -> int:
    """The profile's number of training processes (its accelerate config), for the batch-size check."""
    path = PROFILE_CONFIGS / f"{profile}.yaml"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    found = re.search(r"^num_processes:\s*(\d+)\s*$", text, re.M)
    return int(found.group(1)) if found else 1


def check_grid(args: argparse.Namespace, tasks: list[Task]) -> None:
    """Each task's config as its run would load it; the first problem stops everything."""
    if any(override.strip().startswith(SEED_KEY) for override in args.overrides):
        raise UserError(f"--set {SEED_KEY}=...: the sweep sets the seed of each run itself; give --seeds")
    script = LAUNCH / f"{args.profile}.sh"
    if args.profile not in profiles():
        where = "" if LAUNCH.is_dir() else f" (no {LAUNCH}/ here: run this from the repository root)"
        raise UserError(f"--profile {args.profile}: no {script}{where}; profiles: {', '.join(profiles()) or 'none'}")
    if args.output_dir.exists():
        raise UserError(f"{args.output_dir} exists: give the sweep another --output-dir (to run some of its tasks "
                        f"again: sbatch --array=<task ids> {script} --sweep {args.output_dir})")
    processes = profile_processes(args.profile)
    for task in tasks:
        # Without the seed first, so that an error in a file is not blamed on the sweep's --set.
        load_checked_config(args.data_cfg, task.train_cfg, args.overrides, processes)
        load_checked_config(args.data_cfg, task.train_cfg, [*args.overrides, f"{SEED_KEY}={task.seed}"], processes)
        if any("\n" in argument for argument in task.arguments(args.data_cfg, args.overrides)):
            raise UserError(f"task {task.index}: an argument holds a line break, which the task files cannot carry")


def array_command(args: argparse.Namespace, count: int) -> list[str]:
    limit = f"%{args.max_running}" if args.max_running else ""
    return ["sbatch", "--parsable", *account(args), f"--array=0-{count - 1}{limit}",
            f"--job-name={args.output_dir.name}", f"--output={args.output_dir}/slurm-%A_%a.out",
            str(LAUNCH / f"{args.profile}.sh"), "--sweep", str(args.output_dir)]


def report_command(args: argparse.Namespace, array_id: str) -> list[str]:
    return ["sbatch", "--parsable", *account(args), f"--dependency=afterany:{array_id}",
            f"--job-name={args.output_dir.name}-report", f"--output={args.output_dir}/report-%j.out",
            str(REPORT_SCRIPT), str(args.output_dir)]


def account(args: argparse.Namespace) -> list[str]:
    return ["-A", args.account] if args.account else []


def write_sweep_folder(sweep_dir: Path, tasks: list[Task], args: argparse.Namespace) -> None:
    (sweep_dir / "tasks").mkdir(parents=True)
    for task in tasks:
        write_atomically(sweep_dir / "tasks" / f"{task.index}.args",
                         "".join(f"{argument}\n" for argument in task.arguments(args.data_cfg, args.overrides)))
    rows = ["task\ttrain_cfg\tseed\trun_dir"] + [f"{t.index}\t{t.train_cfg}\t{t.seed}\t{t.run_dir}" for t in tasks]
    write_atomically(sweep_dir / "tasks.tsv", "\n".join(rows) + "\n")


def submit(command: list[str], what: str) -> str:
    """Run sbatch --parsable; its answer is ``<job id>`` or ``<job id>;<cluster>``."""
    result = subprocess.run(command, capture_output=True, text=True)
    answer = result.stdout.strip().split(";")[0]
    if result.returncode != 0 or not answer.isdigit():
        message = (result.stderr.strip() or result.stdout.strip() or f"status {result.returncode}").splitlines()[0]
        raise UserError(f"sbatch did not take the {what}: {message}")
    return answer


def print_plan(args: argparse.Namespace, tasks: list[Task]) -> None:
    print(f"sweep {args.output_dir}: {len(tasks)} runs ({len(args.train_cfg)} train config(s) x "
          f"{len(args.seeds)} seed(s)) on {args.profile}, data {args.data_cfg}")
    width = max(len(str(task.train_cfg)) for task in tasks)
    print(f"  {'task':>4}  {'train config':<{width}}  {'seed':>4}  run directory")
    for task in tasks:
        print(f"  {task.index:>4}  {str(task.train_cfg):<{width}}  {task.seed:>4}  {task.run_dir}")


def seed_value(text: str) -> int:
    """A seed numpy accepts too (the trainer seeds it): 0 to 2**32 - 1."""
    if not text.isdigit() or int(text) >= 2**32:
        raise argparse.ArgumentTypeError(f"a seed is a whole number from 0 to {2**32 - 1}, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.sweep",
        description="Submit training configs x seeds as one SLURM job array, and the report (compared with the "
                    "seed's table) as a job that runs when every task has ended. Run from the repository root.",
        epilog="Documentation: docs/clusters.md")
    parser.add_argument("--profile", required=True, help="the hardware profile: launch/<PROFILE>.sh (e.g. 4xA40)")
    parser.add_argument("--data-cfg", type=Path, required=True, help="data TOML, the same for every run")
    parser.add_argument("--train-cfg", type=Path, nargs="+", default=SEED_TABLE_CONFIGS, metavar="TRAIN.toml",
                        help="training TOMLs (default: the seed's five ResNet-50 recipes)")
    parser.add_argument("--seeds", type=seed_value, nargs="+", default=SEED_TABLE_SEEDS, metavar="SEED",
                        help="train.reproduce.seed of each run of a config (default: 1 2 3)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a config override for every run, as for python -m train (repeatable)")
    parser.add_argument("-A", "--account", default=None, help="the SLURM account to charge (sbatch -A)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="the sweep folder, which holds the runs (default: runs/sweep-<date>-<time>)")
    parser.add_argument("--max-running", type=int, default=None, metavar="N",
                        help="at most N tasks at a time (sbatch --array=...%%N)")
    parser.add_argument("--dry-run", action="store_true", help="check and print the sbatch commands; submit nothing")
    args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = Path("runs") / time.strftime("sweep-%Y%m%d-%H%M%S")
    if args.max_running is not None and args.max_running < 1:
        parser.error(f"--max-running must be at least 1, got {args.max_running}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tasks = plan_tasks(args.train_cfg, args.seeds, args.output_dir)
        check_grid(args, tasks)
        if not args.dry_run and shutil.which("sbatch") is None:
            raise UserError("sbatch is not on the PATH: run this where jobs are submitted (or try --dry-run)")
        if not args.dry_run:
            try:
                write_sweep_folder(args.output_dir, tasks, args)
            except OSError as exc:
                raise UserError(f"{args.output_dir}: cannot write the sweep folder ({exc.strerror})") from None
    except UserError as exc:
        return report_error(exc)
    print_plan(args, tasks)
    array = array_command(args, len(tasks))
    if args.dry_run:
        print(f"$ {shlex.join(array)}\n$ {shlex.join(report_command(args, ARRAY_ID_PLACEHOLDER))}")
        print("dry run: nothing written, nothing submitted")
        return 0
    try:
        print(f"$ {shlex.join(array)}")
        array_id = submit(array, "job array")
    except UserError as exc:
        shutil.rmtree(args.output_dir)  # nothing ran: the same --output-dir can be used again
        return report_error(exc)
    report = report_command(args, array_id)
    print(f"$ {shlex.join(report)}")
    jobs = {"profile": args.profile, "tasks": len(tasks), "array_job_id": array_id, "report_job_id": None}
    try:
        jobs["report_job_id"] = submit(report, "report job")
    except UserError as exc:
        return report_error(exc, prefix=f"job array {array_id} is queued, but ")
    finally:
        write_json(args.output_dir / "sweep.json", jobs)
    print(f"submitted job array {array_id} ({len(tasks)} tasks: {array_id}_0 to {array_id}_{len(tasks) - 1}) "
          f"and report job {jobs['report_job_id']}, which starts when every task has ended.\n"
          f"runs: {args.output_dir}/<config>-seed<seed>; logs: {args.output_dir}/slurm-{array_id}_<task>.out; "
          f"report: {args.output_dir}/report/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
