# MLflow tracking server for sweeper: the official image + the PostgreSQL driver + what the
# basic-auth app needs (Flask-WTF, from mlflow's `auth` extra).
#
#   docker build -f docker/mlflow.Dockerfile -t sweeper-mlflow:latest docker
#
# docker-compose.yml runs it twice from the same image:
#   mlflow       no auth; reachable from the compose network and 127.0.0.1 only.
#   mlflow-auth  profile `auth`: `--app-name basic-auth`, the one to expose to other hosts.
# Both use the PostgreSQL backend store (MLFLOW_BACKEND_STORE_URI) and serve artifacts from
# the /mlflow volume (--serve-artifacts --artifacts-destination), so workers need nothing but
# the tracking URL. Keep MLFLOW_VERSION equal to the mlflow the workers install.
#
# MLFLOW_BASE_IMAGE is any image with python and pip on PATH (mlflow is installed at
# MLFLOW_VERSION either way); docker/build-local.sh swaps in one made on the machine.
ARG MLFLOW_VERSION=3.17.2
ARG MLFLOW_BASE_IMAGE=ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}
FROM ${MLFLOW_BASE_IMAGE}
ARG MLFLOW_VERSION
ARG MLFLOW_UID=10002

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1

# mlflow[auth] at the version already installed (official base) only adds the auth extra's packages.
RUN pip install "mlflow[auth]==${MLFLOW_VERSION}" "psycopg2-binary>=2.9"

# Basic-auth settings. The user store is SQLite on the /mlflow volume (no credentials in this
# file). No admin password here: the auth app creates the admin user on its first start from
# MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD (set from .env by the compose
# service) and refuses to start without it; it also needs MLFLOW_FLASK_SERVER_SECRET_KEY.
RUN mkdir -p /etc/mlflow /mlflow/artifacts /mlflow/auth \
 && printf '%s\n' \
      '[mlflow]' \
      'default_permission = READ' \
      'database_uri = sqlite:////mlflow/auth/basic_auth.db' \
      'admin_username = admin' \
      'authorization_function = mlflow.server.auth:authenticate_request_basic_auth' \
      > /etc/mlflow/basic_auth.ini \
 && useradd --create-home --uid "${MLFLOW_UID}" --user-group mlflow \
 && chown -R mlflow:mlflow /mlflow

ENV MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini

USER mlflow
WORKDIR /mlflow
EXPOSE 5000

# /health is exempt from the Host-header check and from authentication.
HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=8)"]

CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
