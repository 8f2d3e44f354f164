"""One JSON shape per command whatever the flags, bad input exit 2, no library warning unless
asked for, and one log line format (sweeper's, MLflow's and Optuna's lines alike)."""

from __future__ import annotations

import logging
import re
import warnings

import pytest
from click.testing import CliRunner

from sweeper.cli import cli


@pytest.fixture(autouse=True)
def own_environment(monkeypatch):
    """logs.configure() writes SWEEPER_VERBOSITY and MLFLOW_CONFIGURE_LOGGING for the processes a
    command starts: undone after each test, so no later test's subprocess inherits them."""
    monkeypatch.delenv("SWEEPER_VERBOSITY", raising=False)
    monkeypatch.delenv("MLFLOW_CONFIGURE_LOGGING", raising=False)


LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+\[\d+\]: ")


def test_api_calls_raise_no_optuna_experimental_warning(sweeper_env):
    import optuna

    import sweeper.api as api

    raw = {"name": "quiet", "grid": {"variant": ["short4"], "dataset": ["digits"]}, "train": {"epochs": 1}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", optuna.exceptions.ExperimentalWarning)
        assert api.launch(raw)["enqueued"] == 1
        assert api.status("quiet")["state"] == "running"
        assert api.set_state("quiet", "pause")["changed"] is True


@pytest.mark.parametrize(
    "args, message",
    [
        (["report", "--study", "x", "--compare", "standard"], "--compare takes two different variants as A,B"),
        (["report", "--study", "x", "--compare", "a,a"], "--compare takes two different variants"),
        (["report", "--study", "x", "--compare", "a,b", "--format", "html"], "--compare prints table, markdown"),
        (["train", "--variant", "short4", "--dataset", "digits", "--format", "text"], "'text' is not one of"),
        (["worker", "--verbose", "--quiet"], "--verbose and --quiet do not go together"),
    ],
)
def test_bad_input_exits_2_before_anything_is_read(args, message, sweeper_env):
    from sweeper.cli import friendly_errors

    result = CliRunner().invoke(cli, args)
    if isinstance(result.exception, SystemExit) or result.exception is None:
        code, text = result.exit_code, result.output
    else:  # a BadInput: main() turns it into exit 2 and one line, as friendly_errors does here
        with pytest.raises(SystemExit) as exited, friendly_errors():
            raise result.exception
        code, text = exited.value.code, str(result.exception)
    assert code == 2 and message in text, (code, text)


def test_log_lines_carry_the_level_and_one_date_format(capsys):
    from sweeper import logs

    logging.captureWarnings(False)  # an earlier test's configure() ended with pytest's own warnings capture
    logs.configure(None)
    try:
        logging.getLogger("sweeper.worker").info("claimed")
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
        import optuna

        optuna.logging.get_logger("optuna.storages").warning("optuna speaks")
        warnings.warn("a library's warning", UserWarning, stacklevel=1)  # hidden without --verbose
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 3 and all(LINE.match(line) for line in lines), lines
        assert " INFO mlflow.store.db.utils[" in lines[1] and " WARNING optuna.storages[" in lines[2]

        logs.configure(1)
        warnings.warn("shown with --verbose", UserWarning, stacklevel=1)
        err = capsys.readouterr().err
        assert LINE.match(err) and "WARNING py.warnings" in err and "UserWarning: shown with --verbose" in err
        logs.configure(-1)
        logging.getLogger("sweeper.worker").info("not with --quiet")
        assert capsys.readouterr().err == ""
    finally:
        logging.captureWarnings(False)


# --- estimates: the same model for the dry run, status and the board -----------------------------


def test_pack_claims_longest_first_and_shares_the_cpu():
    from sweeper import estimate

    # GPUs (a worker per slot): longest first onto two workers, the short ones beside the long one
    assert estimate.pack([10.0, 100.0, 10.0], workers=2, device="cuda") == (120.0, 100.0)
    assert estimate.pack([10.0, 100.0, 10.0], workers=1, device="cuda") == (120.0, 120.0)
    # a CPU: two trials at once each run at 0.62 of their speed alone; the last one alone at full speed
    summed, wall = estimate.pack([100.0, 10.0, 10.0], workers=2, device="cpu")
    pair = 0.5**0.7  # the speed of each of two trials sharing the cores
    # the two short ones, one after the other beside the long one; then the long one's rest alone
    assert wall == pytest.approx(2 * 10 / pair + (100 - 2 * 10), abs=0.1)
    assert summed == pytest.approx(2 * 10 / pair + wall, abs=0.1) and wall < 120 < summed
    assert estimate.pack([], workers=2) == (0.0, 0.0)


def test_a_trial_estimate_includes_its_overhead_outside_training():
    from sweeper import estimate

    est = estimate.Estimator("cpu", probe=False)
    est._rates[("naive", "digits", "cpu")] = estimate.Rate(1000.0, "probe", overhead_s=20.0)
    est._rates[("short4", "digits", "cpu")] = estimate.Rate(1000.0, "probe", overhead_s=6.5)
    train = {"epochs": 4, "limit_train": 512}
    assert est.cell("short4", "digits", train)["estimate_s"] == pytest.approx(
        4 * (512 + 359 / 3) / 1000 + 6.5, abs=1e-3
    )
    assert est.cell("naive", "digits", train)["estimate_s"] > est.cell("short4", "digits", train)["estimate_s"]
