#!/usr/bin/env bash
# The README's HTML report screenshot: a real local run of the demo keyspace (Redis DB 12, the
# database migrator_report_shot, both emptied first; the demo command makes it), with hostile keys for dead letters, its
# `report --html` photographed by headless Chromium (Debian's `chromium`, see scripts/setup.sh).
#   bash scripts/report_screenshot.sh [docs/report.png]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/report.png}
bash scripts/setup.sh
command -v chromium >/dev/null || { echo "needs Debian's chromium: apt-get install chromium" >&2; exit 2; }
export REDIS_URL=redis://127.0.0.1:6379/12 DATABASE_URL=postgresql://postgres@127.0.0.1:5432/migrator_report_shot
dir=$(mktemp -d)
# the database and its schema, by a small demo run, undone at once: the screenshot's run starts on empty tables
DATABASE_URL=${DATABASE_URL%/*}/postgres .venv/bin/migrator demo --users 10 --redis-db 12 --database migrator_report_shot \
  >"$dir/demo.out" 2>/dev/null
.venv/bin/migrator rollback "$(awk '/^run /{print $2; exit}' "$dir/demo.out")" >/dev/null 2>&1
.venv/bin/migrator seed-demo --users 5000 --malformed 8 --fresh >/dev/null 2>&1
.venv/bin/migrator run --local --ranges 4 --output-dir "$dir" >"$dir/run.out" 2>/dev/null || true  # (shown either way)
run=$(awk '/^run /{print $2; exit}' "$dir/run.out")
.venv/bin/migrator report "$run" --html --output-dir "$dir" >/dev/null || true  # (exit 1 if it failed: still shown)
chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking --disable-component-update \
  --disable-sync --user-data-dir="$dir/profile" --window-size=1100,2000 --hide-scrollbars \
  --screenshot="$out" "file://$dir/migration_report_$run.html" 2>/dev/null
echo "wrote $out (run $run)"
