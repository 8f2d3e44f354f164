"""`launch --dry-run` with its time estimate, the ETA in `status`, and sweeper.api against the
same real stores the CLI uses (a real worker process trains one cell)."""

from __future__ import annotations

import json

import pytest
from helpers import sweeper, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_dry_run_estimates_enqueue_nothing_and_the_api_matches_the_cli(sweeper_env, tmp_path):
    import sweeper.api as api

    home = tmp_path / "home"
    spec = write_spec(tmp_path / "plan.toml", seeds=(1, 2), epochs=2)

    # Fresh stores: every trial would be enqueued, estimated from a probe of this machine; nothing is created.
    dry = json.loads(
        sweeper("launch", "--study", str(spec), "--dry-run", "--format", "json", env=sweeper_env, timeout=900).stdout
    )
    assert dry["dry_run"] and dry["to_enqueue"] == 2 and dry["already_enqueued"] == 0
    assert [t["estimate_source"] for t in dry["trials"]] == ["probe", "probe"]
    assert dry["estimate_total_s"] == pytest.approx(sum(t["estimate_s"] for t in dry["trials"]), abs=0.05)
    assert dry["estimate_total_s"] > 0
    assert not (home / "optuna.db").exists() and not (home / "mlflow.db").exists(), "a dry run writes nothing"
    assert dry["workers"] == 1 and dry["estimate_wall_s"] == dry["estimate_summed_s"] == dry["estimate_total_s"]
    text = sweeper("launch", "--study", str(spec), "--dry-run", "--workers", "2", env=sweeper_env, timeout=900).stdout
    assert "2 trial(s) would be enqueued, 0 already present" in text and "with 2 worker(s): " in text

    sweeper("launch", "--study", str(spec), env=sweeper_env)
    sweeper("worker", "--study", "plan", "--max-trials", "1", "--device", "cpu", "--no-system-metrics", env=sweeper_env)

    # One cell finished: the other is estimated from its measured images_per_s, and nothing is added.
    again = json.loads(
        sweeper("launch", "--study", str(spec), "--dry-run", "--format", "json", env=sweeper_env, timeout=900).stdout
    )
    assert again["to_enqueue"] == 0 and again["already_enqueued"] == 2
    assert [t["state"] for t in again["trials"]] == ["COMPLETE", "WAITING"]
    assert again["trials"][1]["estimate_source"] == "history (1 run of this host)"
    # the total is rounded to 0.1 s, each trial's estimate to 1 ms
    assert again["estimate_total_s"] == pytest.approx(again["trials"][1]["estimate_s"], abs=0.05)
    assert again["estimate_total_s"] > 0
    status = json.loads(sweeper("status", "--study", "plan", "--format", "json", env=sweeper_env, timeout=900).stdout)
    assert status["counts"]["WAITING"] == 1 and len(status["trials"]) == 2, "the dry run enqueued nothing"
    assert status["eta_s"] is None and status["eta_source"] == "no worker running"  # a waiting cell, no worker

    # sweeper.api reads the same stores as the CLI: results() is the report's CSV, row for row.
    frame = api.results("plan")
    csv = sweeper("report", "--study", "plan", "--format", "csv", env=sweeper_env).stdout
    assert frame.to_csv(index=False) == csv
    history = api.history("plan")
    done = frame[frame["state"] == "COMPLETE"].iloc[0]
    assert history["epoch"].tolist() == [1, 2] and set(history["mlflow_run_id"]) == {done["mlflow_run_id"]}
    assert history["top1_error"].iloc[-1] == pytest.approx(done["top1_error"])
    assert api.status("plan")["cells"] == status["cells"]

    # A spec given as a dict is launched like a file.
    raw = {"name": "fromdict", "grid": {"variant": ["short4"], "dataset": ["digits"]}, "train": {"epochs": 1}}
    launched = api.launch(raw)
    assert launched["enqueued"] == 1 and launched["study"] == "fromdict"
    assert api.status("fromdict")["counts"]["WAITING"] == 1
    assert api.launch(raw)["already_enqueued"] == 1
