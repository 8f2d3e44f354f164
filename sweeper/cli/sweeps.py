"""The sweep commands that fill and run a study's queue: `studies`, `launch`, `worker`,
`stop`/`pause`/`resume`/`cancel` and `retry`."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from sweeper import settings
from sweeper.cli.options import (
    check_grace,
    data_dir_option,
    device_option,
    format_option,
    grace_option,
    heartbeat_option,
    load_spec,
    notify_option,
    precision_option,
    storage_option,
    study_layer,
    study_name,
    study_option,
    tracking_option,
    verbosity_options,
    workers_per_gpu_option,
)
from sweeper.cli.output import print_json, print_table, stderr_console
from sweeper.humanize import duration

SEARCH_LIMIT = 10_000  # trials per cell that `launch` enqueues without --yes


@click.command()
@format_option()
def studies(fmt):
    """The study specs in experiments/ with their description and cell count."""
    from sweeper import spec

    rows = []
    for path in spec.available():
        s = load_spec(str(path))
        rows.append(
            {
                "study": s.name,
                "cells": len(s.cells),
                "trials": len(s.trial_keys()),
                "description": s.description,
                "path": str(path),
            }
        )
    if fmt == "json":
        print_json(rows)
    else:
        print_table("Study specs", rows, ["study", "cells", "trials", "description"])


@click.command()
@study_option
@storage_option
@tracking_option
@click.option(
    "--workers",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Start N local worker processes and watch them; 0 only enqueues.",
)
@device_option
@precision_option
@click.option(
    "--force-update",
    is_flag=True,
    help="Accept a changed spec: enqueue its new cells, and every cell anew when the recipe changed.",
)
@workers_per_gpu_option
@heartbeat_option
@grace_option
@data_dir_option
@click.option(
    "--yes",
    is_flag=True,
    envvar=settings.ENV_YES,
    help=f"Enqueue a search of more than {SEARCH_LIMIT:,} trials per cell without refusing.",
)
@notify_option
@click.option(
    "--dry-run",
    is_flag=True,
    help="Enqueue nothing: list the trials that would be enqueued (and those present) with a time "
    "estimate per trial on --device, and the summed and wall time for --workers N (default 1).",
)
@format_option()
@verbosity_options
def launch(
    study,
    storage,
    tracking_uri,
    workers,
    device,
    precision,
    force_update,
    workers_per_gpu,
    heartbeat_interval,
    grace_period,
    data_dir,
    yes,
    notify_url,
    dry_run,
    fmt,
):
    """Enqueue every grid cell of a study once, and optionally run it with local workers."""
    check_grace(heartbeat_interval, grace_period)
    spec = load_spec(study)  # a bad spec is refused before the heavy imports below
    if spec.trials_per_cell > SEARCH_LIMIT and not yes:
        raise click.UsageError(
            f"{spec.path}: search.trials_per_cell: {spec.trials_per_cell:,} is over {SEARCH_LIMIT:,} trials per cell "
            f"({len(spec.cells) * spec.trials_per_cell:,} trials in all); lower it, or pass --yes to enqueue them anyway"
        )

    study_layer()
    if dry_run:
        from sweeper import api

        print_plan(api.plan(spec, storage, tracking_uri, device=device, workers=max(1, workers)), fmt)
        return

    from sweeper import launcher

    launched = launcher.supervise(
        spec,
        storage,
        tracking_uri,
        workers=workers,
        device=device,
        precision=precision,
        force_update=force_update,
        workers_per_gpu=workers_per_gpu,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        data_dir=data_dir,
        notify_url=notify_url,
    )
    if workers == 0:
        if fmt == "json":
            click.echo(json.dumps(launched.summary))
        return
    if not launched.interrupted:
        from sweeper import report

        report.print_report(spec.name, launched.storage_url, launched.tracking_uri, fmt=fmt)
        hint = launcher.comparison_hint(spec, launched.tracking_uri)
        stderr_console().print(f"compare them in the MLflow UI: {hint}", markup=False, soft_wrap=True)
    if launched.exit_code:
        sys.exit(launched.exit_code)


def print_plan(plan: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        print_json(plan)
        return
    rows = [
        {
            "trial": t["trial"],
            "action": "present" if t["present"] else "enqueue",
            "state": t["state"] or "",
            "estimate": duration(t["estimate_s"]),
            "source": t["estimate_source"] or "",
        }
        for t in plan["trials"]
    ]
    print_table(f"dry run of {plan['study']}: nothing is enqueued", rows)
    click.echo(
        f"{plan['to_enqueue']} trial(s) would be enqueued, {plan['already_enqueued']} already present; "
        f"the unfinished ones on {plan['device']} with {plan['workers']} worker(s): "
        f"{duration(plan['estimate_wall_s'])} wall, {duration(plan['estimate_summed_s'])} summed over the trials "
        f"(one worker with the whole device: {duration(plan['estimate_total_s'])})"
    )
    if plan["spec_changed"]:
        click.echo("the stored spec differs: launch refuses it without --force-update", err=True)


@click.command()
@click.option(
    "--study",
    "studies_",
    multiple=True,
    metavar="NAME",
    envvar=settings.ENV_STUDY,
    help="Serve only this study (repeatable). Default: every study in the storage.",
)
@storage_option
@tracking_option
@device_option
@precision_option
@click.option(
    "--compile",
    "compile_",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    envvar=settings.ENV_COMPILE,
    help=f"torch.compile the model (CUDA graphs on a GPU). auto: on CUDA, off elsewhere. [env: {settings.ENV_COMPILE}]",
)
@click.option("--max-trials", type=click.IntRange(1), help="Exit after running K trials.")
@click.option(
    "--forever",
    is_flag=True,
    help="Keep polling for new trials instead of exiting when none wait or run.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(0.1),
    default=5.0,
    show_default=True,
    help="Seconds between looks at an empty queue (with --forever, or while other workers' trials run).",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    envvar=settings.ENV_THREADS,
    help="CPU threads per trial. Default: $OMP_NUM_THREADS if set, else the host's cores split "
    "between the trials running on it, re-counted as trials start and finish.",
)
@click.option(
    "--tracking-outage-limit",
    type=click.FloatRange(1),
    default=300.0,
    show_default=True,
    envvar=settings.ENV_TRACKING_OUTAGE_LIMIT,
    help="Seconds MLflow may be unreachable before the trial fails (it is retried later).",
)
@click.option(
    "--system-metrics/--no-system-metrics",
    default=True,
    show_default=True,
    help="Log CPU, memory and GPU use through MLflow's system metrics.",
)
@workers_per_gpu_option
@click.option(
    "--gpus",
    envvar=settings.ENV_GPUS,
    metavar="0,1,...",
    help="GPU indices this host's workers share. [env: SWEEPER_GPUS; default: all visible]",
)
@heartbeat_option
@grace_option
@data_dir_option
@notify_option
@verbosity_options
def worker(
    studies_,
    storage,
    tracking_uri,
    device,
    precision,
    compile_,
    max_trials,
    forever,
    poll_interval,
    threads,
    tracking_outage_limit,
    system_metrics,
    workers_per_gpu,
    gpus,
    heartbeat_interval,
    grace_period,
    data_dir,
    notify_url,
):
    """Claim waiting trials, train them and log to MLflow until the queue is empty."""
    check_grace(heartbeat_interval, grace_period)
    from pathlib import Path

    from sweeper import device as devices
    from sweeper import tracking, worker
    from sweeper.report.publish import Refresher
    from sweeper.storage.connect import resolve_storage_url

    study_layer()
    storage_url, uri = resolve_storage_url(storage), tracking.resolve_tracking_uri(tracking_uri)
    reports = Refresher(storage_url, uri)  # the study's report page in MLflow, after each cell
    config = worker.WorkerConfig(
        storage_url=storage_url,
        tracking_uri=uri,
        study_names=tuple(study_name(s) for s in studies_),
        device=device,
        precision=precision,
        compile=compile_,
        expect_gpu=settings.expect_gpu(),
        gpus=tuple(gpus.split(",")) if gpus else None,
        workers_per_gpu=workers_per_gpu,
        data_dir=Path(data_dir) if data_dir else None,
        max_trials=max_trials,
        forever=forever,
        poll_interval=poll_interval,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        tracking_outage_limit=tracking_outage_limit,
        system_metrics=system_metrics,
        # OMP_NUM_THREADS set by the user fixes the count too (as it does for torch itself).
        threads=threads or settings.omp_threads(),
        notify_url=notify_url,
        on_cell_complete=reports.request,
    )
    stop = worker.stop_signal()
    try:
        worker.serve(config, stop)
    except devices.BadDevice as e:
        raise click.UsageError(str(e)) from None
    finally:
        reports.close(10.0 if stop.is_set() else 120.0)  # told to stop: a refresh in flight gets seconds


def lifecycle_command(action: str, summary: str):
    @click.command(action, help=summary)
    @study_option
    @storage_option
    @format_option()
    def command(study, storage, fmt):
        from sweeper import api

        study_layer()

        document = api.set_state(study_name(study), action, storage)
        if fmt == "json":
            print_json(document)
        elif not document["changed"]:
            click.echo(f"study {document['study']}: `sweeper {action}` changes {document['effect']}")
        else:
            click.echo(
                f"study {document['study']}: {document['previous']} -> {document['state']}; {document['effect']}"
            )

    return command


LIFECYCLE_COMMANDS = [
    lifecycle_command("stop", "Stop a study: running trials finish, no new trial is claimed by any worker."),
    lifecycle_command("pause", "Pause a study: like stop, and `sweeper resume` lets workers claim again."),
    lifecycle_command("resume", "Let workers claim a stopped, paused or cancelled study's trials again."),
    lifecycle_command(
        "cancel", "Cancel a study: running trials checkpoint and are handed back after their epoch, until `resume`."
    ),
]


@click.command()
@study_option
@storage_option
@tracking_option
@format_option()
def retry(study, storage, tracking_uri, fmt):
    """Re-enqueue failed cells on purpose (e.g. after fixing the cause of a NaN or out of memory)."""
    from sweeper import api

    study_layer()
    document = api.retry(study_name(study), storage, tracking_uri)
    n = document["retried"]
    click.echo(f"{n} failed cell(s) of {document['study']} re-enqueued" if n else "no failed cell to retry", err=True)
    if fmt == "json":
        print_json(document)
