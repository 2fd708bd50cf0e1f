"""The seed's results table and plots, made from run directories.

``python -m train.report RUN_DIR_OR_GLOB... [--out DIR]`` reads each run's ``config.toml`` and
``metrics.jsonl``, groups the runs whose configs are the same except for the seed, and writes
to ``DIR`` (default ``report/``):

- ``results.md``: a Markdown table in the seed's format (Epoch, Steps, optimizer/config, Top-1,
  Top-5, Training Time (hours)) from each run's last evaluation, each cell ``mean ± 2σ`` over
  the group's runs, followed by the four plots, which runs make each group, and the runs left out;
- ``step_vs_acc1.png``, ``step_vs_acc5.png``, ``time_vs_acc1.png``, ``time_vs_acc5.png``:
  validation accuracy against optimizer steps and against training time, one line (the mean)
  per group with a ±2σ band (drawn within 0-100%).

σ is the sample standard deviation (``ddof=1``, n - 1 in the denominator): with the usual 3
seeds the population formula would make the spread look 18% smaller (a factor sqrt(2/3)).
A group of one run has no σ; its cells show the mean alone.

A run has finished when its last evaluation is at ``train.max_epochs``; the others are listed
with a warning and left out of the statistics. Besides the seed, keys that do not change what
is trained are ignored when grouping: logging and checkpoint cadence, evaluation frequency,
where the data lives and the number of loader workers (as for resuming, see
``checkpoint.SAFE_TO_CHANGE``; ``train.max_epochs`` does change the results and is compared).
"""

from __future__ import annotations

import argparse
import glob
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import SAFE_TO_CHANGE
from .config import flatten, load_config_text, to_dict
from .errors import UserError, report_error
from .rundir import read_metrics

SEED_KEY = "train.reproduce.seed"
IGNORED_WHEN_GROUPING = (SAFE_TO_CHANGE - {"train.max_epochs"}) | {SEED_KEY}
# Keys every label shows (as "resnet50 SGD") rather than as "key=value".
NAMED_KEYS = {"train.arch", "train.optim.name", "train.optim.v2"}
OPTIMIZER_NAMES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "sgd-schedule-free": "Schedule-Free SGD",
                   "adamw-schedule-free": "Schedule-Free AdamW"}
PLOTS = {  # file name -> (x: "step" or "time", metric, what the metric is called)
    "step_vs_acc1.png": ("step", "val_acc1", "Top-1"),
    "step_vs_acc5.png": ("step", "val_acc5", "Top-5"),
    "time_vs_acc1.png": ("time", "val_acc1", "Top-1"),
    "time_vs_acc5.png": ("time", "val_acc5", "Top-5"),
}


@dataclass
class Run:
    path: Path
    config: dict  # flattened: {"train.lr": 0.1, ...}, every key present (defaults filled in)
    records: list[dict]  # metrics.jsonl, one per evaluation

    @property
    def finished(self) -> bool:
        return bool(self.records) and self.records[-1]["epoch"] == self.config["train.max_epochs"]

    def progress(self) -> str:
        if not self.records:
            return "no evaluation yet"
        return f"epoch {self.records[-1]['epoch']} of {self.config['train.max_epochs']}"


@dataclass
class Group:
    label: str
    runs: list[Run]  # finished runs only, sorted by seed


# -------------------------------------------------------------------------- reading runs


def find_run_dirs(patterns: list[str]) -> list[Path]:
    """Run directories named by ``patterns``: folders, globs, or folders of run folders (``runs/``)."""
    found: dict[Path, None] = {}
    for pattern in patterns:
        is_glob = any(c in pattern for c in "*?[")
        matches = [Path(m) for m in (sorted(glob.glob(pattern)) if is_glob else [pattern]) if Path(m).exists()]
        if not matches:
            raise UserError(f"{pattern}: {'matches nothing' if is_glob else 'no such run directory'}")
        for path in matches:
            if (path / "config.toml").is_file():
                found[path] = None
                continue
            children = sorted(p.parent for p in path.glob("*/config.toml")) if path.is_dir() else []
            if not children and not is_glob:
                raise UserError(f"{path}: not a run directory (no config.toml in it or in its sub-folders)")
            found.update(dict.fromkeys(children))
    return list(found)


def load_run(path: Path) -> Run:
    config_path = path / "config.toml"
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{config_path}: cannot read ({exc.strerror})") from None
    config = load_config_text(text, str(config_path))
    return Run(path, flatten(to_dict(config)), read_metrics(path / "metrics.jsonl"))


