# optuna-dashboard on sweeper's Optuna storage (PostgreSQL).
#
#   docker build -f docker/dashboard.Dockerfile -t sweeper-dashboard:latest docker
#
# A small image of its own rather than ghcr.io/optuna/optuna-dashboard, so that the optuna
# here is the one the workers run: the dashboard opens the same RDB schema, and an older
# optuna refuses (or a newer one migrates) a schema it does not match. Keep OPTUNA_VERSION
# equal to what `pip install .` resolves in the worker image (pyproject: optuna>=4.0).
ARG PYTHON_IMAGE=python:3.12-slim
FROM ${PYTHON_IMAGE}
ARG OPTUNA_VERSION=5.0.0
ARG OPTUNA_DASHBOARD_VERSION=0.21.0
ARG DASHBOARD_UID=10003

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1

RUN pip install "optuna==${OPTUNA_VERSION}" "optuna-dashboard==${OPTUNA_DASHBOARD_VERSION}" \
        "psycopg2-binary>=2.9" gunicorn \
 && useradd --create-home --uid "${DASHBOARD_UID}" --user-group dashboard

USER dashboard
WORKDIR /home/dashboard
EXPOSE 8080

# /api/meta answers only when the storage does.
HEALTHCHECK --interval=15s --timeout=10s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/api/meta', timeout=8)"]

# The storage URL comes from the environment (SWEEPER_STORAGE, the same variable the workers
# read), so the password is never part of the image or of the compose command line.
# optuna-dashboard opens the storage with skip_table_creation=True and so fails on a database
# no worker has touched yet; creating Optuna's tables first (idempotent) lets it start on a
# fresh stack.
ENTRYPOINT ["/bin/sh", "-c", ": \"${SWEEPER_STORAGE:?set SWEEPER_STORAGE to the Optuna storage URL}\"; python -c 'import os, optuna; optuna.storages.RDBStorage(os.environ[\"SWEEPER_STORAGE\"], skip_compatibility_check=True)' && exec optuna-dashboard --host 0.0.0.0 --port 8080 --server gunicorn \"$SWEEPER_STORAGE\"", "optuna-dashboard"]
