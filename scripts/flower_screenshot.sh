#!/usr/bin/env bash
# The README's Flower screenshot: a real distributed run of the demo keyspace (Redis DB 13, the
# database migrator_shot, queues shot.*), two workers and Flower, photographed by headless
# Chromium (Debian's `chromium` package) while the high priority is being verified.
#   bash scripts/flower_screenshot.sh [docs/flower-tasks.png]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/flower-tasks.png}
bash scripts/setup.sh
command -v chromium >/dev/null || { echo "needs Debian's chromium: apt-get install chromium" >&2; exit 2; }
export REDIS_URL=redis://127.0.0.1:6379/13 DATABASE_URL=postgresql://postgres@127.0.0.1:5432/migrator_shot
export MIGRATOR_QUEUE_PREFIX=shot. FLOWER_UNAUTHENTICATED_API=true
port=5566
# the database and its schema (a small demo run), then the keyspace the screenshot's run migrates
.venv/bin/migrator demo --users 10 --redis-db 13 --database migrator_shot >/dev/null
.venv/bin/migrator seed-demo --users 20000 --malformed 20 --fresh >/dev/null
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null || true' EXIT
for i in 1 2; do
  .venv/bin/celery -A workers worker -Q shot.critical,shot.high,shot.medium,shot.low -c 2 \
    -n "shot$i@%h" --loglevel WARNING >/dev/null 2>&1 & pids+=($!)
done
.venv/bin/celery -A workers flower --port=$port --address=127.0.0.1 >/dev/null 2>&1 & pids+=($!)
sleep 8
.venv/bin/migrator run --ranges 8 --output-dir "$(mktemp -d)" >/dev/null 2>&1 & run=$!
sleep 6
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --window-size=1500,900 \
  --virtual-time-budget=4000 --screenshot="$out" "http://127.0.0.1:$port/tasks" 2>/dev/null
wait $run
echo "wrote $out"
