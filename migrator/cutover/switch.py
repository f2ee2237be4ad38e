"""Switching the app's reads: parity from shadow reads, the health of both stores, the cutover itself.

`migrator cutover` refuses unless the latest run completed with every priority validated, no
dual-write repair is pending, and the sync path is current: a live `migrator follow` session's lag
and last reconciliation, or else each operation's shadow-read parity above the threshold.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import redis

from migrator.core import ledger, notifications
from migrator.cutover.dualwrite import REPAIR_QUEUE, WriteStrategy, configured_strategy

# A live follow session writes its figures every second: silent for longer than this, it may have died
# with changes in hand (ledger.FOLLOW_STALE_S, longer, is when `status` calls it gone).
CUTOVER_SILENCE_S = 5.0


def parity(conn: Any, hours: float = 24.0) -> dict[str, dict[str, Any]]:
    """Per operation over the last `hours`: shadow reads, matches, their ratio, a few mismatches."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT operation, count(*), count(*) FILTER (WHERE matched) FROM dual_write_shadow_reads"
                    " WHERE created_at > now() - make_interval(secs => %s) GROUP BY operation ORDER BY operation",
                    (hours * 3600,))
        counts = cur.fetchall()
        cur.execute("SELECT operation, redis_answer, postgres_answer FROM (SELECT *, row_number() OVER"
                    " (PARTITION BY operation ORDER BY created_at DESC) AS n FROM dual_write_shadow_reads"
                    " WHERE NOT matched AND created_at > now() - make_interval(secs => %s)) m WHERE n <= 3",
                    (hours * 3600,))
        examples: dict[str, list] = {}
        for operation, redis_answer, postgres_answer in cur.fetchall():
            examples.setdefault(operation, []).append({"redis": redis_answer, "postgres": postgres_answer})
    return {op: {"reads": total, "matched": matched, "parity": matched / total, "mismatches": examples.get(op, [])}
            for op, total, matched in counts}


def pending_repairs(client: redis.Redis, conn: Any) -> int:
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM dual_write_repairs WHERE repaired_at IS NULL")
        (in_postgres,) = cur.fetchone()
    return in_postgres + client.llen(REPAIR_QUEUE)


def health(client: redis.Redis, conn: Any) -> dict[str, Any]:
    """Both stores as the guide's /health reports them: up, latency, the strategy, pending repairs."""
    out: dict[str, Any] = {}
    for name, ping in (("redis", client.ping), ("postgres", lambda: _pg_ping(conn))):
        started = time.monotonic()
        try:
            ping()
            out[name] = {"ok": True, "latency_ms": round((time.monotonic() - started) * 1000, 2)}
        except Exception as exc:  # health reports, it never raises
            out[name] = {"ok": False, "error": type(exc).__name__}
    if out["postgres"]["ok"]:
        out["strategy"] = configured_strategy(conn).value
        out["pending_repairs"] = pending_repairs(client, conn) if out["redis"]["ok"] else None
    out["ok"] = out["redis"]["ok"] and out["postgres"]["ok"]
    return out


def _pg_ping(conn: Any) -> None:
    with conn, conn.cursor() as cur:
        cur.execute("SELECT 1")


@dataclass
class Decision:
    allowed: bool
    reasons: list[str] = field(default_factory=list)


