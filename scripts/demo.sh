#!/usr/bin/env bash
# Set everything up, then seed the demo Threadr keyspace (Redis DB 15, flushed) and migrate it
# into the database migrator_demo (created if missing). USERS=N to change its size.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/migrator demo --users "${USERS:-10000}" "$@"
