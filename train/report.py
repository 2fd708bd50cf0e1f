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

``--compare seed`` puts a published table beside ours (``train/references/seed.toml``: the
seed's ResNet-50 rows). A group is compared with the published row of the same model
(``train.arch``) and optimizer, whatever else differs; its Top-1 and Top-5 cells are marked
✓ when its mean lies inside the published mean ± 2σ and ✗ when outside, the published row is
printed under it, and the plots draw the published mean ± 2σ as a band in the group's colour.
Training times are shown, not marked: they depend on the hardware.
"""

from __future__ import annotations

import argparse
import glob
import sys
import textwrap
import tomllib
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
REFERENCES = Path(__file__).parent / "references"  # published tables for --compare, one TOML each
INSIDE, OUTSIDE = "✓", "✗"
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

    @property
    def config(self) -> dict:
        return self.runs[0].config  # the same for all runs but the seed and what does not matter


@dataclass(frozen=True)
class Reference:
    """A published row: a model and optimizer's last evaluation, each value as (mean, 2σ)."""
    arch: str
    optimizer: str
    epochs: int
    steps: int
    runs: int
    top1: tuple[float, float]
    top5: tuple[float, float]
    hours: tuple[float, float] | None = None
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.arch} {self.optimizer}"


@dataclass
class Comparison:
    """A published table (``--compare NAME``) and which of our groups each of its rows matches."""
    name: str
    description: str
    rows: list[Reference]

    def match(self, group: Group) -> Reference | None:
        """The row of the group's model and optimizer: what "matching" means, and all it means."""
        return next((row for row in self.rows if row.arch == group.config["train.arch"]
                     and row.optimizer == optimizer_name(group.config)), None)


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


def reference_names() -> list[str]:
    return sorted(path.stem for path in REFERENCES.glob("*.toml"))


def load_comparison(name: str) -> Comparison:
    with open(REFERENCES / f"{name}.toml", "rb") as f:
        table = tomllib.load(f)
    rows = [Reference(**{key: tuple(value) if isinstance(value, list) else value for key, value in row.items()})
            for row in table["rows"]]
    return Comparison(name, table["description"], rows)


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


