"""Options shared by several commands, each defined once with its environment variable, and the
callbacks that check what they are given."""

from __future__ import annotations

import click

from sweeper import settings
from sweeper.contract import DATASETS, DEFAULT_GRACE_PERIOD, DEFAULT_HEARTBEAT_INTERVAL, PRECISIONS, VARIANTS

FORMAT_CHOICES = ("table", "json")


def format_option(*choices: str, default: str = "table"):
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(choices or FORMAT_CHOICES),
        default=default,
        show_default=True,
        help="Output format. json prints one document on stdout; logs and progress go to stderr.",
    )


study_option = click.option(
    "--study",
    "study",
    required=True,
    metavar="NAME|PATH.toml",
    envvar=settings.ENV_STUDY,
    help="Study spec: a name from experiments/ (see `sweeper studies`) or a path to a .toml file.",
)
storage_option = click.option(
    "--storage",
    envvar=settings.ENV_STORAGE,
    metavar="URL",
    help=f"Optuna storage URL (postgresql://... for several machines). [env: {settings.ENV_STORAGE}; "
    "default: SQLite under $SWEEPER_HOME]",
)
tracking_option = click.option(
    "--tracking-uri",
    envvar=settings.ENV_TRACKING_URI,
    metavar="URI",
    help=f"MLflow tracking URI (http://host:5000 for a server). [env: {settings.ENV_TRACKING_URI}; "
    "default: SQLite under $SWEEPER_HOME]",
)
device_option = click.option(
    "--device",
    default="auto",
    envvar=settings.ENV_DEVICE,
    show_default=True,
    help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.",
)
precision_option = click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="auto: bf16 autocast + channels_last where bf16 is fast (CUDA, CPUs with AMX/AVX512-BF16).",
)


def check_notify_url(ctx, param, value):
    from sweeper import notify

    try:
        return notify.check_url(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


notify_option = click.option(
    "--notify",
    "notify_url",
    envvar=settings.ENV_NOTIFY_URL,
    callback=check_notify_url,
    metavar="URL",
    help="POST a JSON document here when the study completes and when a cell fails for good. "
    f"[env: {settings.ENV_NOTIFY_URL}]",
)
data_dir_option = click.option(
    "--data-dir",
    envvar=settings.ENV_DATA_DIR,
    type=click.Path(file_okay=False),
    metavar="DIR",
    help=f"Where datasets live. [env: {settings.ENV_DATA_DIR}; default: $SWEEPER_HOME/data]",
)
heartbeat_option = click.option(
    "--heartbeat-interval",
    type=click.IntRange(1),
    envvar=settings.ENV_HEARTBEAT_INTERVAL,
    default=DEFAULT_HEARTBEAT_INTERVAL,
    show_default=True,
    help=f"Seconds between a running trial's heartbeats. [env: {settings.ENV_HEARTBEAT_INTERVAL}]",
)
workers_per_gpu_option = click.option(
    "--workers-per-gpu",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    envvar=settings.ENV_WORKERS_PER_GPU,
    help=f"Workers that may share one GPU (small trials leave a large GPU idle). [env: {settings.ENV_WORKERS_PER_GPU}]",
)
grace_option = click.option(
    "--grace-period",
    type=click.IntRange(1),
    envvar=settings.ENV_GRACE_PERIOD,
    default=DEFAULT_GRACE_PERIOD,
    show_default=True,
    help=f"Seconds without a heartbeat before a trial's worker counts as dead and the trial is retried. "
    f"[env: {settings.ENV_GRACE_PERIOD}]",
)


def _verbosity(ctx, param, value):
    if ctx.resilient_parsing:
        return
    if value:
        if ctx.meta.get("sweeper.verbosity"):
            raise click.BadParameter("--verbose and --quiet do not go together")
        ctx.meta["sweeper.verbosity"] = 1 if param.name == "verbose" else -1
    from sweeper import logs

    logs.configure(ctx.meta.get("sweeper.verbosity"))


def verbosity_options(f):
    """--verbose / --quiet on a command that logs (see sweeper.logs)."""
    f = click.option(
        "--quiet",
        "-q",
        "quiet",
        is_flag=True,
        expose_value=False,
        callback=_verbosity,
        help="Only warnings and errors on stderr.",
    )(f)
    return click.option(
        "--verbose",
        "-v",
        "verbose",
        is_flag=True,
        expose_value=False,
        callback=_verbosity,
        help="Debug lines, and the libraries' own warnings, on stderr.",
    )(f)


def check_variant(ctx, param, value):
    if value is not None and value not in VARIANTS:
        raise click.BadParameter(f"unknown variant {value!r}; choose one of: {', '.join(VARIANTS)}")
    return value


def check_dataset(ctx, param, value):
    names = value if isinstance(value, tuple) else (value,)
    for name in names:
        if name is not None and name not in DATASETS:
            raise click.BadParameter(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return value


def check_model_name(ctx, param, value):
    if value is not None and (not value.strip() or "/" in value or ":" in value or value.strip() in (".", "..")):
        raise click.BadParameter(f"{value!r} is not a registered model name (not empty, no '/' or ':')")
    return value


def check_compare(ctx, param, value):
    """`ui --compare`: two or more different names, A,B."""
    if value is None:
        return None
    names = [part.strip() for part in value.split(",")]
    if len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise click.BadParameter(
            f"takes two or more different variants or cells as A,B (e.g. standard,short4 or "
            f"short4/digits/s1,short3/digits/s1), got {value!r}"
        )
    return ",".join(names)


def check_grace(heartbeat_interval: int, grace_period: int) -> None:
    """A grace period close to the heartbeat interval makes healthy workers take each other's trials."""
    if grace_period < 2 * heartbeat_interval:
        raise click.UsageError(
            f"--grace-period {grace_period} must be at least twice --heartbeat-interval ({heartbeat_interval}): "
            f"a live trial whose heartbeat is merely late would be taken over by another worker and trained twice. "
            f"Use --grace-period {max(2 * heartbeat_interval, 60)} or more "
            f"(env {settings.ENV_GRACE_PERIOD} / {settings.ENV_HEARTBEAT_INTERVAL})."
        )


def load_spec(study: str):
    """The study spec a --study names; a bad one is a usage error (exit 2)."""
    from sweeper.spec import SpecError, load

    try:
        return load(study)
    except SpecError as e:
        raise click.UsageError(str(e)) from None


def study_name(study: str) -> str:
    """A stored study's name: the spec file's stem, or the name itself when no spec is at hand."""
    from pathlib import Path

    return Path(study).stem if study.endswith(".toml") else study


def study_layer():
    """Optuna set up for the whole process as every command wants it: its log
    at WARNING (not a line per trial), and quiet about the experimental heartbeat API that sweeper
    relies on knowingly. Library modules leave such process-wide settings to the commands."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
