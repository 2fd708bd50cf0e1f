"""The seed's features in one real two-process run, as a user coming from the seed would set
them: its own WebDataset shards with the DALI loader, ``preload_local`` into a stand-in
``$TMPDIR``, ``profile_steps`` and ``wandb_on`` (offline). Each test checks one of them;
then a second job on the same "node" reuses the local copy."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import accelerate_launch, free_port, make_image_folder, run_train, tiny_train_toml, write
from seed_format import write_seed_shards
from wandb_offline import offline_runs

from train.data.preload import LOCAL_FOLDER
from train.profiling import PROFILE_FOLDER
from train.rundir import read_metrics

FEATURES = ["--set", "train.preprocess.preload_local=true", "--set", "train.log.profile_steps=2",
            "--set", "train.log.wandb_on=true", "--set", 'train.log.project="reproduce_resnet"']


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def seed_setup(tmp_path_factory):
    """The seed's shards on the "shared file system", configs pointing at them, and a node-local folder."""
    tmp = tmp_path_factory.mktemp("seed-features")
    folder = make_image_folder(tmp / "imagenet")  # 3 classes, 24 training and 15 validation images
    shards = write_seed_shards(folder, tmp / "shared" / "imagenet-1k-wds")
    data = write(tmp / "data.toml", f'data_dir = "{shards}"\nnum_classes = 3\n\n'
                                    '[dataloader]\nname = "dali"\nnum_data_workers = 1\n')
    train = write(tmp / "train.toml", tiny_train_toml(max_epochs=3))  # 3 steps per epoch at global batch 8
    env = {"TMPDIR": str(tmp / "node-local"), "WANDB_MODE": "offline", "XDG_CACHE_HOME": str(tmp / "cache")}
    return tmp, shards, ["--data-cfg", str(data), "--train-cfg", str(train)], env


@pytest.fixture(scope="module")
def two_processes(seed_setup):
    tmp, shards, configs, env = seed_setup
    out = tmp / "out"
    result = run_train(configs + FEATURES + ["--output-dir", str(out)], launcher=accelerate_launch(2, port=free_port()),
                       **env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "on 2 process(es)" in result.stdout
    return out, result


def test_two_processes_train_on_the_seeds_shards_and_validate_every_image_once(two_processes):
    out, _ = two_processes
    records = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(r["val_samples"] == 15 for r in records)


def test_the_node_makes_one_local_copy_and_both_processes_read_it(two_processes, seed_setup):
    out, result = two_processes
    tmp, shards, _, _ = seed_setup
    (copy,) = [p for p in (tmp / "node-local" / LOCAL_FOLDER).iterdir() if p.is_dir()]
    assert tree(copy) == tree(shards)
    assert result.stdout.count("preload_local: copying") == 1
    assert f"preload_local: training reads {copy}, the local copy of {shards}" in result.stdout


def test_only_the_main_process_writes_a_profile(two_processes):
    out, _ = two_processes
    assert len(list((out / PROFILE_FOLDER).iterdir())) == 1


def test_only_the_main_process_logs_to_wandb(two_processes):
    out, _ = two_processes
    (attempt,) = offline_runs(out)  # one W&B run, not one per process
    assert attempt.project == "reproduce_resnet"  # the seed's [log] project key
    records = read_metrics(out / "metrics.jsonl")
    assert attempt.series("val/acc1") == [(r["step"], pytest.approx(r["val_acc1"])) for r in records]


def test_a_later_job_on_the_node_reuses_the_local_copy(two_processes, seed_setup):
    tmp, shards, configs, env = seed_setup
    # Spoil every archive on the shared side, keeping its size: the copy still passes its check
    # by count and size, and only a run that reads the local copy can train.
    for tar in shards.glob("*.tar"):
        tar.write_bytes(bytes(tar.stat().st_size))
    one_epoch = ["--set", "train.max_epochs=1"]
    spoiled = run_train(configs + one_epoch + ["--output-dir", str(tmp / "control")], **env)
    assert spoiled.returncode == 2 and "is stale" in spoiled.stderr  # the control: the shared copy is unusable
    result = run_train(configs + FEATURES + one_epoch + ["--output-dir", str(tmp / "again")], **env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "preload_local: copying" not in result.stdout and "nothing to copy" in result.stdout
    assert read_metrics(tmp / "again" / "metrics.jsonl")[0]["val_samples"] == 15
