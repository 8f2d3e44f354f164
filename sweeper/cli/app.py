"""The `sweeper` group, its entry point, and known failures turned into one clear message.

Heavy imports live inside the commands so --help is instant."""

from __future__ import annotations

import contextlib
import sys

import click

from sweeper.cli.engine import data, models, train
from sweeper.cli.observe import doctor, report, status, ui, verify
from sweeper.cli.sweeps import LIFECYCLE_COMMANDS, launch, retry, studies, worker
from sweeper.errors import BadInput, SweeperError
from sweeper.redact import redact


def print_version(ctx, value) -> None:
    if value and not ctx.resilient_parsing:
        from sweeper.doctor import version_line

        click.echo(version_line())
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=lambda ctx, param, value: print_version(ctx, value),
    help="Show sweeper's version and those of Python, torch, MLflow and Optuna, then exit.",
)
def cli():
    """Sweep GoogLeNet variants across datasets, tracked in MLflow.

    \b
    Quick start (offline, 2 to 8 minutes on a CPU: `sweeper doctor` names its class):
      sweeper launch --study quickstart --workers 2
      sweeper report --study quickstart
      sweeper ui --study quickstart
    """


for command in (
    models,
    train,
    data,
    studies,
    launch,
    worker,
    *LIFECYCLE_COMMANDS,
    retry,
    status,
    verify,
    doctor,
    report,
    ui,
):
    cli.add_command(command)


def _known_errors() -> tuple[type[BaseException], ...]:
    from sweeper.checkpoint import CheckpointError
    from sweeper.data.base import DatasetError
    from sweeper.train import NonFiniteLoss

    return SweeperError, DatasetError, CheckpointError, NonFiniteLoss


@contextlib.contextmanager
def friendly_errors():
    """A known failure becomes "Error: <message>", redacted, and exit 1 (BadInput: 2, as click's
    own refusals of bad options)."""
    try:
        yield
    except click.exceptions.Exit:
        raise
    except Exception as e:  # only the known kinds are caught; anything else is a bug worth a traceback
        # SweeperError first: the other known kinds live in modules that import torch (seconds).
        if not isinstance(e, SweeperError) and not isinstance(e, _known_errors()):
            raise
        click.echo(f"Error: {redact(str(e))}", err=True)
        sys.exit(2 if isinstance(e, BadInput) else 1)


def main() -> None:
    """Run the CLI; known failures become one clear message and exit code 1, never a traceback."""
    from sweeper.redact import install_redaction

    install_redaction()
    with friendly_errors():
        cli(standalone_mode=True)


def entry() -> None:
    """The `sweeper` program (its console script and `python -m sweeper`): ``main``, then out
    through ``exit_now``. Callers in a process of their own making (tests) call ``main``, which
    ends in SystemExit as click's commands do."""
    try:
        main()
    except SystemExit as e:
        exit_now(e.code)
    exit_now(0)


def exit_now(code) -> None:
    """Leave as Python would (other threads joined, exit handlers run, output flushed), less its
    last step: finalizing every module, 1.5-2 s once torch and MLflow are loaded, at the end of
    every worker and of every launch, which a sweep waits for."""
    import atexit
    import logging
    import os
    import threading

    if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, exit 1
        print(code, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe
            stream.flush()
    os._exit(code or 0)
