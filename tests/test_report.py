"""`sweeper report` on a real (tiny) study: every format parses and holds what MLflow holds.

The module runs one study once (2 variants x digits x 2 seeds, 2 epochs on a few hundred
images, two worker processes), then reads it in every format. The last test grows the study by
one variant without running it, so its cells are WAITING.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from sweeper import report, seed_results

STUDY = "report-tiny"
VARIANTS = ["short4", "short3"]  # the spec's order; the report uses the seed's: short3, then short4
SEEDS = [1, 2]
SPEC = textwrap.dedent("""\
    description = "sweeper report test: 2 variants x digits x 2 seeds"
    [grid]
    variant = {variants}
    dataset = ["digits"]
    seed = [1, 2]
    [train]
    epochs = 2
    limit_train = 256
    limit_test = 128
    """)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI", "SWEEPER_STUDY")}
    return {**env, "SWEEPER_HOME": str(home), "SWEEPER_DATA_DIR": str(home / "data")}


def _sweeper(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sweeper", *args],
        env=_env(home),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A finished tiny study: (home, stdout of `launch --format json`)."""
    home = tmp_path_factory.mktemp("report-home")
    spec = home / f"{STUDY}.toml"
    spec.write_text(SPEC.format(variants=json.dumps(VARIANTS)))
    done = _sweeper(home, "launch", "--study", str(spec), "--workers", "2", "--format", "json")
    assert done.returncode == 0, done.stderr[-3000:]
    return home, done.stdout


@pytest.fixture(scope="module")
def mlflow_runs(study):
    """run name -> MLflow run, read straight from the tracking store."""
    from mlflow.tracking import MlflowClient

    home, _ = study
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(STUDY)
    runs = client.search_runs([experiment.experiment_id], "tags.`sweeper.role` = 'cell'")
    return {r.info.run_name: r for r in runs}


