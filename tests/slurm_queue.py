"""SLURM's scheduling, played out on the jobs that the sbatch stand-in queued in $STANDIN_QUEUE.

``run_queue`` starts the queued jobs one at a time, as SLURM would once resources free up, each
through the sbatch stand-in (which gives a batch script the environment of a job), and follows
SLURM's documented rules for what the tests look at:

- a job array (``--array=0-3``, ``1,3,5``, ``0-14%4``) is one task per index, each a job of
  its own with SLURM_ARRAY_JOB_ID (the id sbatch answered), SLURM_ARRAY_TASK_ID and its own
  SLURM_JOB_ID: the first task the array's id, the others new ids (SLURM's job array page);
- ``scontrol requeue`` (the scontrol stand-in's log) puts a task or job back in the queue; it
  starts again with the same ids and SLURM_RESTART_COUNT one higher. A requeue naming an
  array's own id would requeue every task of the array: that is reported as an error here;
- ``--dependency=afterany:<id>`` holds a job until every task of job ``id`` has ended;
- ``--output`` (``%A``, ``%a``, ``%j``; by default slurm-%j.out, or slurm-%A_%a.out for an
  array) receives the job's output, appended to across requeues.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class QueuedJob:
    id: int
    cwd: Path
    script: str
    args: list[str]
    options: dict[str, str]  # "--array" -> "0-3", ...

    @property
    def array(self) -> list[int] | None:
        spec = self.options.get("--array")
        return None if spec is None else array_indices(spec)

    @property
    def dependency(self) -> int | None:
        spec = self.options.get("--dependency")
        if spec is None:
            return None
        kind, _, job = spec.partition(":")
        assert kind == "afterany" and job.isdigit(), f"the queue runner knows afterany:<job id> only, got {spec}"
        return int(job)


@dataclass
class Attempt:
    """One start of a job or array task, and how it ended."""
    job: QueuedJob
    task: int | None
    job_id: int  # SLURM_JOB_ID
    restart: int
    output: Path
    status: int | None = None
    env: dict = field(default_factory=dict, repr=False)


def array_indices(spec: str) -> list[int]:
    indices = []
    for part in spec.split("%")[0].split(","):
        first, _, rest = part.partition("-")
        last, _, step = rest.partition(":")
        indices += range(int(first), int(last or first) + 1, int(step or 1))
    return indices


def queued_jobs(queue: Path) -> list[QueuedJob]:
    jobs = []
    for folder in sorted((p for p in queue.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        script, *args = (folder / "command").read_text().splitlines()
        options = dict(line.split("=", 1) for line in (folder / "options").read_text().splitlines() if line)
        jobs.append(QueuedJob(int(folder.name), Path((folder / "cwd").read_text().strip()), script, args, options))
    return jobs


def next_job_id(queue: Path) -> int:
    path = queue / "next_job_id"
    job_id = int(path.read_text())
    path.write_text(f"{job_id + 1}\n")
    return job_id


def output_path(job: QueuedJob, task: int | None, job_id: int) -> Path:
    default = "slurm-%A_%a.out" if task is not None else "slurm-%j.out"
    pattern = job.options.get("--output", default)
    name = pattern.replace("%A", str(job.id)).replace("%a", str(task)).replace("%j", str(job_id))
    return job.cwd / name


def run_queue(queue: Path, env: dict, on_start: Callable[[Attempt, subprocess.Popen], None] | None = None,
              timeout: float = 900) -> list[Attempt]:
    """Run every queued job to its end; returns the attempts in the order they ran.

    ``on_start(attempt, process)`` is called once each is running (to signal it, say); the
    process is the batch shell, in a process group of its own.
    """
    requeue_log = Path(env["STANDIN_SCONTROL_LOG"])
    pending: list[Attempt] = []
    ids_of: dict[int, list[int]] = {}  # job -> the job ids of its tasks
    for job in queued_jobs(queue):
        if job.array is None:
            pending.append(Attempt(job, None, job.id, 0, output_path(job, None, job.id)))
            continue
        for n, task in enumerate(job.array):
            job_id = job.id if n == 0 else next_job_id(queue)
            pending.append(Attempt(job, task, job_id, 0, output_path(job, task, job_id)))
        ids_of[job.id] = [a.job_id for a in pending if a.job is job]
    done: list[Attempt] = []
    while pending:
        ready = [a for a in pending if a.job.dependency is None
                 or not any(p.job.id == a.job.dependency for p in pending)]
        assert ready, f"no job can start: {[(a.job.id, a.task) for a in pending]}"
        attempt = ready[0]
        pending.remove(attempt)
        seen = requeue_log.read_text().splitlines() if requeue_log.exists() else []
        attempt.status = start(attempt, env, on_start, timeout)
        done.append(attempt)
        for line in (requeue_log.read_text().splitlines() if requeue_log.exists() else [])[len(seen):]:
            target = line.removeprefix("requeue ")
            assert target not in map(str, ids_of), f"scontrol requeue {target} requeues every task of array {target}"
            named = f"{attempt.job.id}_{attempt.task}" if attempt.task is not None else str(attempt.job_id)
            assert target in (named, str(attempt.job_id)), f"{line}: not the job that asked ({named})"
            pending.append(Attempt(attempt.job, attempt.task, attempt.job_id, attempt.restart + 1, attempt.output))
    return done


def start(attempt: Attempt, env: dict, on_start, timeout: float) -> int:
    job = attempt.job
    attempt.env = {k: v for k, v in env.items() if k != "STANDIN_QUEUE"}  # the stand-in runs the script now
    attempt.env.update(SLURM_JOB_ID=str(attempt.job_id), SLURM_RESTART_COUNT=str(attempt.restart),
                       SLURM_JOB_NAME=job.options.get("--job-name", Path(job.script).name))
    if attempt.task is not None:
        attempt.env.update(SLURM_ARRAY_JOB_ID=str(job.id), SLURM_ARRAY_TASK_ID=str(attempt.task),
                           SLURM_ARRAY_TASK_COUNT=str(len(job.array)), SLURM_ARRAY_TASK_MIN=str(min(job.array)),
                           SLURM_ARRAY_TASK_MAX=str(max(job.array)))
    attempt.output.parent.mkdir(parents=True, exist_ok=True)
    with attempt.output.open("a") as out:
        process = subprocess.Popen(["sbatch", job.script, *job.args], cwd=job.cwd, env=attempt.env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if on_start:
                on_start(attempt, process)
            return process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, 9)
                process.wait()
