# The migrator's image: the installed wheel (`migrator`, the Celery workers, Flower) and the
# clients `migrator backup` runs, at the versions of docker-compose.yml's servers.
# Both bases are Debian bookworm: redis-cli is copied from the Redis image and links against
# that release's libc and libssl. tests/test_compose.py checks these versions against the compose file.

# The wheel, as `pip install .` builds it: the container runs the installed package, not a checkout.
FROM python:3.11-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md celeryconfig.py ./
COPY migrator ./migrator
COPY workers ./workers
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# redis-cli of the compose file's Redis (7.4): Debian bookworm's redis-tools is 7.0.
FROM redis:7.4-bookworm AS redis

FROM python:3.11-slim-bookworm
# pg_dump must be at least the server's major version (16) and bookworm has 15, so the client
# comes from the PostgreSQL project's apt repository, which postgresql-common's script sets up
# with the signing key it ships.
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates postgresql-common; \
    /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y; \
    apt-get install -y --no-install-recommends postgresql-client-16; \
    rm -rf /var/lib/apt/lists/*; \
    pg_dump --version
COPY --from=redis /usr/local/bin/redis-cli /usr/local/bin/redis-cli
RUN redis-cli --version
COPY --from=wheel /dist /dist
RUN pip install --no-cache-dir /dist/*.whl && rm -r /dist
WORKDIR /app
# `celery flower` reads its settings from the working directory
COPY flowerconfig.py ./
ENV PYTHONUNBUFFERED=1 MIGRATOR_LOG_JSON=1
CMD ["migrator", "--help"]