def report_cli(home: Path, *args: str) -> str:
    """`sweeper report --study STUDY ARGS` in this process (an import of mlflow costs seconds)."""
    from sweeper.cli import cli

    runner = CliRunner()
    env = {**_env(home), "SWEEPER_STORAGE": None, "MLFLOW_TRACKING_URI": None, "SWEEPER_STUDY": None}
    result = runner.invoke(cli, ["report", "--study", STUDY, *args], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.slow
def test_launch_json_ends_with_the_report(study):
    _, stdout = study
    rows = json.loads(stdout)  # one JSON document, nothing else on stdout
    assert len(rows) == len(VARIANTS) * len(SEEDS)
    assert {r["state"] for r in rows} == {"COMPLETE"}


@pytest.mark.slow
def test_json_numbers_are_mlflow_numbers(study, mlflow_runs):
    home, _ = study
    rows = json.loads(report_cli(home, "--format", "json"))
    assert [list(r) for r in rows] == [report.FRAME_COLUMNS] * 4
    assert [(r["variant"], r["seed"]) for r in rows] == [("short3", 1), ("short3", 2), ("short4", 1), ("short4", 2)]
    for row in rows:
        run = mlflow_runs[f"{row['variant']}/{row['dataset']}/s{row['seed']}"]
        m = run.data.metrics
        assert row["state"] == "COMPLETE"
        assert row["mlflow_run_id"] == run.info.run_id
        assert row["top1_error"] == m["top1_error"]
        assert row["top5_error"] == m["top5_error"]
        assert row["params"] == m["num_params"] and isinstance(row["params"], int)
        assert row["macs"] == m["macs"]
        assert row["train_seconds"] == m["train_seconds"]
        assert row["images_per_s"] == m["images_per_s"]


@pytest.mark.slow
def test_build_frame(study):
    home, _ = study
    frame = report.build_frame(STUDY, f"sqlite:///{home / 'optuna.db'}", f"sqlite:///{home / 'mlflow.db'}")
    assert list(frame.columns) == report.FRAME_COLUMNS
    assert len(frame) == 4 and frame.attrs["epochs"] == 2 and frame.attrs["parent_run_id"]


@pytest.mark.slow
def test_csv_parses_and_matches(study, mlflow_runs):
    home, _ = study
    text = report_cli(home, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 4 and list(rows[0]) == report.FRAME_COLUMNS
    for row in rows:
        m = mlflow_runs[f"{row['variant']}/{row['dataset']}/s{row['seed']}"].data.metrics
        assert float(row["top1_error"]) == m["top1_error"]
        assert int(row["params"]) == m["num_params"]
    frame = pd.read_csv(io.StringIO(text))
    assert frame["params"].dtype.kind == "i"


@pytest.mark.slow
def test_markdown_is_the_seed_table_with_mean_and_std(study, mlflow_runs):
    home, _ = study
    text = report_cli(home, "--format", "markdown")
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["Variant", "Top 1 Error", "Top 5 Error", "Parameters", "Time(2 epoch)", "MACs", "Seeds"]
    assert set(lines[1]) <= set("|-: ")
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[0] for row in body] == ["short3", "short4"]  # the seed's order, not the spec's
    for row in body:
        values = [mlflow_runs[f"{row[0]}/digits/s{s}"].data.metrics for s in SEEDS]
        top1 = pd.Series([v["top1_error"] for v in values])
        assert row[1] == f"{top1.mean():.4f} ± {top1.std():.4f}"
        assert row[3] == str(int(values[0]["num_params"]))
        assert row[6] == "2"


@pytest.mark.slow
def test_table_format(study):
    home, _ = study
    text = report_cli(home)
    assert "GoogLeNet on digits" in text and "Top 1 Error" in text and "short4" in text and "±" in text


@pytest.mark.slow
def test_html_and_plots_are_files_and_artifacts(study, tmp_path):
    from mlflow.tracking import MlflowClient

    home, _ = study
    plots, out = tmp_path / "plots", tmp_path / "out" / "report.html"
    assert report_cli(home, "--format", "html", "--plots", str(plots), "--output", str(out)) == ""
    names = sorted(report.PLOT_FILES.values())
    assert sorted(p.name for p in plots.iterdir()) == names
    for name in names:
        data = (plots / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # the temp file was renamed

    class Tables(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.cells, self._in_cell = [], [], False

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs)))
            self._in_cell = tag in ("td", "th")

        def handle_data(self, data):
            if self._in_cell and data.strip():
                self.cells.append(data.strip())

    parser = Tables()
    parser.feed(out.read_text(encoding="utf-8"))
    kinds = [t for t, _ in parser.tags]
    assert kinds.count("table") == 1 and kinds.count("tr") == 3
    assert "Top 1 Error" in parser.cells and "short3" in parser.cells
    images = [a["src"] for t, a in parser.tags if t == "img"]
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    parent = client.search_runs([client.get_experiment_by_name(STUDY).experiment_id], "tags.`sweeper.role` = 'study'")[
        0
    ]
    logged = sorted(a.path for a in client.list_artifacts(parent.info.run_id, report.ARTIFACT_DIR))
    assert logged == sorted([f"{report.ARTIFACT_DIR}/{n}" for n in [*names, "report.md", "report.html"]])


@pytest.mark.slow
def test_unknown_study_is_one_clear_line(study):
    home, _ = study
    done = _sweeper(home, "report", "--study", "no-such-study")
    assert done.returncode == 1
    assert "Error: no study named 'no-such-study'" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


# --- the seed's numbers (no study needed) -----------------------------------------------------


def fake_frame() -> pd.DataFrame:
    rows = [
        ("standard", "cifar100", 1, "COMPLETE", 0.36, 0.11, 6258500, 1_530_000_000, 1700.0),
        ("standard", "cifar100", 2, "COMPLETE", 0.34, 0.09, 6258500, 1_530_000_000, 1800.0),
        ("short4", "cifar100", 1, "RUNNING", 0.7, 0.4, None, None, None),
        ("naive", "cifar100", 1, "FAIL", None, None, None, None, None),
        ("standard", "digits", 1, "COMPLETE", 0.2, 0.01, 6000000, 1000, 10.0),
    ]
    frame = pd.DataFrame(
        [
            dict(
                zip(
                    [
                        "variant",
                        "dataset",
                        "seed",
                        "state",
                        "top1_error",
                        "top5_error",
                        "params",
                        "macs",
                        "train_seconds",
                    ],
                    r,
                ),
                images_per_s=100.0,
                mlflow_run_id=f"r{i}",
            )
            for i, r in enumerate(rows)
        ],
        columns=report.FRAME_COLUMNS,
    )
    return report._typed(frame)