def format_reference(value: tuple[float, float] | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def inside_band(mean: float, reference: tuple[float, float], digits: int = 4) -> bool:
    """Whether ``mean`` lies in the published mean ± 2σ, edges included, to the digits the table
    prints: the mark agrees with the numbers beside it (77.2087 is inside 77.3860 ± 0.1773)."""
    centre, two_sd = reference
    return round(centre - two_sd, digits) <= round(mean, digits) <= round(centre + two_sd, digits)


def marked(values, reference: tuple[float, float] | None) -> str:
    """``mean ± 2σ``, followed by ✓ or ✗ when there is a published value to hold it against."""
    cell = format_stat(values)
    if reference is None:
        return cell
    return f"{cell} {INSIDE if inside_band(mean_and_2sd(values)[0], reference) else OUTSIDE}"


def results_table(groups: list[Group], comparison: Comparison | None = None) -> str:
    rows = ["| Epoch | Steps | Optimizer / config | Runs | Top-1 Acc. (%) | Top-5 Acc. (%) | Training Time (hours) |",
            "|:-----:|:-----:|:-------------------|:----:|:--------------:|:--------------:|:---------------------:|"]
    for group in groups:
        last = [run.records[-1] for run in group.runs]
        reference = comparison.match(group) if comparison else None
        rows.append(f"| {format_span([r['epoch'] for r in last])} | {format_span([r['step'] for r in last])} "
                    f"| {group.label} | {len(group.runs)} "
                    f"| {marked([r['val_acc1'] for r in last], reference and reference.top1)} "
                    f"| {marked([r['val_acc5'] for r in last], reference and reference.top5)} "
                    f"| {format_stat([r['train_time_s'] / 3600 for r in last])} |")
        if reference:
            rows.append(f"| {reference.epochs} | {reference.steps} | {comparison.name}: {reference.label} "
                        f"| {reference.runs} | {format_reference(reference.top1)} | {format_reference(reference.top5)} "
                        f"| {format_reference(reference.hours)} |")
    return "\n".join(rows)


def comparison_notes(groups: list[Group], comparison: Comparison) -> list[str]:
    """What the marks mean, what was matched with what, and what could not be."""
    matched = {group.label: comparison.match(group) for group in groups}
    optimizers = ", ".join(dict.fromkeys(row.optimizer for row in comparison.rows))
    models = ", ".join(dict.fromkeys(row.arch for row in comparison.rows))
    notes = [f"Compared with {comparison.description}. A group of runs is compared with the {comparison.name}'s "
             f"row of the same model (train.arch: {models}) and optimizer ({optimizers}), whatever else differs. "
             f"{INSIDE}: our mean lies inside the {comparison.name}'s mean ± 2σ (the row under ours); {OUTSIDE}: "
             f"outside. Training times are not marked: they depend on the hardware."]
    for group in groups:
        reference = matched[group.label]
        if reference and reference.epochs != group.config["train.max_epochs"]:
            notes.append(f"{group.label}: {group.config['train.max_epochs']} epochs, the {comparison.name}'s row "
                         f"{reference.epochs}: compared all the same")
    for reference in dict.fromkeys(r for r in matched.values() if r and r.note):
        notes.append(f"{comparison.name}: {reference.label}: {reference.note}")
    unmatched = [label for label, reference in matched.items() if reference is None]
    if unmatched:
        notes.append(f"no {comparison.name} row for: {'; '.join(unmatched)}")
    unused = [row.label for row in comparison.rows if row not in matched.values()]
    if unused:
        notes.append(f"{comparison.name} rows with no runs here: {'; '.join(unused)}")
    return notes


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


def draw_reference(axes, reference: Reference, metric: str, color, name: str) -> tuple[float, float]:
    """The published mean ± 2σ of the last evaluation as a band across the plot, its mean dashed.

    Returns the band's (low, high)."""
    mean, two_sd = reference.top1 if metric == "val_acc1" else reference.top5
    axes.axhspan(mean - two_sd, mean + two_sd, color=color, alpha=0.3, linewidth=0, gid=f"reference {reference.label}")
    axes.axhline(mean, color=color, linestyle="--", linewidth=1,
                 label=f"{name}: {reference.optimizer} {mean:.2f} ± {two_sd:.2f}")
    return mean - two_sd, mean + two_sd


def draw_curves(axes, groups: list[Group], x_kind: str, metric: str, seconds_per_unit: float,
                comparison: Comparison | None) -> tuple[list[float], list[float]]:
    """One line (the mean) per group with its ± 2σ band, and the published band of the group's
    match. Returns what the comparison is about: the accuracies (published bands, our last
    means ± 2σ) and where the compared groups end on the x axis."""
    compared, ends = [], []
    for group in groups:
        c = curve(group, metric)
        x = c["step"] if x_kind == "step" else c["time_s"] / seconds_per_unit
        many = len(x) > 30
        line, = axes.plot(x, c["mean"], marker=None if many else "o", markersize=3, linewidth=1.5,
                          label=f"{group.label}  (n={len(group.runs)})")
        if len(group.runs) > 1:  # clipped to what an accuracy can be
            low, high = np.clip(c["mean"] - c["two_sd"], 0, 100), np.clip(c["mean"] + c["two_sd"], 0, 100)
            axes.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        reference = comparison.match(group) if comparison else None
        if reference:
            compared += [*draw_reference(axes, reference, metric, line.get_color(), comparison.name),
                         c["mean"][-1] - c["two_sd"][-1], c["mean"][-1] + c["two_sd"][-1]]
            ends.append(float(x[-1]))
    return compared, ends


def zoom_on_the_end(axes, compared: list[float], ends: list[float], x_span: float) -> None:
    """Limits that show where the compared groups end, and their accuracies large enough to tell
    inside from outside: a band of ± 0.2% is a hair's width on a 0-80% axis."""
    low, high = min(compared), max(compared)
    pad = max(0.15 * (high - low), 0.2)
    axes.set_ylim(low - pad, high + pad)
    axes.set_xlim(min(ends) - 0.1 * x_span, max(ends) + 0.02 * x_span)


def accuracy_figure(groups: list[Group], x_kind: str, metric: str, metric_name: str,
                    comparison: Comparison | None = None):
    """One plot; with a comparison that matches a group, a second panel zooms on the end."""
    from matplotlib.figure import Figure  # no pyplot: no GUI back-end, no global state
    from matplotlib.ticker import MaxNLocator

    longest = max(run.records[-1]["train_time_s"] for group in groups for run in group.runs)
    unit, seconds_per_unit = time_unit(longest)
    runs_per_group = sorted({len(group.runs) for group in groups})
    over = f"{runs_per_group[0]}" if len(runs_per_group) == 1 else f"{runs_per_group[0]}–{runs_per_group[-1]}"
    zoomed = comparison is not None and any(comparison.match(group) for group in groups)
    figure = Figure(figsize=(12, 5.5) if zoomed else (7.5, 5), dpi=120, layout="constrained")
    panels = figure.subplots(1, 2, width_ratios=[3, 2]) if zoomed else [figure.add_subplot()]
    x_name = "Iterations (optimizer steps)" if x_kind == "step" else f"Training time ({unit}, evaluation excluded)"
    for axes in panels:
        compared, ends = draw_curves(axes, groups, x_kind, metric, seconds_per_unit, comparison)
        axes.set_xlabel(x_name)
        if x_kind == "step":
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(f"{metric_name} validation accuracy (%)")
        axes.grid(True, alpha=0.3)
    title = (f"{metric_name} accuracy vs. {'iterations' if x_kind == 'step' else 'training time'}\n"
             f"mean of {over} runs per line, band: ± 2 standard deviations")
    if zoomed:
        main, zoom = panels
        main.set_title(title, fontsize=11)
        zoom_on_the_end(zoom, compared, ends, x_span=float(np.ptp(main.dataLim.intervalx)))
        zoom.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=x_kind == "step"))
        zoom.set_title(f"the end, zoomed\nshaded: the {comparison.name}'s mean ± 2σ", fontsize=11)
        figure.legend(*main.get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    else:
        panels[0].set_title(title, fontsize=11)
        panels[0].legend(loc="lower right", fontsize=9)
    return figure


def write_plots(groups: list[Group], out: Path, comparison: Comparison | None = None) -> list[Path]:
    written = []
    for name, (x_kind, metric, metric_name) in PLOTS.items():
        path = out / name
        accuracy_figure(groups, x_kind, metric, metric_name, comparison).savefig(path)
        written.append(path)
    return written


# ---------------------------------------------------------------------------- the report


def markdown(groups: list[Group], unfinished: list[Run], comparison: Comparison | None = None) -> str:
    lines = ["# Results", "",
             "Last evaluation of each run; each cell is the mean ± 2 sample standard deviations over the "
             "group's runs (the mean alone for a single run).", "", results_table(groups, comparison), ""]
    if comparison:
        first, *rest = comparison_notes(groups, comparison)
        lines += [first, ""] + [f"- {note}" for note in rest] + ([""] if rest else [])
    lines += ["| ![](step_vs_acc1.png) | ![](step_vs_acc5.png) |", "|:--:|:--:|",
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
        description="Results table (mean ± 2σ over seeds) and accuracy plots from training run directories.",
        epilog="Documentation: docs/results.md")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_GLOB",
                        help="run directories, globs (quoted: 'runs/r50-*'), or folders holding run directories")
    parser.add_argument("--out", type=Path, default=Path("report"),
                        help="where results.md and the four PNG plots go (default: report/)")
    parser.add_argument("--compare", choices=reference_names(), default=None,
                        help="put a published table beside ours: 'seed' is the seed project's ResNet-50 rows, "
                             "matched by model and optimizer, with ✓/✗ for our mean inside/outside its ± 2σ")
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
    comparison = load_comparison(args.compare) if args.compare else None
    results = args.out / "results.md"
    results.write_text(markdown(groups, unfinished, comparison), encoding="utf-8")
    plots = write_plots(groups, args.out, comparison)
    print(results_table(groups, comparison))
    if comparison:
        print("\n" + "\n".join(textwrap.wrap(comparison_notes(groups, comparison)[0], width=100)))
        print("\n".join(f"- {note}" for note in comparison_notes(groups, comparison)[1:]))
    print(f"\n{len(runs) - len(unfinished)} finished run(s) in {len(groups)} group(s); wrote {results} and "
          f"{', '.join(p.name for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