def judge_cutover(client: redis.Redis, conn: Any, parity_reads: Sequence[str], *, min_parity: float, min_reads: int,
                  hours: float, max_lag: float = 1.0, source: redis.Redis | None = None) -> Decision:
    """Whether the app's reads may move to PostgreSQL. The sync path is `migrator follow` while a session
    runs (its lag under `max_lag`, its last reconciliation, a comparison of every key, clean), else the
    app's DualWriteService (its shadow-read parity). `source`: a client of the source's first node, whose
    masters' settings are read (`client` may be a cluster client that routes by key)."""
    reasons = []
    with conn, conn.cursor() as cur:
        run_id = ledger.latest_run(cur)
        run = ledger.get_run(cur, run_id) if run_id else None
        verdicts = ledger.latest_verdicts(cur, run_id) if run_id else {}
        session = ledger.live_follow_session(cur)
        following = ledger.follow_progress(cur, session) if session else None
        dead = ledger.dead_letter_count(cur, session) if session else 0
    if run is None:
        reasons.append("no migration run yet: backfill with `migrator run` first")
    elif run["status"] != "completed" or not verdicts or not all(verdicts.values()):
        reasons.append(f"the latest run {run_id} is {run['status']}, validated {verdicts}: it must have completed "
                       "with every priority validated (`migrator validate`)")
    pending = pending_repairs(client, conn)
    if pending:
        reasons.append(f"{pending} dual-write repair(s) pending: apply them first (DualWriteService.repair())")
    if following is not None:
        reasons += _follow_reasons(session, following, max_lag)
        if dead:
            reasons.append(f"follow session {session} holds {dead} dead letter(s): keys whose change it could not apply, "
                           f"their rows as they were (`migrator report {session}` says why); fix them in Redis")
        reasons += _notification_reasons(source or client)
        return Decision(not reasons, reasons)
    seen = parity(conn, hours)
    if not parity_reads:
        reasons.append("the mapping names no parity reads (Hooks.parity_reads): nothing says the app's reads agree "
                       "on PostgreSQL; declare the reads its DualWriteService shadows")
    for operation in parity_reads:
        p = seen.get(operation, {"reads": 0, "parity": 0.0})
        if p["reads"] < min_reads:
            reasons.append(f"{operation}: {p['reads']} shadow reads in {hours:g} h, fewer than {min_reads}; "
                           "keep DUAL_WRITE with shadow reads on a while longer")
        elif p["parity"] < min_parity:
            reasons.append(f"{operation}: parity {p['parity']:.4%} is below {min_parity:.4%} "
                           "(`migrator parity` shows the mismatches)")
    return Decision(not reasons, reasons)


def _follow_reasons(session: str, p: dict[str, Any], max_lag: float) -> list[str]:
    reasons = []
    if p["silent_s"] > CUTOVER_SILENCE_S:
        reasons.append(f"follow session {session} has not reported for {p['silent_s']:.0f} s (it reports every second),"
                       f" {p['pending'] or 0:,} key(s) pending at its last report: is its process alive? (start"
                       " `migrator follow` again)")
    if p["lag_s"] > max_lag:
        reasons.append(f"follow session {session} lags {p['lag_s']:.3f} s, over --max-lag {max_lag:g} s; wait, or "
                       "give it more --jobs")
    if p["unsubscribed"]:
        reasons.append(f"follow session {session} is not receiving the events of {p['unsubscribed']}: changes there "
                       "would not reach PostgreSQL (`migrator status " + session + "`)")
    last = p["last_reconciliation"]
    if last is None or not last["clean"]:
        reasons.append(f"follow session {session}: its last reconciliation is "
                       + ("not done yet" if last is None else "not clean (it applied again what the events missed)")
                       + "; wait for a clean one (`migrator status " + session + "`)")
    return reasons


def _notification_reasons(client: redis.Redis) -> list[str]:
    """A server that no longer publishes the keyspace events follow needs (a CONFIG SET since follow
    subscribed): its changes reach PostgreSQL only at the next reconciliation, whatever the lag says.
    A server whose CONFIG is refused (a managed service) is not judged here."""
    reasons = []
    for node, value in notifications.current_by_master(client).items():
        if value is not None and notifications.missing(value):
            reasons.append(f"Redis {node or 'server'}: {notifications.SETTING} is {value!r}, without "
                           f"{notifications.missing(value)}: follow receives no event of those changes; "
                           f"{notifications.advice(value)}")
    return reasons


def set_strategy(conn: Any, strategy: WriteStrategy, reason: str) -> None:
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO dual_write_settings (strategy, reason) VALUES (%s, %s) ON CONFLICT (id)"
                    " DO UPDATE SET strategy = EXCLUDED.strategy, reason = EXCLUDED.reason, changed_at = now()",
                    (strategy.value, reason))