def test_seed_results_hold_both_tables():
    assert len(seed_results.SEED_RESULTS["cifar100"]) == len(seed_results.SEED_RESULTS["cifar10"]) == 7
    assert list(seed_results.SEED_RESULTS["cifar100"]) == list(report.VARIANT_ORDER)
    std = seed_results.SEED_RESULTS["cifar100"]["standard"]
    assert (std.top1_error, std.top5_error, std.params, std.time, std.seconds) == (0.34, 0.10, 6258500, "29m8s", 1748)
    assert seed_results.SEED_RESULTS["cifar10"]["long"].seconds == 40 * 60 + 12
    assert seed_results.parse_duration("1h2m3s") == 3723


def test_against_seed_merge():
    merged = report.with_seed(fake_frame())
    std = merged[(merged["variant"] == "standard") & (merged["dataset"] == "cifar100")]
    assert set(std["seed_params"]) == {6258500} and set(std["seed_time"]) == {"29m8s"}
    assert set(std["seed_train_seconds"]) == {1748}
    assert merged.loc[merged["dataset"] == "digits", "seed_params"].isna().all()  # the post has no digits table

    tables = {t.dataset: t for t in report.tables(fake_frame(), epochs=14, against_seed=True)}
    cifar = tables["cifar100"]
    assert cifar.columns == [
        "Variant",
        "Top 1 Error",
        "Seed Top 1 Error",
        "Top 5 Error",
        "Seed Top 5 Error",
        "Parameters",
        "Seed Parameters",
        "Time(14 epoch)",
        "Seed Time(14 epoch)",
        "MACs",
        "Seeds",
    ]
    rows = {r[0]: dict(zip(cifar.columns, r)) for r in cifar.rows}
    assert list(rows) == ["naive", "standard", "short4"]  # the seed's order
    assert rows["standard"]["Seed Parameters"] == "6258500" and rows["standard"]["Seed Top 1 Error"] == "0.34"
    assert rows["standard"]["Seed Time(14 epoch)"] == "29m8s"
    assert rows["standard"]["Top 1 Error"] == "0.3500 ± 0.0141"
    assert rows["standard"]["Time(14 epoch)"] == "29m10s ± 1m11s"
    assert rows["short4"]["Top 1 Error"] == "RUNNING" and rows["naive"]["Top 1 Error"] == "FAIL"
    assert rows["naive"]["Seed Top 1 Error"] == "0.36"
    assert "Seed Top 1 Error" not in tables["digits"].columns

    markdown = report.render(fake_frame(), "markdown", 14, "fake", against_seed=True)
    assert "6258500" in markdown and "29m8s" in markdown
    document = json.loads(report.render(fake_frame(), "json", against_seed=True))
    by_cell = {(r["variant"], r["dataset"], r["seed"]): r for r in document}
    assert by_cell[("naive", "cifar100", 1)]["seed_params"] == 65736148
    assert by_cell[("standard", "digits", 1)]["seed_params"] is None


def test_format_duration_like_the_seed():
    assert report.format_duration(1748) == "29m8s"
    assert report.format_duration(3158) == "52m38s"
    assert report.format_duration(3725) == "1h2m5s"
    assert report.format_duration(42.4) == "42s"
    assert report.format_duration(2.34) == "2.3s"
    assert report.format_duration(float("nan")) == ""


# --- the cells' models: MLflow loads them, the best one is registered ---------------------------


