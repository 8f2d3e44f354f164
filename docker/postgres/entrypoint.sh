#!/bin/sh
# Refuses to start PostgreSQL with the placeholder password of .env.example, then hands over
# to the base image's entrypoint (docker-entrypoint.sh, which initialises an empty volume).
# PostgreSQL keeps the password of its first start in the volume, so a placeholder accepted
# once would stay.
case "${POSTGRES_PASSWORD:-}" in
    *CHANGE-ME*)
        echo "postgres: POSTGRES_PASSWORD is still the CHANGE-ME placeholder of .env.example:" \
            "set POSTGRES_PASSWORD in .env to a password of your own" \
            "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(24))')" >&2
        exit 1
        ;;
esac
exec docker-entrypoint.sh "$@"
