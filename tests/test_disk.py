"""What a study leaves on disk: the last epoch is never checkpointed, a finished cell's local
checkpoint is removed (its run keeps the artifact), and `status` says when the home is large."""

from __future__ import annotations

import json
import re

import pytest
from helpers import sweeper, write_spec
from mlflow.tracking import MlflowClient


@pytest.mark.slow
def test_a_finished_cell_leaves_no_local_checkpoint_and_its_last_epoch_none(sweeper_env, tmp_path):
    import torch

    home = tmp_path / "home"
    spec = write_spec(tmp_path / "disk.toml", epochs=2, limit_train=64, checkpoint_every="epoch")
    sweeper("launch", "--study", str(spec), env=sweeper_env)
    worker = sweeper(
        "worker", "--study", "disk", "--device", "cpu", "--precision", "fp32", "--no-system-metrics", env=sweeper_env
    )
    assert "checkpoint of epoch 1 sent" in worker.stderr
    assert re.search(
        r"short4/digits/s1 ready after \d+\.\ds \(\d+ parameters, 64 training images\); training 2", worker.stderr
    )
    assert "checkpoint of epoch 2" not in worker.stderr, "the last epoch ends with the model: no checkpoint"
    assert not any((home / "checkpoints").rglob("*.pt")), list((home / "checkpoints").rglob("*"))

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("disk").experiment_id], "tags.`sweeper.role` = 'cell'")
    path = client.download_artifacts(run.info.run_id, "checkpoint/last.pt", str(tmp_path / "dl"))
    assert torch.load(path, weights_only=True)["epoch"] == 1

    small = json.loads(sweeper("status", "--study", "disk", "--format", "json", env=sweeper_env).stdout)
    assert 0 < small["home_bytes"] < 1e9
    assert "SWEEPER_HOME" not in sweeper("status", "--study", "disk", env=sweeper_env).stdout
    with open(home / "big.bin", "wb") as f:  # sparse: 1.2 GB of size, no disk used
        f.truncate(1_200_000_000)
    text = sweeper("status", "--study", "disk", env=sweeper_env).stdout
    assert f"SWEEPER_HOME {home} holds 1.2 GB" in text, text