@pytest.mark.slow
def test_each_finished_cell_logs_a_model_that_mlflow_loads(study, mlflow_runs, monkeypatch):
    import mlflow
    import torch
    from mlflow.models import Model

    home, _ = study
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    for key, run in mlflow_runs.items():
        name = key.replace("/", "-")  # the model is named after its cell
        signature = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/{name}").signature
        assert [s.shape for s in signature.inputs.inputs] == [(-1, 1, 8, 8)], signature
        assert [s.shape for s in signature.outputs.inputs] == [(-1, 10)], signature
    key, run = next(iter(mlflow_runs.items()))
    uri = f"runs:/{run.info.run_id}/{key.replace('/', '-')}"
    local = mlflow.artifacts.download_artifacts(uri)
    example = Model.load(local).load_input_example(local)  # a few test images, as the model takes them
    assert example.dtype == "float32" and example.shape[1:] == (1, 8, 8) and len(example) > 1
    module = mlflow.pytorch.load_model(uri)
    with torch.no_grad():
        assert module(torch.from_numpy(example)).shape == (len(example), 10)


@pytest.mark.slow
def test_each_cells_model_is_named_by_cell_with_its_params_and_metrics(study, mlflow_runs):
    from mlflow.tracking import MlflowClient

    home, _ = study
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(STUDY)
    models = {m.name: m for m in client.search_logged_models([experiment.experiment_id])}
    assert sorted(models) == sorted(key.replace("/", "-") for key in mlflow_runs), "one model per cell, by cell"
    for key, run in mlflow_runs.items():
        model = models[key.replace("/", "-")]
        assert model.status.name == "READY" and model.source_run_id == run.info.run_id
        assert model.params == run.data.params  # the cell (variant, dataset, seed) and its recipe
        assert model.params["variant"] == key.split("/")[0] and model.tags["sweeper.key"] == key
        metrics = {m.key: m.value for m in model.metrics}
        for name in ("top1_error", "top5_error", "num_params", "macs", "train_seconds"):
            assert metrics[name] == run.data.metrics[name], name


@pytest.mark.slow
def test_load_model_gives_back_the_trained_module_ready_to_fine_tune(study, mlflow_runs, monkeypatch):
    import torch
    import torch.nn.functional as F

    import sweeper.api as sw
    from sweeper.data import load
    from sweeper.data.loader import normalize
    from sweeper.errors import SweeperError
    from sweeper.train import evaluate

    home, _ = study
    monkeypatch.setenv("SWEEPER_HOME", str(home))
    for name in ("SWEEPER_STORAGE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    key, run = sorted(mlflow_runs.items())[0]
    model = sw.load_model(STUDY, key)
    assert isinstance(model, torch.nn.Module) and type(model).__name__ == "GoogLeNet" and model.training
    params = run.data.params
    data = load("digits").limit(int(params["limit_train"]), int(params["limit_test"]))
    bf16 = run.data.tags["sweeper.precision"] == "bf16"  # evaluated as it trained: precision and layout
    layout = getattr(torch, run.data.tags["sweeper.memory_format"].replace("contiguous", "contiguous_format"))
    model = model.to(memory_format=layout)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    _, top1, _ = evaluate(model, data.test_x, data.test_y, 1000, autocast, layout)
    assert abs(top1 - run.data.metrics["top1_error"]) <= 1e-4  # the logged error, on the evaluation split

    model.train()  # and it trains on
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = F.cross_entropy(model(normalize(data.train_x[:32])), data.train_y[:32])
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))

    assert type(sw.load_model(STUDY, key.replace("/", "-"))).__name__ == "GoogLeNet"  # by model name too
    with pytest.raises(SweeperError, match=f"study '{STUDY}' has no cell 'nope'; its cells: "):
        sw.load_model(STUDY, "nope")


