# PostgreSQL for sweeper: the official image + the script that creates sweeper's two
# databases + a start check that refuses the .env.example placeholder as the password.
#
#   docker build -f docker/postgres.Dockerfile -t sweeper-postgres:latest docker
#
# POSTGRES_BASE is any image with the official postgres entrypoint contract
# (docker-entrypoint.sh, POSTGRES_USER/POSTGRES_PASSWORD, /docker-entrypoint-initdb.d);
# docker/build-local.sh swaps in one made from Debian's postgresql package.
ARG POSTGRES_BASE=postgres:16
FROM ${POSTGRES_BASE}
COPY postgres/init-databases.sh /docker-entrypoint-initdb.d/10-init-databases.sh
COPY postgres/entrypoint.sh /usr/local/bin/sweeper-postgres-entrypoint.sh
ENTRYPOINT ["sweeper-postgres-entrypoint.sh"]
CMD ["postgres"]
