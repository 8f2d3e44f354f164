# optuna-dashboard on sweeper's Optuna storage (PostgreSQL).
#
#   docker build -f docker/dashboard.Dockerfile -t sweeper-dashboard:latest docker
#
# PYTHON_IMAGE is any image with python and pip on PATH; docker/build-local.sh swaps in one
# made on the machine.
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

COPY dashboard/serve.py /opt/sweeper-dashboard/serve.py

USER dashboard
WORKDIR /home/dashboard
EXPOSE 8080

# /api/meta answers only when the storage does.
HEALTHCHECK --interval=15s --timeout=10s --start-period=30s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/api/meta', timeout=8)"]

# The storage URL comes from the environment (SWEEPER_STORAGE, the same variable the workers
# read) and stays there: serve.py reads it, so it is on no command line (`ps` on the host
# shows container processes' arguments) and in no image layer.
ENTRYPOINT ["python", "/opt/sweeper-dashboard/serve.py"]
