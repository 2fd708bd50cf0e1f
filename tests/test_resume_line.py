"""The line a resumed run logs names the checkpoint it resumed from: its epoch, batch and step."""

from __future__ import annotations

import re

from helpers import data_toml, tiny_train_toml, write
from train.cli import main


def test_resume_line_gives_the_checkpoints_own_step(tiny_folder, tmp_path):
    # 3 steps per epoch, a checkpoint every 2 steps: 00000004 is epoch 2 after its first batch.
    data = write(tmp_path / "data.toml", data_toml(tiny_folder))
    log_keys = "checkpoint_every_steps = 2\nkeep_last = 9\n"  # [log] is the config's last table
    train = write(tmp_path / "train.toml", tiny_train_toml(max_epochs=2) + log_keys)
    run = tmp_path / "run"
    args = ["--data-cfg", str(data), "--train-cfg", str(train), "--output-dir", str(run)]
    assert main(args) == 0
    assert (run / "checkpoints" / "00000004").is_dir()
    assert main(args + ["--resume", str(run / "checkpoints" / "00000004")]) == 0
    resumed = re.findall(r"resumed from .*: .*", (run / "train.log").read_text())
    assert resumed == [f"resumed from {run / 'checkpoints' / '00000004'}: epoch 2, batch 1, step 4"]