# ------------------------------------------------------------------------------ grouping


def group_key(config: dict) -> tuple:
    return tuple((key, repr(value)) for key, value in sorted(config.items()) if key not in IGNORED_WHEN_GROUPING)


def optimizer_name(config: dict) -> str:
    name = config["train.optim.name"]
    if name == "sgd-sam":
        return "SAM-v2" if config["train.optim.v2"] else "SAM-v1"
    return OPTIMIZER_NAMES.get(name, name)


def format_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def group_labels(configs: list[dict]) -> list[str]:
    """"resnet50 SGD", plus "key=value" for what tells it apart from groups with the same name.

    Keys of a table chosen by name (``[lr_scheduler]``) are compared only among groups that
    chose the same: a cosine schedule's warm-up says nothing about a constant schedule.
    """
    names = [f"{config['train.arch']} {optimizer_name(config)}" for config in configs]

    def differs(key: str, config: dict, name: str) -> bool:
        table_name = key.rsplit(".", 1)[0] + ".name"
        peers = [c for c, n in zip(configs, names) if n == name
                 and (key.endswith(".name") or c.get(table_name) == config.get(table_name))]
        return len({repr(c.get(key)) for c in peers}) > 1

    labels = []
    for config, name in zip(configs, names):
        extras = [f"{key.removeprefix('train.')}={format_value(value)}" for key, value in sorted(config.items())
                  if key not in NAMED_KEYS and key not in IGNORED_WHEN_GROUPING and differs(key, config, name)]
        labels.append(f"{name} ({', '.join(extras)})" if extras else name)
    return labels


def group_runs(runs: list[Run]) -> list[Group]:
    """Finished runs grouped by config minus the seed (and the keys that do not change results)."""
    by_key: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.finished:
            by_key.setdefault(group_key(run.config), []).append(run)
    members = [sorted(group, key=lambda r: (r.config[SEED_KEY], str(r.path))) for group in by_key.values()]
    labels = group_labels([group[0].config for group in members])
    return sorted((Group(label, group) for label, group in zip(labels, members)), key=lambda g: g.label)


# ---------------------------------------------------------------------------- statistics


def mean_and_2sd(values) -> tuple[float, float | None]:
    """Mean and twice the sample standard deviation (None for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), (2 * float(values.std(ddof=1)) if len(values) > 1 else None)


def format_stat(values, digits: int = 4) -> str:
    mean, two_sd = mean_and_2sd(values)
    return f"{mean:.{digits}f}" if two_sd is None else f"{mean:.{digits}f} ± {two_sd:.{digits}f}"


def format_span(values) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}–{high}"


def results_table(groups: list[Group]) -> str:
    rows = ["| Epoch | Steps | Optimizer / config | Runs | Top-1 Acc. (%) | Top-5 Acc. (%) | Training Time (hours) |",
            "|:-----:|:-----:|:-------------------|:----:|:--------------:|:--------------:|:---------------------:|"]
    for group in groups:
        last = [run.records[-1] for run in group.runs]
        rows.append(f"| {format_span([r['epoch'] for r in last])} | {format_span([r['step'] for r in last])} "
                    f"| {group.label} | {len(group.runs)} | {format_stat([r['val_acc1'] for r in last])} "
                    f"| {format_stat([r['val_acc5'] for r in last])} "
                    f"| {format_stat([r['train_time_s'] / 3600 for r in last])} |")
    return "\n".join(rows)


def curve(group: Group, metric: str) -> dict[str, np.ndarray]:
    """Per evaluation step that all of the group's runs have: mean step, mean training time,
    and the metric's mean and 2σ across runs (2σ is 0 for a single run)."""
    steps = sorted(set.intersection(*({r["step"] for r in run.records} for run in group.runs)))
    by_step = [{r["step"]: r for r in run.records} for run in group.runs]
    values = np.array([[records[s][metric] for s in steps] for records in by_step])  # runs x steps
    times = np.array([[records[s]["train_time_s"] for s in steps] for records in by_step])
    two_sd = 2 * values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(len(steps))
    return {"step": np.array(steps), "time_s": times.mean(axis=0), "mean": values.mean(axis=0), "two_sd": two_sd}


def time_unit(seconds: float) -> tuple[str, float]:
    """A unit that keeps the time axis' numbers readable: hours for real runs, less for demos."""
    if seconds >= 2 * 3600:
        return "hours", 3600.0
    return ("minutes", 60.0) if seconds >= 120 else ("seconds", 1.0)


