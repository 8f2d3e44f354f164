"""Bad input at the real command line: one clear paragraph, exit code 2 (usage) or 1 (runtime),
no traceback, no password, nothing written. The cases run as concurrent subprocesses (each
pays the interpreter's start-up once, in parallel) and are checked one by one."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # worker processes, servers or a browser: the full suite's, not the inner loop's

SECRET = "s3cret"
BAD_PG = f"postgresql://user:{SECRET}@127.0.0.1:1/db"
BAD_HTTP = f"http://user:{SECRET}@127.0.0.1:1"
SLASHED_PG = f"postgresql://user:x/{SECRET}@127.0.0.1:1/db"  # "/" in a password: base64 ones have it
SLASHED_HTTP = f"http://user:x/{SECRET}@127.0.0.1:1"


@dataclass
class Case:
    name: str
    args: list[str]
    code: int
    message: str  # regex the stderr must match
    env: dict[str, str] = field(default_factory=dict)
    process: bool = False  # True: a real subprocess; False: `sweeper.cli.main()` in this process
    empty_home: bool = True  # nothing may be written to $SWEEPER_HOME
    proc: subprocess.Popen | None = None
    returncode: int | None = None
    home: Path | None = None
    started: float = 0.0
    seconds: float = 0.0
    out: str = ""
    err: str = ""


def spec_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / "specs" / f"{name}.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path)


GOOD = """[grid]
variant = ["short4"]
dataset = ["digits"]
[train]
epochs = 1
"""


def old_schema_storage(path: Path) -> str:
    """A storage made by this Optuna, then made to look like one made by Optuna 3.0: its
    alembic_version row and version_info table as an older release left them."""
    from sweeper.storage import connect

    url = f"sqlite:///{path}"
    connect.open_storage(url).engine.dispose()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE alembic_version SET version_num = 'v3.0.0.c'")
        db.execute("UPDATE version_info SET library_version = '3.0.0'")
    return url


def checkpoint_file(path: Path, **override) -> str:
    from sweeper import checkpoint

    state = {"epoch": 1, "variant": "short4", "dataset": "digits", "model": {"w": torch.zeros(2)}}
    checkpoint.save(path, state)
    if override:  # written as a future sweeper would, bypassing save()
        torch.save({**torch.load(path, weights_only=True), **override}, path)
    return str(path)


SEARCH = GOOD + "[search]\ntrials_per_cell = {trials}\n[search.space]\n{space}\n"
# (spec text, key named in the message, message): each was accepted by `launch` before (issue #15).
BAD_VALUES = [
    (
        SEARCH.format(trials=2, space='lr = { choices = ["a", "b"] }'),
        "search.space.lr",
        r"choice 'a': must be a number > 0",
    ),
    (
        SEARCH.format(trials=2, space="lr = { low = 0.1, high = 1.0, step = 0 }"),
        "search.space.lr",
        r"step must be > 0, got 0",
    ),
    (
        SEARCH.format(trials=2, space="lr = { low = 0.1, high = 1.0, log = true, step = 0.1 }"),
        "search.space.lr",
        r"log = true and step cannot be combined",
    ),
    (
        SEARCH.format(trials=2, space="lr = { low = 0.1, high = inf }"),
        "search.space.lr",
        r"high must be a finite number, got inf",
    ),
    (
        SEARCH.format(trials=2, space="weight_decay = { low = -0.5, high = 0.1 }"),
        "search.space.weight_decay",
        r"low must be a number >= 0, got -0.5",
    ),
    (
        SEARCH.format(trials=2, space="batch_size = { low = 16, high = 64.5 }"),
        "search.space.batch_size",
        r"high must be an integer >= 1 and <= 65536, got 64.5",
    ),
    (GOOD + "limit_test = -500\n", "train.limit_test", r"must be an integer >= 1, got -500"),
    (GOOD + "limit_train = -1\n", "train.limit_train", r"must be an integer >= 1, got -1"),
    (GOOD + "limit_train = 0\n", "train.limit_train", r"must be an integer >= 1, got 0"),
    (GOOD + "lr = nan\n", "train.lr", r"must be a finite number, got nan"),
    (GOOD + "momentum = 1.5\n", "train.momentum", r"must be a number >= 0 and < 1, got 1.5"),
]


def cases(tmp_path: Path) -> list[Case]:
    bad_archive = tmp_path / "cifar-10-python.tar.gz"
    bad_archive.write_bytes(os.urandom(4096))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(Path(checkpoint_file(tmp_path / "full.pt")).read_bytes()[:100])
    train = [
        "train",
        "--variant",
        "short3",
        "--dataset",
        "digits",
        "--epochs",
        "1",
        "--limit-train",
        "32",
        "--limit-test",
        "16",
        "--device",
        "cpu",
    ]
    return [
        Case(
            "malformed spec",
            ["launch", "--study", spec_file(tmp_path, "malformed", "[grid\nvariant = \n")],
            2,
            r"malformed\.toml: not valid TOML",
        ),
        Case(
            "misspelled key",
            ["launch", "--study", spec_file(tmp_path, "misspelled", GOOD.replace("variant", "varient"))],
            2,
            r"\[grid\] key 'varient': unknown key; allowed: variant, dataset, seed",
        ),
        Case(
            "misspelled table",
            ["launch", "--study", spec_file(tmp_path, "table", GOOD.replace("[train]", "[trian]"))],
            2,
            r"'trian': unknown key; allowed: description, metric",
        ),
        Case(
            "unknown variant",
            ["launch", "--study", spec_file(tmp_path, "variant", GOOD.replace('"short4"', '"short5"'))],
            2,
            r"grid\.variant: unknown variant 'short5'; allowed: naive, standard",
        ),
        Case(
            "unknown dataset",
            ["launch", "--study", spec_file(tmp_path, "dataset", GOOD.replace('"digits"', '"cifar11"'))],
            2,
            r"grid\.dataset: unknown dataset 'cifar11'; allowed: cifar10, cifar100",
        ),
        Case(
            "unknown optimizer",
            ["launch", "--study", spec_file(tmp_path, "optimizer", GOOD + 'optimizer = "adam"\n')],
            2,
            r"optimizer\.toml: train\.optimizer: unknown value 'adam'; one of: adadelta, sgd, adamw",
        ),
        Case(
            "unknown sampler",
            [
                "launch",
                "--study",
                spec_file(
                    tmp_path,
                    "sampler",
                    GOOD + '[search]\nsampler = "grid"\n[search.space]\nlr = { low = 0.1, high = 1.0 }\n',
                ),
            ],
            2,
            r"search\.sampler: unknown value 'grid'; one of: tpe, random, cmaes, qmc",
        ),
        *(
            Case(
                f"bad value: {key}",
                ["launch", "--study", spec_file(tmp_path, f"value{i}", text)],
                2,
                rf"value{i}\.toml: {re.escape(key)}: {message}",
            )
            for i, (text, key, message) in enumerate(BAD_VALUES)
        ),
        Case(
            "a million trials per cell",
            [
                "launch",
                "--study",
                spec_file(tmp_path, "million", SEARCH.format(trials=1_000_000, space="lr = { low = 0.1, high = 1.0 }")),
            ],
            2,
            r"million\.toml: search\.trials_per_cell: 1,000,000 is over 10,000 trials per cell \(1,000,000 trials in "
            r"all\); lower it, or pass --yes",
        ),
        Case(
            "description not a string",
            ["launch", "--study", spec_file(tmp_path, "described", 'description = ["a", {b = 1}]\n' + GOOD)],
            2,
            r"described\.toml: description: must be a string, got \['a', \{'b': 1\}\]",
        ),
        Case(
            "path-like study name",
            ["launch", "--study", spec_file(tmp_path, "..", GOOD)],
            2,
            r"the study name '\.\.' \(the file's name without \.toml\) may hold only letters, digits",
        ),
        Case(
            "grace period within two heartbeats: launch",
            [
                "launch",
                "--study",
                spec_file(tmp_path, "good", GOOD),
                "--heartbeat-interval",
                "30",
                "--grace-period",
                "5",
            ],
            2,
            r"--grace-period 5 must be at least twice --heartbeat-interval \(30\)",
        ),
        Case(
            "grace period within two heartbeats: worker by env",
            ["worker", "--device", "cpu"],
            2,
            r"--grace-period 15 must be at least twice --heartbeat-interval \(10\)",
            env={"SWEEPER_GRACE_PERIOD": "15"},
        ),
        *(
            Case(
                f"empty home: {command}",
                [command, *(["--study", "good"] if command != "doctor" else [])],
                1,
                r"no Optuna storage at .*home-\d+/optuna\.db; run from the folder you launched in, set SWEEPER_HOME",
            )
            for command in ("status", "retry", "report", "doctor")
        ),
        Case(
            "unknown study",
            ["launch", "--study", "no-such-study"],
            2,
            r"no study named 'no-such-study'; known studies:",
        ),
        Case(
            "bad registered model name",
            ["report", "--study", "good", "--register-best", "best/one"],
            2,
            r"'best/one' is not a registered model name",
        ),
        Case(
            "register-best with compare",
            ["report", "--study", "good", "--register-best", "best", "--compare", "short4,short3"],
            2,
            r"--register-best and --compare do not go together",
        ),
        Case(
            "unknown variant option", train[:2] + ["short5"] + train[3:], 2, r"unknown variant 'short5'; choose one of"
        ),
        Case(
            "unknown optimizer option",
            [*train, "--optimizer", "adam"],
            2,
            r"'adam' is not one of 'adadelta', 'sgd', 'adamw'",
        ),
        Case(
            "unreachable storage: launch",
            ["launch", "--study", spec_file(tmp_path, "good", GOOD), "--storage", BAD_PG],
            1,
            r"cannot open the Optuna storage postgresql://user:\*\*\*@127\.0\.0\.1:1/db: .*Connection refused",
            process=True,
        ),
        Case(
            "unreachable storage: worker",
            ["worker", "--storage", BAD_PG, "--device", "cpu"],
            1,
            r"cannot open the Optuna storage postgresql://user:\*\*\*@127\.0\.0\.1:1/db",
            process=True,
        ),
        Case(
            "unreachable storage: status",
            ["status", "--study", "good", "--storage", BAD_PG],
            1,
            r"cannot open the Optuna storage postgresql://user:\*\*\*@",
        ),
        Case(
            "unreachable storage: retry",
            ["retry", "--study", "good", "--storage", BAD_PG],
            1,
            r"cannot open the Optuna storage postgresql://user:\*\*\*@",
        ),
        Case(
            "unreachable tracking: worker",
            ["worker", "--tracking-uri", BAD_HTTP, "--device", "cpu"],
            1,
            # The credentials left the URI for MLFLOW_TRACKING_USERNAME/PASSWORD (tracking.resolve_tracking_uri)
            r"cannot reach the MLflow tracking store http://127\.0\.0\.1:1",
            process=True,
        ),
        Case(
            "unreachable stores: doctor",
            ["doctor", "--storage", BAD_PG, "--tracking-uri", BAD_HTTP],
            1,
            r"cannot reach the MLflow tracking store http://127\.0\.0\.1:1",
        ),
        Case(
            "password with a slash: launch",
            ["launch", "--study", spec_file(tmp_path, "good", GOOD), "--storage", SLASHED_PG],
            1,
            r"cannot open the Optuna storage postgresql://user:\*\*\*@127\.0\.0\.1:1/db: .*Connection refused",
            process=True,
        ),
        Case(
            "password with a slash: doctor",
            ["doctor", "--storage", SLASHED_PG, "--tracking-uri", SLASHED_HTTP],
            1,
            r"cannot reach the MLflow tracking store http://user:\*\*\*@127\.0\.0\.1:1",
        ),
        Case(
            "unreachable storage by env",
            ["status", "--study", "good"],
            1,
            r"postgresql://user:\*\*\*@",
            env={"SWEEPER_STORAGE": BAD_PG},
        ),
        Case(
            "bad dataset archive",
            ["data", "import", str(bad_archive)],
            1,
            r"cifar-10-python\.tar\.gz looks like cifar-10-python\.tar\.gz but its md5 is [0-9a-f]{32}, not "
            r"[0-9a-f]{32}: it is damaged or modified, so nothing was extracted; download it again",
            process=True,
        ),
        Case(
            "old Optuna schema",
            ["status", "--study", "good", "--storage", old_schema_storage(tmp_path / "old.db")],
            1,
            r"set up by optuna 3\.0\.0.*`optuna storage upgrade --storage URL`",
        ),
        Case(
            "checkpoint of another variant",
            [*train, "--resume", checkpoint_file(tmp_path / "other.pt")],
            1,
            r"other\.pt belongs to variant='short4', not 'short3'; it is not used",
        ),
        Case(
            "checkpoint of a newer sweeper",
            [*train[:2], "short4", *train[3:], "--resume", checkpoint_file(tmp_path / "newer.pt", format_version=99)],
            1,
            r"newer\.pt was written by a newer sweeper \(format 99, this one reads 1\)",
        ),
        Case(
            "truncated checkpoint",
            [*train, "--resume", str(truncated)],
            1,
            r"truncated\.pt cannot be read \(\w+\); delete it to start the trial afresh",
        ),
    ]


def run_in_process(case: Case, monkeypatch, capsys) -> None:
    """The real entry point, `sweeper.cli.main()`, in this process (no interpreter start-up)."""
    from sweeper import cli

    with monkeypatch.context() as m:
        m.setenv("SWEEPER_HOME", str(case.home))
        for k, v in case.env.items():
            m.setenv(k, v)
        m.setattr(sys, "argv", ["sweeper", *case.args])
        capsys.readouterr()
        started = time.monotonic()
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        case.seconds = time.monotonic() - started
    case.out, case.err = capsys.readouterr()
    case.returncode = code


def test_bad_input_gives_one_clear_message_and_writes_nothing(tmp_path, sweeper_env, monkeypatch, capsys):
    todo = cases(tmp_path)
    monkeypatch.chdir(tmp_path)
    for i, case in enumerate(todo):  # the subprocesses start first and run while the rest is checked
        case.home = tmp_path / f"home-{i}"
        case.home.mkdir()
        if case.process:
            env = {**sweeper_env, "SWEEPER_HOME": str(case.home), **case.env}
            case.proc = subprocess.Popen(
                [sys.executable, "-m", "sweeper", *case.args],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
    for case in todo:
        if not case.process:
            run_in_process(case, monkeypatch, capsys)
    problems = []
    for case in todo:
        if case.process:
            case.out, case.err = case.proc.communicate(timeout=300)
            case.returncode = case.proc.returncode
        said = f"[{case.name}] exit {case.returncode}\nstdout: {case.out}\nstderr: {case.err}"
        if case.returncode != case.code:
            problems.append(f"expected exit {case.code}: {said}")
        if not re.search(case.message, case.out + case.err, re.S):
            problems.append(f"expected /{case.message}/ in the output: {said}")
        if "Traceback" in case.out + case.err:
            problems.append(f"traceback: {said}")
        if SECRET in case.out + case.err:
            problems.append(f"password shown: {said}")
        lines = [line for line in case.err.splitlines() if line.startswith("Error")]
        if len(lines) != 1 and case.args[0] != "doctor":  # doctor reports each check on stdout
            problems.append(f"expected one error paragraph: {said}")
        if case.empty_home and any(case.home.iterdir()):
            problems.append(f"wrote {sorted(p.name for p in case.home.iterdir())}: {said}")
    assert not problems, "\n\n".join(problems)


def test_stored_bad_values_and_path_like_names_fail_their_cell_without_a_traceback(tmp_path, sweeper_env):
    """A storage written by hand (or by an older sweeper): a study named ../../../escaped made a
    worker write checkpoints outside SWEEPER_HOME, limit_train = -1 trained on all but one image."""
    import dataclasses

    import optuna

    from sweeper import spec as specs
    from sweeper.names import SPEC_ATTR
    from sweeper.storage import connect
    from sweeper.trials import enqueue

    home = Path(sweeper_env["SWEEPER_HOME"])
    storage = connect.open_storage(f"sqlite:///{home / 'optuna.db'}")
    good = specs.load(spec_file(tmp_path, "good", GOOD + "limit_train = 64\nlimit_test = 32\n"))
    for spec in (dataclasses.replace(good, name="../../../escaped"), dataclasses.replace(good, name="negative")):
        enqueue.enqueue_study(storage, spec)
    stored = {**good.to_dict(), "name": "negative", "train": {**good.train, "limit_train": -1}}  # by hand
    storage.set_study_user_attr(storage.get_study_id_from_name("negative"), SPEC_ATTR, stored)
    proc = subprocess.run(
        [sys.executable, "-m", "sweeper", "worker", "--device", "cpu", "--no-system-metrics"],
        env=sweeper_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    reasons = {}
    for name in ("../../../escaped", "negative"):
        (trial,) = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        assert trial.state == optuna.trial.TrialState.FAIL, (name, trial.state)
        reasons[name] = trial.system_attrs["sweeper.fail_reason"]
    assert re.search(r"the study name '\.\./\.\./\.\./escaped' .* may hold only letters", reasons["../../../escaped"])
    assert (
        "the spec stored in study 'negative': train.limit_train: must be an integer >= 1, got -1" in reasons["negative"]
    )
    outside = [p for p in tmp_path.parent.rglob("escaped*") if home not in p.parents]
    assert outside == [], outside


def test_user_text_is_shown_as_written_never_as_markup(tmp_path, sweeper_env, monkeypatch):
    """A description or fail reason holding "[/x]" crashed `studies` and `status` (rich markup)."""
    import optuna
    from fault_helpers import cli

    from sweeper import spec as specs
    from sweeper.storage import connect
    from sweeper.trials import enqueue

    nasty = "[/x] [bold]not bold[/bold] [red"
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "nasty.toml").write_text(f"description = {nasty!r}\n" + GOOD)
    monkeypatch.chdir(tmp_path)
    result = cli("studies", env=sweeper_env)
    assert nasty in result.output.replace("\n", ""), result.output

    storage = connect.open_storage(f"sqlite:///{sweeper_env['SWEEPER_HOME']}/optuna.db")
    enqueue.enqueue_study(storage, specs.load("nasty"))
    (trial,) = optuna.load_study(study_name="nasty", storage=storage).get_trials(deepcopy=False)
    storage.set_trial_system_attr(trial._trial_id, "sweeper.fail_reason", nasty)
    result = cli("status", "--study", "nasty", env=sweeper_env)
    assert "[/x] [bold]not bold[/bold]" in result.output, result.output


def test_read_only_storage_is_one_clear_line_at_launch(tmp_path, sweeper_env):
    """A real read-only filesystem (a read-only bind mount: root ignores file modes)."""
    from sweeper.storage import connect

    home = Path(sweeper_env["SWEEPER_HOME"])
    connect.open_storage(f"sqlite:///{home / 'optuna.db'}").engine.dispose()
    spec = spec_file(tmp_path, "readonly", GOOD)
    if subprocess.run(["mount", "--bind", str(home), str(home)]).returncode != 0:
        pytest.skip("cannot bind-mount here (not root?)")
    try:
        assert subprocess.run(["mount", "-o", "remount,bind,ro", str(home)]).returncode == 0
        proc = subprocess.run(
            [sys.executable, "-m", "sweeper", "launch", "--study", spec],
            env=sweeper_env,
            capture_output=True,
            text=True,
        )
    finally:
        subprocess.run(["umount", str(home)], check=True)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("Error")]
    assert re.fullmatch(
        rf"Error: the Optuna storage {re.escape(str(home))}/optuna\.db is read-only \(.*\); make it writable "
        r"\(chmod u\+w .*, or remount it read-write\), or set SWEEPER_HOME to a writable copy of .*",
        line,
    ), line


def test_unreachable_stores_are_given_up_on_in_seconds(monkeypatch):
    """Bounded waits: seconds, not MLflow's default of about two minutes of HTTP retries."""
    from sweeper import tracking
    from sweeper.errors import SweeperError
    from sweeper.storage import connect

    for name in (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
    ):
        monkeypatch.delenv(name, raising=False)
    tracking.configure_http()
    for probe in (lambda: connect.open_storage(BAD_PG), lambda: tracking.check_reachable(tracking.client(BAD_HTTP))):
        started = time.monotonic()
        with pytest.raises(SweeperError) as info:
            probe()
        assert time.monotonic() - started < 30
        assert SECRET not in str(info.value) and "127.0.0.1:1" in str(info.value)


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path):
    """A real full disk: a 256 KiB tmpfs (needs root, as in CI and here)."""
    from sweeper import checkpoint

    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        path = mount / "last.pt"
        checkpoint.save(path, {"epoch": 1, "model": {"w": torch.zeros(1000)}})
        with pytest.raises(
            checkpoint.CheckpointError,
            match=r"could not write checkpoint .*last\.pt \(.*\); the "
            r"previous checkpoint is kept. Free disk space",
        ):
            checkpoint.save(path, {"epoch": 2, "model": {"w": torch.zeros(200_000)}})  # 800 KB
        assert checkpoint.load(path)["epoch"] == 1
        assert [p.name for p in mount.iterdir()] == ["last.pt"]  # no temporary file left behind
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_checkpoint_of_another_cell_or_a_newer_format_is_refused(tmp_path):
    from sweeper import checkpoint

    path = Path(checkpoint_file(tmp_path / "c.pt"))
    assert checkpoint.load(path, expect={"variant": "short4"})["epoch"] == 1
    with pytest.raises(checkpoint.CheckpointError, match="belongs to variant='short4', not 'short3'"):
        checkpoint.load(path, expect={"variant": "short3", "dataset": "digits"})
    newer = Path(checkpoint_file(tmp_path / "n.pt", format_version=checkpoint.FORMAT_VERSION + 1))
    with pytest.raises(checkpoint.CheckpointError, match="written by a newer sweeper"):
        checkpoint.load(newer)
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "payload": Path("x")}, evil)  # a pickled object, not plain data
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read"):
        checkpoint.load(evil)
