# PgBouncer for sweeper's workers: Debian's pgbouncer package (1.18 on bookworm) + an entrypoint
# that writes its configuration from the environment (docker/pgbouncer/entrypoint.sh).
#
#   docker build -f docker/pgbouncer.Dockerfile -t sweeper-pgbouncer:latest docker
#
# Transaction pooling: many workers share a few server connections (docs/DEPLOY.md,
# "Connections"). BASE_IMAGE is any Debian bookworm image; docker/build-local.sh uses its local
# Python base (one more apt layer, no new root filesystem).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# A fixed numeric user, so Kubernetes can check runAsNonRoot (docker/k8s/pgbouncer.yaml).
ARG PGBOUNCER_UID=10002
# postgresql-client: pg_isready for the healthcheck. The package's own service stays unused.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends pgbouncer postgresql-client \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid "${PGBOUNCER_UID}" pgbouncer \
 && useradd --uid "${PGBOUNCER_UID}" --gid pgbouncer --no-create-home pgbouncer \
 && install -d -o pgbouncer -g pgbouncer -m 0700 /var/lib/sweeper-pgbouncer
COPY pgbouncer/entrypoint.sh /usr/local/bin/sweeper-pgbouncer-entrypoint.sh
# PgBouncer refuses to run as root.
USER ${PGBOUNCER_UID}
EXPOSE 6432
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=12 \
    CMD pg_isready -q -h 127.0.0.1 -p 6432 -U "${POSTGRES_USER:-postgres}" -d "${SWEEPER_OPTUNA_DB:-optuna}"
STOPSIGNAL SIGINT
ENTRYPOINT ["sweeper-pgbouncer-entrypoint.sh"]
