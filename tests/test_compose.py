"""docker-compose.yml is checked without a Docker engine: structure, references, commands."""
from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_file_defines_a_runnable_stack():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "rabbitmq", "worker", "flower", "coordinator"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    for name in ("worker", "flower", "coordinator"):
        env = services[name]["environment"]
        assert {"REDIS_URL", "DATABASE_URL", "CELERY_BROKER_URL"} <= set(env), name
        assert (ROOT / services[name]["build"] / "Dockerfile").exists()
    worker = services["worker"]["command"]
    assert worker[:4] == ["celery", "-A", "workers", "worker"] and "-Q" in worker
    assert set(worker[worker.index("-Q") + 1].split(",")) == {"critical", "high", "medium", "low"}
    assert "ports" not in services["worker"]  # so `--scale worker=N` works
    assert services["flower"]["command"][:4] == ["celery", "-A", "workers", "flower"]
    assert "migrator run" in " ".join(services["coordinator"]["command"])
