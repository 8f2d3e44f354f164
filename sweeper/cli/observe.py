"""The sweep commands that look at a study and the stores: `status`, `verify`, `doctor`,
`report` and `ui`."""

from __future__ import annotations

import sys

import click

from sweeper import settings
from sweeper.cli.options import (
    check_compare,
    check_model_name,
    format_option,
    storage_option,
    study_layer,
    study_name,
    study_option,
    tracking_option,
    verbosity_options,
)
from sweeper.cli.output import print_json, print_table
from sweeper.humanize import duration

HOME_SIZE_SHOWN_ABOVE = 1_000_000_000  # bytes: `status` says how much SWEEPER_HOME holds past this


@click.command()
@study_option
@storage_option
@tracking_option
@format_option()
def status(study, storage, tracking_uri, fmt):
    """The study's state, trial counts, failures by cause and one row per trial."""
    from sweeper import api

    study_layer()

    document = api.status(study_name(study), storage, tracking_uri)
    if fmt == "json":
        print_json(document)
        return
    from sweeper.doctor import human_bytes

    counts = ", ".join(f"{k} {v}" for k, v in document["counts"].items())
    state = document["state"] + (f" ({document['state_reason']})" if document["state_reason"] else "")
    click.echo(
        f"study {document['study']}: {state}\ntrials: {counts}\n"
        f"storage {document['storage']}\ntracking {document['tracking_uri']}"
    )
    if document["state"] not in ("finished", "failed"):
        eta = document["eta_s"]
        click.echo(
            f"eta {duration(eta)} ({document['eta_source']})"
            if eta is not None
            else f"eta: none ({document['eta_source'] or 'no finished run to estimate from'})"
        )
    if (document["home_bytes"] or 0) > HOME_SIZE_SHOWN_ABOVE:
        click.echo(
            f"SWEEPER_HOME {settings.home()} holds {human_bytes(document['home_bytes'])} "
            "(docs/RELIABILITY.md: what is kept, and what can be deleted)"
        )
    for group in document["failures"]:
        click.echo(
            f"failed: {group['cause']}: {group['trials']} trial(s), {group['cells_failed_for_good']} cell(s) for good"
            + (f"; fix: {group['fix']}" if group["fix"] else "")
        )
    rows = [
        {
            **r,
            "epoch": f"{r['epoch'] or 0}/{r['epochs'] or '?'}",
            "retry_of": "" if r["retry_of"] is None else f"#{r['retry_of']}",
        }
        for r in document["trials"]
    ]
    print_table(
        None, rows, ["number", "cell", "state", "epoch", "top1_error", "host", "elapsed_s", "retry_of", "fail_reason"]
    )


@click.command()
@study_option
@storage_option
@tracking_option
@format_option()
@verbosity_options
def verify(study, storage, tracking_uri, fmt):
    """Check that MLflow matches Optuna: one finished run per finished trial, each epoch logged once,
    params equal to the recipe, the model present, no run without a trial. Exits 1 on any drift."""
    from sweeper import verify as verifying

    result = verifying.verify(study_name(study), storage, tracking_uri)
    if fmt == "json":
        print_json(result)
    else:
        if result["ok"]:
            click.echo(
                f"study {result['study']}: OK ({result['trials_checked']} finished trial(s), "
                f"{result['runs_checked']} run(s) checked against {result['tracking_uri']})"
            )
        else:
            click.echo(f"study {result['study']}: {len(result['problems'])} problem(s)")
            for p in result["problems"]:
                where = ", ".join(f"{k} {p[k]}" for k in ("cell", "trial", "run_id") if p[k] is not None)
                click.echo(f"- {p['check']}: {p['message']} [{where}]")
                click.echo(f"  repair: {p['repair']}" if p["repair"] else "  repair: no command repairs this")
    if not result["ok"]:
        raise SystemExit(1)


@click.command()
@storage_option
@tracking_option
@click.option(
    "--quiet", is_flag=True, help="Check the stores only and print nothing; the exit code tells (healthchecks)."
)
@format_option()
def doctor(storage, tracking_uri, quiet, fmt):
    """Versions, the device and its capabilities (CPU flags, CUDA GPUs), threads, free disk under
    SWEEPER_HOME, and whether the Optuna storage and the MLflow tracking store answer. Exits 1
    when a store does not."""
    study_layer()
    from sweeper import api
    from sweeper import doctor as doctoring

    document = api.doctor(storage, tracking_uri, facts=not quiet)
    if not quiet:
        print_json(document) if fmt == "json" else click.echo(doctoring.render(document))
    sys.exit(0 if document["ok"] else 1)


@click.command()
@study_option
@storage_option
@tracking_option
@format_option("table", "markdown", "csv", "json", "html")
@click.option("--output", type=click.Path(dir_okay=False), help="Write the report to FILE instead of stdout.")
@click.option("--plots", "plots_dir", type=click.Path(file_okay=False), help="Write PNG plots into DIR.")
@click.option("--against-seed", is_flag=True, help="Put the seed post's published numbers beside the measured ones.")
@click.option(
    "--recipe",
    default="current",
    show_default=True,
    help="Rows of which recipe: current (the last launched), all (each recipe its own rows), or a digest.",
)
@click.option(
    "--compare",
    "compare_variants",
    metavar="A,B",
    help="Print the seed-paired difference A - B of two variants on each dataset with a 95% CI.",
)
@click.option(
    "--register-best",
    "register_best",
    metavar="MODEL_NAME",
    callback=check_model_name,
    help="Register the model of the best finished cell (by the study's metric) as a new version of "
    "MODEL_NAME in the MLflow Model Registry; json and csv rows gain a 'registered' column (what was "
    "registered, on the best cell's row).",
)
@verbosity_options
def report(study, storage, tracking_uri, fmt, output, plots_dir, against_seed, recipe, compare_variants, register_best):
    """The seed post's tables (Top-1/Top-5 error, parameters, time) from what the study logged."""
    if register_best is not None and compare_variants is not None:
        raise click.UsageError("--register-best and --compare do not go together; run them one at a time")
    study_layer()
    from sweeper import report as reporting

    reporting.print_report(
        study_name(study),
        storage,
        tracking_uri,
        fmt=fmt,
        output=output,
        plots_dir=plots_dir,
        against_seed=against_seed,
        recipe=recipe,
        compare_variants=compare_variants,
        register_best_as=register_best,
    )


@click.command()
@study_option
@storage_option
@tracking_option
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True, help="MLflow UI port.")
@click.option(
    "--dashboard-port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="optuna-dashboard port."
)
@click.option(
    "--compare",
    metavar="A,B",
    callback=check_compare,
    help="Also print a link to exactly these variants' or cells' runs side by side (variant, or variant/dataset/sSEED).",
)
def ui(study, storage, tracking_uri, port, dashboard_port, compare):
    """Serve the MLflow UI and optuna-dashboard for a study on 127.0.0.1 until Ctrl-C."""
    study_layer()
    from sweeper import ui as uis

    uis.serve(study_name(study), storage, tracking_uri, port=port, dashboard_port=dashboard_port, compare=compare)
