"""Wall time to the seed recipe's accuracy: the seed recipe against a fast recipe, in alternating rounds.

    python benchmarks/time_to_accuracy.py [--data-cfg DATA.toml] [--seed-cfg S.toml] [--fast-cfg F.toml]
                                          [--rounds 3] [--set SECTION.KEY=VALUE ...] [--json OUT.json]

By default both recipes train on the built-in data set: the seed recipe is what
``python -m train`` runs (``train/defaults/builtin-train.toml``: SGD, cosine with warm-up, one
crop size, 8 epochs), the fast recipe is FFCV's ResNet-50 recipe scaled to that data set
(``train/defaults/builtin-fast-train.toml``: fewer epochs, the triangular schedule, crops that
grow, BlurPool, a larger evaluation crop, test-time flip). Give any image folder with
``--data-cfg`` (a data TOML, e.g. ``data_dir = "/data/my-folder"``), and other recipes with
``--seed-cfg``/``--fast-cfg``; ``--set`` overrides go to both.

Each round trains each recipe once, each in a process of its own, in alternating order (seed
then fast, then fast then seed) so that a machine that slows down or speeds up during the run
weighs on both alike. The target of a round is the top-1 its seed run ended at. A run's time
to the target is its training time plus its evaluation time up to and including the first
evaluation at or above the target (from ``metrics.jsonl``: ``train_time_s`` and the
``eval_time_s`` of each record so far), so start-up, which both recipes share, is not counted;
the process's whole wall time is printed beside it. The median round is reported, and the ratio
fast / seed of the medians: below 1 means the fast recipe got there sooner.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = REPO / "train" / "defaults"
RECIPES = ("seed", "fast")


@dataclass
class Result:
    """One training run of one recipe in one round."""
    recipe: str
    round: int
    final_acc1: float
    epochs: int
    process_wall_s: float
    seconds_to_target: float | None = None  # None: never reached the round's target
    epoch_at_target: int | None = None


def time_to_reach(records: list[dict], target: float) -> tuple[float, int] | tuple[None, None]:
    """Training plus evaluation seconds until the first evaluation at or above ``target``, and its epoch."""
    eval_so_far = 0.0
    for record in records:
        eval_so_far += record["eval_time_s"]
        if record["val_acc1"] >= target:
            return record["train_time_s"] + eval_so_far, record["epoch"]
    return None, None


def round_order(index: int) -> tuple[str, str]:
    """Seed first in even rounds, fast first in odd ones."""
    return RECIPES if index % 2 == 0 else RECIPES[::-1]


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_once(recipe: str, train_cfg: Path, args: argparse.Namespace, run_dir: Path) -> tuple[list[dict], float]:
    command = [sys.executable, "-m", "train", "--train-cfg", str(train_cfg), "--output-dir", str(run_dir)]
    if args.data_cfg:
        command += ["--data-cfg", str(args.data_cfg)]
    for override in args.set:
        command += ["--set", override]
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_")}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise SystemExit(f"error: the {recipe} recipe ({train_cfg}) failed with exit status {result.returncode}:\n"
                         f"{tail}")
    return read_metrics(run_dir), wall


def run_round(index: int, configs: dict[str, Path], args: argparse.Namespace, work: Path) -> list[Result]:
    runs = {}
    for recipe in round_order(index):
        runs[recipe] = train_once(recipe, configs[recipe], args, work / f"round{index + 1}-{recipe}")
    target = runs["seed"][0][-1]["val_acc1"]
    results = []
    for recipe in RECIPES:
        records, wall = runs[recipe]
        seconds, epoch = time_to_reach(records, target)
        results.append(Result(recipe, index + 1, records[-1]["val_acc1"], records[-1]["epoch"], wall, seconds, epoch))
    return results


def summarise(results: list[Result]) -> dict:
    """Medians over the rounds; the time to target only over the rounds where the recipe got there."""
    summary = {}
    for recipe in RECIPES:
        mine = [r for r in results if r.recipe == recipe]
        reached = [r.seconds_to_target for r in mine if r.seconds_to_target is not None]
        summary[recipe] = {
            "median_final_acc1": statistics.median(r.final_acc1 for r in mine),
            "median_seconds_to_target": statistics.median(reached) if reached else None,
            "rounds_reaching_target": len(reached), "rounds": len(mine),
            "median_process_wall_s": statistics.median(r.process_wall_s for r in mine)}
    seed, fast = (summary[r]["median_seconds_to_target"] for r in RECIPES)
    summary["fast_over_seed"] = fast / seed if seed and fast is not None else None
    return summary


def describe(result: Result) -> str:
    reached = (f"target reached at epoch {result.epoch_at_target} after {result.seconds_to_target:.1f} s"
               if result.seconds_to_target is not None else "target never reached")
    return (f"round {result.round} {result.recipe:>4}: final top-1 {result.final_acc1:.2f}% after "
            f"{result.epochs} epochs, {reached}; process wall {result.process_wall_s:.1f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-cfg", type=Path, default=None, help="data TOML (default: the built-in data set)")
    parser.add_argument("--seed-cfg", type=Path, default=DEFAULTS / "builtin-train.toml")
    parser.add_argument("--fast-cfg", type=Path, default=DEFAULTS / "builtin-fast-train.toml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override for both recipes, as python -m train takes it (repeatable)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the run directories here")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    for name in ("data_cfg", "seed_cfg", "fast_cfg"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            parser.error(f"--{name.replace('_', '-')}: {path}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = {"seed": args.seed_cfg.resolve(), "fast": args.fast_cfg.resolve()}
    with tempfile.TemporaryDirectory(prefix="time-to-accuracy-") as scratch:
        work = args.work_dir or Path(scratch)
        results = []
        for index in range(args.rounds):
            for result in run_round(index, configs, args, work):
                results.append(result)
                print(describe(result), flush=True)
    summary = summarise(results)
    for recipe in RECIPES:
        figures = summary[recipe]
        seconds = figures["median_seconds_to_target"]
        print(f"{recipe}: median final top-1 {figures['median_final_acc1']:.2f}%, median time to the seed's "
              f"final top-1 " + (f"{seconds:.1f} s" if seconds is not None else "never reached")
              + f" ({figures['rounds_reaching_target']} of {figures['rounds']} rounds reached it)")
    if summary["fast_over_seed"] is not None:
        print(f"time to the seed's accuracy, fast / seed: {summary['fast_over_seed']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"results": [asdict(r) for r in results], "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
