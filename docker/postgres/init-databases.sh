#!/bin/bash
# Creates sweeper's two databases the first time the PostgreSQL volume is initialised:
#   $SWEEPER_OPTUNA_DB (default optuna)  Optuna RDB storage: studies, trials, heartbeats
#   $SWEEPER_MLFLOW_DB (default mlflow)  MLflow backend store: experiments, runs, metrics
# both owned by $POSTGRES_USER. The official postgres image runs every script in
# /docker-entrypoint-initdb.d once, only when the data directory is empty; docker-compose.yml
# mounts this file there read-only. Re-running it is harmless (existing databases are kept).
set -euo pipefail

create_database() {
    local db="$1"
    # \gexec runs the CREATE only when the SELECT returns a row; %I quotes the identifiers.
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-$POSTGRES_USER}" \
        --set=db="$db" --set=owner="$POSTGRES_USER" <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'owner')
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db')
\gexec
SQL
    echo "init-databases: database \"$db\" ready (owner \"$POSTGRES_USER\")"
}

for db in "${SWEEPER_OPTUNA_DB:-optuna}" "${SWEEPER_MLFLOW_DB:-mlflow}"; do
    create_database "$db"
done
