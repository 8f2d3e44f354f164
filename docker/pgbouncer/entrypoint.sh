#!/bin/bash
# Writes PgBouncer's configuration from the environment, then runs it in the foreground.
#
#   POSTGRES_USER / POSTGRES_PASSWORD  the one user (as for the postgres service); PgBouncer
#                                      authenticates clients with SCRAM and logs in to the
#                                      server with the same password
#   PGBOUNCER_SERVER_HOST [postgres]   PostgreSQL behind it; PGBOUNCER_SERVER_PORT [5432]
#   SWEEPER_OPTUNA_DB     [optuna]     the one database it serves (the Optuna storage)
#   PGBOUNCER_POOL_SIZE   [30]         server connections at most, whatever the clients
#   PGBOUNCER_MAX_CLIENTS [1000]       client connections at most (each worker holds ~2)
#   PGBOUNCER_IDLE_TRANSACTION_TIMEOUT [0: off]  seconds a client may sit idle in a transaction
#
# Transaction pooling: a server connection serves a client for one transaction only, so nothing
# a client sets on its session survives (docs/DEPLOY.md, "Connections"). The files live in a
# private folder of the container, written with the password; nothing goes to argv or the log.
set -euo pipefail

: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is not set: set it (docker-compose reads it from .env)}"
user="${POSTGRES_USER:-postgres}"
conf="${PGBOUNCER_CONFIG_DIR:-/var/lib/sweeper-pgbouncer}"
umask 077
mkdir -p "$conf"

# userlist.txt: "user" "password", double quotes inside doubled.
printf '"%s" "%s"\n' "${user//\"/\"\"}" "${POSTGRES_PASSWORD//\"/\"\"}" > "$conf/userlist.txt"
cat > "$conf/pgbouncer.ini" <<INI
[databases]
${SWEEPER_OPTUNA_DB:-optuna} = host=${PGBOUNCER_SERVER_HOST:-postgres} port=${PGBOUNCER_SERVER_PORT:-5432}

[pgbouncer]
listen_addr = 0.0.0.0
listen_port = 6432
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $conf/userlist.txt
admin_users = $user
pool_mode = transaction
default_pool_size = ${PGBOUNCER_POOL_SIZE:-30}
max_db_connections = ${PGBOUNCER_POOL_SIZE:-30}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = ${PGBOUNCER_MAX_CLIENTS:-1000}
idle_transaction_timeout = ${PGBOUNCER_IDLE_TRANSACTION_TIMEOUT:-0}
; JDBC-style clients send it; sweeper (psycopg) sends no startup parameter PgBouncer refuses.
ignore_startup_parameters = extra_float_digits
log_connections = 0
log_disconnections = 0
INI

exec pgbouncer "$conf/pgbouncer.ini" "$@"