@pytest.mark.slow
def test_register_best_registers_the_best_cells_model(study, mlflow_runs):
    from mlflow.tracking import MlflowClient

    home, _ = study
    done = _sweeper(home, "report", "--study", STUDY, "--register-best", "tiny-best", "--format", "json")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)  # the same list of rows as without the option; the best one says what was registered
    assert isinstance(rows, list) and len(rows) == 4
    (registered,) = [r["registered"] for r in rows if r["registered"] is not None]
    assert registered["version"] == 1
    best = min(run.data.metrics["top1_error"] for run in mlflow_runs.values())
    run = mlflow_runs[registered["cell"]]
    assert run.data.metrics["top1_error"] == best == registered["value"] and registered["metric"] == "top1_error"
    assert registered["run_id"] == run.info.run_id and registered["model_uri"] == "models:/tiny-best/1"

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    version = client.get_model_version("tiny-best", "1")
    assert version.run_id == run.info.run_id and version.status == "READY"
    assert version.tags["sweeper.study"] == STUDY and version.tags["sweeper.key"] == registered["cell"]

    again = _sweeper(home, "report", "--study", STUDY, "--register-best", "tiny-best")
    assert again.returncode == 0 and "GoogLeNet on digits" in again.stdout  # the table, as without the option
    assert f"registered models:/tiny-best/2: cell {registered['cell']} of study {STUDY}" in again.stderr
    csv = _sweeper(home, "report", "--study", STUDY, "--register-best", "tiny-best", "--format", "csv").stdout
    assert csv.splitlines()[0].endswith(",registered") and "models:/tiny-best/3" in csv


@pytest.mark.slow
def test_register_best_against_an_mlflow_server(tmp_path, sweeper_env, mlflow_server, monkeypatch):
    import mlflow
    import torch
    from helpers import sweeper, write_spec
    from mlflow.tracking import MlflowClient

    server = mlflow_server()
    env = {**sweeper_env, "MLFLOW_TRACKING_URI": server.url}
    sweeper("launch", "--study", str(write_spec(tmp_path / "served.toml", epochs=1)), env=env)
    none = sweeper("report", "--study", "served", "--register-best", "served-best", env=env, check=False)
    assert none.returncode == 1 and none.stdout == "" and "Traceback" not in none.stderr
    assert "Error: study 'served' has no finished cell, so no model to register" in none.stderr

    sweeper("worker", "--study", "served", "--device", "cpu", "--no-system-metrics", env=env)
    sweeper("verify", "--study", "served", env=env)  # the model is there, each epoch logged once
    (row,) = json.loads(
        sweeper("report", "--study", "served", "--register-best", "served-best", "--format", "json", env=env).stdout
    )
    registered = row["registered"]
    client = MlflowClient(server.url)
    assert client.get_model_version("served-best", "1").run_id == registered["run_id"] == row["mlflow_run_id"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    module = mlflow.pytorch.load_model(registered["model_uri"])  # needs neither sweeper nor the study's data
    assert module(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


# --- last: grow the study by one variant that no worker runs ------------------------------------


@pytest.mark.slow
def test_unrun_cell_shows_its_state(study):
    home, _ = study
    grown = home / "grown" / f"{STUDY}.toml"
    grown.parent.mkdir()
    grown.write_text(SPEC.format(variants=json.dumps([*VARIANTS, "short2"])))
    from sweeper.cli import cli

    env = {**_env(home), "SWEEPER_STORAGE": None, "MLFLOW_TRACKING_URI": None, "SWEEPER_STUDY": None}
    done = CliRunner().invoke(cli, ["launch", "--study", str(grown), "--force-update"], env=env, catch_exceptions=False)
    assert done.exit_code == 0, done.output  # enqueued, no worker: the new cells stay WAITING

    text = report_cli(home, "--format", "markdown")
    lines = [line for line in text.splitlines() if line.startswith("|")]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    rows = {r[0]: r for r in body}
    assert list(rows) == ["short2", "short3", "short4"]
    assert rows["short2"][1:3] == ["WAITING", "WAITING"] and rows["short2"][6] == "0/2 (WAITING)"
    assert "±" in rows["short3"][1]
    document = json.loads(report_cli(home, "--format", "json"))
    waiting = [r for r in document if r["variant"] == "short2"]
    assert [r["state"] for r in waiting] == ["WAITING", "WAITING"]
    assert all(r["top1_error"] is None and r["mlflow_run_id"] is None for r in waiting)
