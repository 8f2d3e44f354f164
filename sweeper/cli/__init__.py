"""The `sweeper` command line: the group and entry point (app), shared options (options), what
the commands print (output), and the commands: engine (models, train, data), sweeps (studies,
launch, worker, stop/pause/resume/cancel, retry) and observe (status, verify, doctor, report, ui).
"""

from sweeper.cli.app import cli, entry, friendly_errors, main

__all__ = ["cli", "entry", "friendly_errors", "main"]
