"""Servers of a test's own: Redis on spare ports (the shared one has no password, no replica, no
cluster), and URLs that carry a password for them.

The pattern of test_cli.py's `redis_with_password` and test_cluster.py's `cluster`, as plain
context managers any test module can use. Each server starts from a config file of its own, as
a production one does, so a restore that restarts it from that file (`redis-server $conf`) can
be run as it stands.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def spare_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55536:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port + 10000)) != 0:
                    return port


def config_text(options: tuple[str, ...]) -> str:
    """redis-server's command-line options ("--replicaof", "host", "port", ...) as config-file lines."""
    lines: list[list[str]] = []
    for token in options:
        if token.startswith("--"):
            lines.append([token[2:]])
        else:
            lines[-1].append(json.dumps(token))  # a double-quoted string, "" included, as redis.conf reads it
    return "".join(" ".join(words) + "\n" for words in lines)


@contextmanager
def redis_server(directory: Path, *options: str, password: str | None = None) -> Iterator[int]:
    """A redis-server on a spare port, without persistence unless `options` ask; yields the port once it answers."""
    port = spare_port()
    conf = directory / f"redis-{port}.conf"
    # a diskless SYNC (what `redis-cli --rdb` asks for) otherwise waits 5 s for more replicas to join it
    conf.write_text(config_text(("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--repl-diskless-sync-delay", "0", "--dir", str(directory),
                                 *(("--requirepass", password) if password else ()), *options)))
    proc = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL)
    # no retries: redis-py would otherwise back off and retry against a server still starting or just stopped
    client = redis.Redis(port=port, password=password, retry=Retry(NoBackoff(), 0))
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield port
    finally:
        try:  # whatever answers there now: the server started here, or one a restore started again
            client.shutdown(nosave=True)
        except redis.RedisError:
            pass
        client.close()
        proc.terminate()
        proc.wait(10)


@contextmanager
def redis_cluster(directory: Path, masters: int = 3, replicas: int = 0) -> Iterator[list[int]]:
    """`masters` cluster nodes with every slot assigned, and `replicas` replicas of each (redis-cli
    decides which of which); yields every node's port once the cluster is ok and the replicas synced."""
    with ExitStack() as stack:
        ports = [stack.enter_context(redis_server(directory, "--cluster-enabled", "yes",
                                                  "--cluster-config-file", f"nodes-{i}.conf"))
                 for i in range(masters * (1 + replicas))]
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", str(replicas), "--cluster-yes"], check=True, capture_output=True,
                       timeout=120)
        for port in ports:
            with redis.Redis(port=port) as client:
                for _ in range(200):
                    role = client.info("replication")
                    if client.cluster("info")["cluster_state"] == "ok" and (
                            role["role"] == "master" or role.get("master_link_status") == "up"):
                        break
                    time.sleep(0.1)
        yield ports


def with_password(url: str, password: str) -> str:
    """`url` (scheme://user@host/...) with a password; PostgreSQL's trust authentication ignores it."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{password}@{host}"


PG_BIN = Path("/usr/lib/postgresql") / (sorted(p.name for p in Path("/usr/lib/postgresql").iterdir())[-1]
                                         if Path("/usr/lib/postgresql").exists() else "15") / "bin"


class PostgresServer:
    """A PostgreSQL cluster of a test's own on a spare port (trust auth), to stop and start at will."""

    def __init__(self, listen: tuple[str, ...] = ("127.0.0.1",), clients: tuple[str, ...] = ()) -> None:
        """`listen`: its addresses; `clients`: networks (CIDR) besides loopback it lets in."""
        # initdb and the server run as the postgres user (never as root), so not under pytest's
        # private tmp directories
        self.home = Path(tempfile.mkdtemp(prefix="migrator-pg-"))
        self.home.chmod(0o777)
        self.data, self.port, self.listen = self.home / "pgdata", spare_port(), listen
        self._as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"])
        with open(self.data / "pg_hba.conf", "a") as hba:  # (trust, as the loopback lines initdb wrote)
            hba.writelines(f"host all all {network} trust\n" for network in clients)

    def _as_postgres(self, command: list[str]) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)

    @property
    def url(self) -> str:
        return self.url_at("127.0.0.1")

    def url_at(self, address: str) -> str:
        return f"postgresql://postgres@{address}:{self.port}/postgres"

    def start(self) -> None:
        self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.data / "log"), "-o",
                           f"-p {self.port} -k /tmp -c listen_addresses={','.join(self.listen)} -c fsync=off", "start"])

    def stop(self) -> None:
        self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop"])

    def remove(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


class Forwarder:
    """A TCP forwarder from `listen`:port to a server on loopback (the shared RabbitMQ and Redis
    listen there only), that can cut every connection through it at once, as a network does, and
    hold each reply `reply_delay` seconds, as a slow or distant link does."""

    def __init__(self, listen: str, target_port: int, reply_delay: float = 0.0) -> None:
        self.target_port, self.reply_delay = target_port, reply_delay
        self.server = socket.create_server((listen, 0))
        self.port = self.server.getsockname()[1]
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.pairs.append((client, upstream))
            for a, b, delay in ((client, upstream, 0.0), (upstream, client, self.reply_delay)):
                threading.Thread(target=self._pipe, args=(a, b, delay), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, delay: float) -> None:
        try:
            while data := source.recv(65536):
                time.sleep(delay)
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """End every connection through it (the server sees its clients go) and take no new one."""
        self.open = False
        for pair in self.pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.pairs = []

    def mend(self) -> None:
        self.open = True

    def close(self) -> None:
        self.cut()
        self.server.close()


@contextmanager
def network_namespace(name: str, subnet: int) -> Iterator[tuple[str, str, str]]:
    """A network namespace `name` joined to this one by a veth pair on 10.231.<subnet>.0/30:
    yields (this side's address, the namespace's address, this side's interface). Made and
    removed here; the namespace reaches only this side's address (and its own loopback)."""
    host_if, ns_if = f"{name}h", f"{name}n"
    host, inside = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
    commands = [["ip", "netns", "add", name], ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
                ["ip", "link", "set", ns_if, "netns", name], ["ip", "addr", "add", f"{host}/30", "dev", host_if],
                ["ip", "link", "set", host_if, "up"],
                ["ip", "netns", "exec", name, "ip", "addr", "add", f"{inside}/30", "dev", ns_if],
                ["ip", "netns", "exec", name, "ip", "link", "set", ns_if, "up"],
                ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"]]
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True, timeout=30)
        yield host, inside, host_if
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def set_link(interface: str, up: bool) -> None:
    subprocess.run(["ip", "link", "set", interface, "up" if up else "down"], check=True, capture_output=True, timeout=30)