# --------------------------------------------------------------------------------- plots


def write_plots(groups: list[Group], out: Path) -> list[Path]:
    from matplotlib.figure import Figure  # no pyplot: no GUI back-end, no global state
    from matplotlib.ticker import MaxNLocator

    longest = max(run.records[-1]["train_time_s"] for group in groups for run in group.runs)
    unit, seconds_per_unit = time_unit(longest)
    runs_per_group = sorted({len(group.runs) for group in groups})
    over = f"{runs_per_group[0]}" if len(runs_per_group) == 1 else f"{runs_per_group[0]}–{runs_per_group[-1]}"
    written = []
    for name, (x_kind, metric, metric_name) in PLOTS.items():
        figure = Figure(figsize=(7.5, 5), dpi=120, layout="constrained")
        axes = figure.add_subplot()
        for group in groups:
            c = curve(group, metric)
            x = c["step"] if x_kind == "step" else c["time_s"] / seconds_per_unit
            many = len(x) > 30
            line, = axes.plot(x, c["mean"], marker=None if many else "o", markersize=3, linewidth=1.5,
                              label=f"{group.label}  (n={len(group.runs)})")
            if len(group.runs) > 1:  # clipped to what an accuracy can be
                low, high = np.clip(c["mean"] - c["two_sd"], 0, 100), np.clip(c["mean"] + c["two_sd"], 0, 100)
                axes.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        x_name = "Iterations (optimizer steps)" if x_kind == "step" else f"Training time ({unit}, evaluation excluded)"
        axes.set_xlabel(x_name)
        if x_kind == "step":
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(f"{metric_name} validation accuracy (%)")
        axes.set_title(f"{metric_name} accuracy vs. {'iterations' if x_kind == 'step' else 'training time'}\n"
                       f"mean of {over} runs per line, band: ± 2 standard deviations", fontsize=11)
        axes.grid(True, alpha=0.3)
        axes.legend(loc="lower right", fontsize=9)
        path = out / name
        figure.savefig(path)
        written.append(path)
    return written


# ---------------------------------------------------------------------------- the report


def markdown(groups: list[Group], unfinished: list[Run]) -> str:
    lines = ["# Results", "",
             "Last evaluation of each run; each cell is the mean ± 2 sample standard deviations over the "
             "group's runs (the mean alone for a single run).", "", results_table(groups), "",
             "| ![](step_vs_acc1.png) | ![](step_vs_acc5.png) |", "|:--:|:--:|",
             "| # of Iterations vs. Top-1 Acc. | # of Iterations vs. Top-5 Acc. |", "",
             "| ![](time_vs_acc1.png) | ![](time_vs_acc5.png) |", "|:--:|:--:|",
             "| Training time vs. Top-1 Acc. | Training time vs. Top-5 Acc. |", "", "## Runs", ""]
    for group in groups:
        runs = ", ".join(f"`{run.path}` (seed {run.config[SEED_KEY]})" for run in group.runs)
        lines.append(f"- {group.label}: {runs}")
    if unfinished:
        lines += ["", "## Unfinished runs (left out)", ""]
        lines += [f"- `{run.path}`: {run.progress()}" for run in unfinished]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.report",
        description="Results table (mean ± 2σ over seeds) and accuracy plots from training run directories.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_GLOB",
                        help="run directories, globs (quoted: 'runs/r50-*'), or folders holding run directories")
    parser.add_argument("--out", type=Path, default=Path("report"),
                        help="where results.md and the four PNG plots go (default: report/)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = [load_run(path) for path in find_run_dirs(args.runs)]
        unfinished = [run for run in runs if not run.finished]
        for run in unfinished:
            print(f"warning: {run.path}: unfinished ({run.progress()}), left out of the statistics", file=sys.stderr)
        groups = group_runs(runs)
        if not groups:
            raise UserError(f"none of the {len(runs)} run(s) has finished; nothing to report")
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{args.out}: cannot create the output folder ({exc.strerror})") from None
    except UserError as exc:
        return report_error(exc)
    results = args.out / "results.md"
    results.write_text(markdown(groups, unfinished), encoding="utf-8")
    plots = write_plots(groups, args.out)
    print(results_table(groups))
    print(f"\n{len(runs) - len(unfinished)} finished run(s) in {len(groups)} group(s); wrote {results} and "
          f"{', '.join(p.name for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
