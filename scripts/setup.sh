#!/usr/bin/env bash
# Make this machine ready: a virtualenv with the project installed, and the services up.
# Safe to repeat; starts only what is down. Used by scripts/demo.sh, scripts/test.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
# Reinstall only when the project's dependencies changed.
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: installing the project and its test dependencies"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# The project's bytecode, compiled once as a wheel's install compiles it: the package is installed
# from this checkout (-e), and where PYTHONDONTWRITEBYTECODE is set (this machine sets it) every
# process would otherwise compile each module of it again at start, about 0.13 s of its CPU
# (`python -X importtime -c 'import migrator.cli.main'`: 440-470 ms against 316-323).
.venv/bin/python -m compileall -q -j 0 migrator workers celeryconfig.py flowerconfig.py scripts >/dev/null

# Headless Chromium: the HTML report's test loads the report in it, and the README's screenshots
# are taken with it (Debian's package; MIGRATOR_NEEDS_CHROMIUM=0 to go without: that test then skips).
if [ "${MIGRATOR_NEEDS_CHROMIUM:-1}" = 1 ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
  echo "setup: installing chromium"
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends chromium >/dev/null
fi

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() {  # port name seconds
  for _ in $(seq 1 "$3"); do up "$1" && return 0; sleep 1; done
  echo "setup: $2 did not come up on 127.0.0.1:$1" >&2
  return 1
}

if ! up 6379; then
  echo "setup: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for 6379 Redis 30
fi
if ! up 5432; then
  echo "setup: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
  wait_for 5432 PostgreSQL 60
fi
if [ "${MIGRATOR_NEEDS_BROKER:-1}" = 1 ] && ! up 5672; then
  echo "setup: starting RabbitMQ"
  rabbitmq-server -detached
  wait_for 5672 RabbitMQ 120
fi
