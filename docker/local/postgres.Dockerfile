# Local path only (docker/build-local.sh): a stand-in for the official postgres image, made
# from Debian's postgresql package on the local base. docker-entrypoint.sh keeps the official
# image's contract that docker-compose.yml relies on: POSTGRES_USER, POSTGRES_PASSWORD,
# POSTGRES_DB, PGDATA, the scripts in /docker-entrypoint-initdb.d run once on an empty data
# directory, the server runs as the `postgres` user and listens on every address.
ARG BASE_IMAGE=sweeper-base:local
FROM ${BASE_IMAGE}
ARG PG_MAJOR=15
# No default cluster: the entrypoint makes one in PGDATA on the first start.
RUN mkdir -p /etc/postgresql-common/createcluster.d \
 && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/no-main.conf \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "postgresql-${PG_MAJOR}" \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /docker-entrypoint-initdb.d /var/run/postgresql \
 && chown postgres:postgres /var/run/postgresql
ENV PATH=/usr/lib/postgresql/${PG_MAJOR}/bin:/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME /var/lib/postgresql/data
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
