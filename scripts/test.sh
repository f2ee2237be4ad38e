#!/usr/bin/env bash
# The test suite against real Redis, PostgreSQL and RabbitMQ (started if down).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
