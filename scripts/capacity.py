"""The capacity model of docs/capacity.md, from costs per key measured by scripts/bench.py.

A run is CPU-bound wherever it is: each part feeds at most (cores it may use) / (its CPU per key).
Redis is single-threaded (one core per master, shared with the app); a worker's pool process is one
interpreter running one batch at a time (one core; a worker runs one per core by default, prefork),
with one PostgreSQL connection, whose backend takes one core, up to the primary's cores; and on one
machine all of them share its cores. The keys/s of a run is the
least of those limits. Checked against the bench for 1 and 2 workers on this machine (its
prediction beside the measured keys/s); past one machine it projects the wall time of a keyspace.
"""
from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class Costs:
    """CPU µs per key of each part, as the bench measures them."""
    own: float  # the migrator's processes (coordinator and workers)
    postgresql: float
    redis: float
    broker: float = 0.0

    @property
    def total(self) -> float:
        return self.own + self.postgresql + self.redis + self.broker


def limits(costs: Costs, *, workers: int, masters: int = 1, pg_cores: float, machine_cores: float | None = None,
           redis_share: float = 1.0) -> dict[str, float]:
    """keys/s each part can feed: `redis_share` of each master's one core, `workers` pool processes
    (worker cores) of one core each, PostgreSQL's backends (one per pool process, at most `pg_cores`),
    and, when everything shares one machine, its `machine_cores`."""
    out = {"redis": masters * redis_share * 1e6 / costs.redis,
           "workers": workers * 1e6 / costs.own,
           "postgresql": min(pg_cores, workers) * 1e6 / costs.postgresql}
    if machine_cores is not None:
        out["machine"] = machine_cores * 1e6 / costs.total
    return out


def predict(costs: Costs, **kwargs: float) -> tuple[float, str]:
    """The keys/s the model predicts, and which limit sets it."""
    found = limits(costs, **kwargs)
    bound = min(found, key=found.get)
    return found[bound], bound


def saturating_workers(costs: Costs, *, masters: int, pg_cores: float, redis_share: float = 1.0) -> int:
    """Worker cores (pool processes) past which another adds nothing: Redis or PostgreSQL is the bound."""
    n = 1
    while n < 10_000 and predict(costs, workers=n, masters=masters, pg_cores=pg_cores,
                                 redis_share=redis_share)[1] == "workers":
        n += 1
    return n


KEYSPACES = (10_000_000, 100_000_000, 1_000_000_000)
CLUSTERS = (1, 6, 30)
PG_CORES = 16  # one PostgreSQL primary of this many cores (the projection's assumption)
REDIS_SHARE = 0.5  # of each master's core the migration may take beside the app (the throttle's knob)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def render(costs: Costs, measured: dict[int, tuple[float, Costs, int]], machine_cores: int) -> list[str]:
    """The model's lines: its check against the bench (`measured`: workers -> (keys/s, their costs, their
    pool processes in all)), then the projection past one machine from `costs`."""
    # On a shared machine a run gets fewer cores than it has: the cores it did use (its CPU per key
    # times its keys/s) show how much of a gap between the model and the bench that explains.
    lines = [f"| workers on this machine ({machine_cores} cores, everything on it) | pool processes | measured keys/s "
             "| model keys/s (bound by) | model / measured | cores the run used |", "|---:|---:|---:|---:|---:|---:|"]
    for workers, (rate, own_costs, processes) in measured.items():
        model, bound = predict(own_costs, workers=processes, pg_cores=machine_cores, machine_cores=machine_cores)
        lines.append(f"| {workers} | {processes} | {rate:,.0f} | {model:,.0f} ({bound}) | {model / rate:.2f} | "
                     f"{own_costs.total * rate / 1e6:.2f} |")
    lines += ["", f"From the CPU per key of 2 workers ({costs.own:.0f} own + {costs.postgresql:.0f} PostgreSQL + "
              f"{costs.redis:.0f} Redis µs): one Redis master feeds {1e6 / costs.redis:,.0f} keys/s with its whole core "
              f"({REDIS_SHARE:.0%} of it: {REDIS_SHARE * 1e6 / costs.redis:,.0f}), one PostgreSQL core "
              f"{1e6 / costs.postgresql:,.0f}, one worker core (a pool process) {1e6 / costs.own:,.0f}.", "",
              f"| masters (one PostgreSQL primary of {PG_CORES} cores, {REDIS_SHARE:.0%} of each master's core) "
              "| worker cores until saturated | keys/s (bound by) | " + " | ".join(f"{n:,} keys" for n in KEYSPACES) + " |",
              "|---:|---:|---:|" + "---:|" * len(KEYSPACES)]
    for masters in CLUSTERS:
        workers = saturating_workers(costs, masters=masters, pg_cores=PG_CORES, redis_share=REDIS_SHARE)
        rate, bound = predict(costs, workers=workers, masters=masters, pg_cores=PG_CORES, redis_share=REDIS_SHARE)
        lines.append(f"| {masters} | {workers} | {rate:,.0f} ({bound}) | "
                     + " | ".join(_duration(n / rate) for n in KEYSPACES) + " |")
    return lines
