"""Seed a deterministic, realistic Threadr Redis keyspace (see threadr-keyspace.md) for demos, tests and benchmarks."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import random
import string
from bisect import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import accumulate
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import redis

__all__ = ["PATTERNS", "seed_demo"]

_T = TypeVar("_T")

# Pattern names returned by seed_demo, in the order of the keyspace spec table.
PATTERNS: tuple[str, ...] = (
    "premium_ip", "premium_email", "subscription", "subscriptions_active", "newsletter",
    "newsletter_list", "usage_counter", "usage_log", "usage_stats", "ratelimit", "cache_url",
    "cache_text", "user", "user_email_index", "session", "failed_login", "thread",
    "user_threads", "thread_stats", "thread_analytics", "analytics_threads",
    "analytics_timeseries", "unmapped",
)

FLUSH_EVERY = 2000  # pipeline commands per round trip: fast, and memory stays flat
DAY = 86_400
HOUR = 3_600
# Floor for remaining TTLs: keys must outlive the seeding itself (100k users take about a
# minute) so the returned counts match what SCAN finds; short TTLs still expire mid-migration.
MIN_TTL = 300

_EPOCH = datetime(1970, 1, 1)
_ALNUM = string.ascii_letters + string.digits
# bcrypt's base64 alphabet, index-aligned with the standard one so bytes.translate converts.
_B64_TO_BCRYPT = bytes.maketrans(
    (string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/").encode(),
    ("./" + string.ascii_uppercase + string.ascii_lowercase + string.digits).encode(),
)

_FIRST = ("james", "mary", "john", "patricia", "robert", "jennifer", "michael", "linda", "william",
          "elizabeth", "david", "barbara", "richard", "susan", "joseph", "jessica", "thomas",
          "sarah", "chris", "karen", "daniel", "nancy", "matthew", "lisa", "anthony", "betty")
_LAST = ("smith", "johnson", "williams", "brown", "jones", "garcia", "miller", "davis", "rodriguez",
         "martinez", "hernandez", "lopez", "gonzalez", "wilson", "anderson", "taylor", "moore",
         "jackson", "martin", "lee", "thompson", "white", "harris", "clark", "lewis", "walker")
# Odd but colon-free local parts; the user index is appended so every address stays unique.
_ODD_LOCALS = ("o'brien", "jean-luc.picard", "mary_ann", "a.b.c", "x!y#z", "first.last.", "_under")
_ODD_DOMAINS = ("example.org", "example.co.uk", "mail.example.io", "sub.example.com")
_PLUS_TAGS = ("threadr", "news", "work", "spam")
_DOMAINS = ("example.com", "example.com", "example.com", "example.org", "example.net")

_TOPICS = ("Why your database migration will fail", "10 lessons from scaling Redis",
           "The hidden cost of caching", "How we cut our cloud bill in half",
           "PostgreSQL tips nobody tells you", "Naïve datetimes considered harmful",
           "Ünïcödé in production: a field guide", "Shipping a SaaS in 30 days 🚀",
           "What I learned writing 100 threads", "東京 travel notes for engineers")
_SENTENCES = (
    "Most teams underestimate how much context a good migration needs.",
    "Start with an audit: you cannot move what you have not counted.",
    "Dual writes buy you time, but only if reads are compared too.",
    "Idempotency is not optional when batches get redelivered.",
    "Counters only grow within a period, so merge them with GREATEST.",
    "TTLs are data too: an expiry date is part of the record.",
    "Ünïcödé ✓ 🚀 日本語 — the whole pipeline must keep every byte.",
    "Café déjà vu: naïve façades still break parsers 😅",
    "Emoji everywhere 🎉🔥💡 and a family 👩‍👩‍👧 built with zero-width joiners.",
    "Ελληνικά, русский, العربية, עברית — all in one tweet 🌍",
    "Smart “quotes”, ‘single’ ones, a tab\tand a line break\nmid-tweet.",
    "Rollback plans are cheap until the day you need one.",
    "Measure twice, migrate once. 📏",
    "Thread 🧵 below ⬇️",
)
_TAGS = ("databases", "redis", "postgres", "startups", "devops", "python", "ai", "productivity")
_AI_MODELS = ("gpt-3.5-turbo", "gpt-4o-mini", "gpt-4-turbo")
_USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.1 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
)
# headers.get("referer", ""): an empty string, never null
_REFERRERS = ("", "https://twitter.com/", "https://www.google.com/", "https://news.ycombinator.com/")
_NEWSLETTER_SOURCES = ("landing_page", "footer", "pricing_page", "blog_post")
_METRIC_SETS = (("impressions",), ("engagement_rate",), ("impressions", "engagement_rate"))

# (plan_name, display name, tier_level, thread_limit, monthly cents, annual cents, features)
_PLANS: tuple[tuple[str, str, int, int, int, int, tuple[str, ...]], ...] = (
    ("threadr_starter", "Threadr Starter", 1, 50, 999, 9990, ("50_threads_month", "basic_templates")),
    ("threadr_pro", "Threadr Pro", 2, 200, 1999, 19990, ("200_threads_month", "analytics", "templates")),
    ("threadr_team", "Threadr Team", 3, -1, 4999, 49990, ("unlimited_threads", "analytics", "team_seats")),
    ("unknown", "Unknown Plan", 0, 5, 0, 0, ()),
)
_PLAN_CUM = tuple(accumulate((40, 40, 15, 5)))
# Stripe statuses with rough real-world weights; "cancelled" (two l) is the app's own misspelling.
_SUB_STATUSES = ("active", "trialing", "past_due", "canceled", "cancelled", "incomplete", "unpaid")
_SUB_STATUS_CUM = tuple(accumulate((45, 10, 10, 15, 8, 6, 6)))
_THREAD_COUNT_CUM = tuple(accumulate((38, 27, 17, 11, 7)))  # 0..4 saved threads per user
_USER_STATUSES = ("active", "inactive", "suspended")
_USER_STATUS_CUM = tuple(accumulate((90, 7, 3)))
_FAILED_ATTEMPTS = (0, 1, 2, 4)
_FAILED_ATTEMPTS_CUM = tuple(accumulate((85, 8, 5, 2)))
_ROLES = ("user", "premium", "admin")
_ROLES_CUM = tuple(accumulate((96, 3, 1)))


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one user gets; drawn per user so memory stays flat."""

    iso: bool                   # datetime spelling: isoformat() vs str()
    ipv6: bool
    email_style: str            # plain | plus | upper | odd | obrien
    n_threads: int
    timeseries: bool
    period_enum: bool           # timeseries key reads "MetricPeriod.DAY" instead of "day"
    session: bool
    failed_login: bool
    usage_email: bool
    usage_user: bool
    usage_logs: int
    ratelimit: bool
    premium: str | None         # stripe | manual | None
    grant_ip: str               # client | zero ("0.0.0.0") | none (null ip -> key "...:ip:None")
    grant_expired: bool
    subscription: str | None    # user_id | email | None (what the key is named by)
    sub_status: str | None      # a pinned Stripe status, or None to draw one
    newsletter: bool
    sub_both_keys: bool = False  # also under the customer's email: the webhook's key beside the routes'


# Overrides for users 0..9, so that every pattern and edge case exists once users >= 10.
# The "zero" and "none" grants appear only here: each of them owns one shared key.
_FORCED: tuple[tuple[tuple[str, Any], ...], ...] = (
    (("n_threads", 3), ("timeseries", True), ("email_style", "obrien")),
    (("session", True), ("failed_login", True), ("ipv6", True), ("usage_logs", 2)),
    (("premium", "stripe"), ("grant_ip", "client"), ("grant_expired", True)),
    # (its email as typed, mixed case: the key the admin API grants under)
    (("premium", "stripe"), ("grant_ip", "client"), ("grant_expired", False), ("email_style", "upper"),
     ("subscription", "user_id"), ("sub_status", "active"), ("sub_both_keys", True)),
    (("subscription", "email"), ("sub_status", "cancelled"), ("newsletter", True), ("email_style", "upper")),
    (("premium", "manual"), ("grant_ip", "client"), ("ratelimit", True), ("subscription", None)),
    (("premium", "stripe"), ("grant_ip", "zero")),
    (("premium", "stripe"), ("grant_ip", "none"), ("email_style", "plus")),
    (("usage_email", True), ("usage_user", True), ("ipv6", True), ("usage_logs", 3)),
    (("n_threads", 1), ("timeseries", True), ("period_enum", True), ("iso", False)),
)


class _Writer:
    """Queues writes on a non-transactional pipeline, flushes every FLUSH_EVERY commands, counts keys."""

    def __init__(self, r: "redis.Redis") -> None:
        self._pipe = r.pipeline(transaction=False)
        self._queued = 0
        self.counts: dict[str, int] = dict.fromkeys(PATTERNS, 0)
        self.counts["malformed"] = self.counts["refused"] = 0
        # Only keys that several writers share (global sets/hashes, the None/0.0.0.0 grant keys)
        # are remembered; every other key name is unique by construction.
        self._shared: set[str] = set()

    def _done(self, pattern: str, key: str, commands: int, shared: bool) -> None:
        if not shared:
            self.counts[pattern] += 1
        elif key not in self._shared:
            self._shared.add(key)
            self.counts[pattern] += 1
        self._queued += commands
        if self._queued >= FLUSH_EVERY:
            self.flush()

    # Raw execute_command: redis-py's typed helpers (set, sadd, ...) cost more than the seeding itself.
    def string(self, pattern: str, key: str, value: str | bytes, ttl: int | None, *, shared: bool = False) -> None:
        if ttl is None:
            self._pipe.execute_command("SET", key, value)
        else:
            self._pipe.execute_command("SET", key, value, "EX", ttl)
        self._done(pattern, key, 1, shared)

    def json_doc(self, pattern: str, key: str, obj: Any, ttl: int | None, *, shared: bool = False) -> None:
        self.string(pattern, key, json.dumps(obj), ttl, shared=shared)

    def sadd(self, pattern: str, key: str, members: Sequence[str], ttl: int | None, *, shared: bool = False) -> None:
        self._collection(pattern, key, ("SADD", key, *members), ttl, shared)

    def zadd(self, pattern: str, key: str, scores: Mapping[str, float], ttl: int | None, *,
             shared: bool = False) -> None:
        flat = [part for member, score in scores.items() for part in (score, member)]
        self._collection(pattern, key, ("ZADD", key, *flat), ttl, shared)

    def hset(self, pattern: str, key: str, fields: Mapping[str, Any], ttl: int | None, *, shared: bool = False) -> None:
        flat = [part for name, value in fields.items() for part in (name, value)]
        self._collection(pattern, key, ("HSET", key, *flat), ttl, shared)

    def rpush(self, pattern: str, key: str, items: Sequence[str], ttl: int | None) -> None:
        self._collection(pattern, key, ("RPUSH", key, *items), ttl, False)

    def _collection(self, pattern: str, key: str, command: tuple[Any, ...], ttl: int | None, shared: bool) -> None:
        # Collections cannot take a TTL on creation, so the app followed each write with EXPIRE.
        self._pipe.execute_command(*command)
        if ttl is not None:
            self._pipe.execute_command("EXPIRE", key, ttl)
        self._done(pattern, key, 1 if ttl is None else 2, shared)

    def flush(self) -> None:
        if self._queued:
            self._pipe.execute()
            self._queued = 0


@dataclass(slots=True)
class _Ctx:
    """Everything one seed_demo call shares: the seeded Random, the writer, `now`, small tallies."""

    rng: random.Random
    w: _Writer
    now: datetime
    midnight: datetime
    threads: int = 0
    users: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (user_id, email) of the first users
    threads_by_day: dict[str, int] = dataclasses.field(default_factory=dict)
    grants_by_month: dict[str, int] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------- randomness and small values
# random.Random's randint/choice run several Python frames each; these one-liners on
# rng.random() keep 100k users feasible and are still fully determined by the seed.

def _chance(rng: random.Random, p: float) -> bool:
    return rng.random() < p


def _rint(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return lo + int(rng.random() * (hi - lo + 1))


def _pick(rng: random.Random, seq: Sequence[_T]) -> _T:
    return seq[int(rng.random() * len(seq))]


def _weighted(rng: random.Random, seq: Sequence[_T], cum_weights: Sequence[int]) -> _T:
    return seq[bisect(cum_weights, rng.random() * cum_weights[-1])]


def _token(rng: random.Random, nbytes: int = 16) -> str:
    """secrets.token_urlsafe(nbytes) from the seeded Random: 16 bytes -> 22 chars."""
    return base64.urlsafe_b64encode(rng.randbytes(nbytes)).rstrip(b"=").decode()


def _alnum(rng: random.Random, n: int) -> str:
    return "".join(rng.choices(_ALNUM, k=n))


def _uuid4(rng: random.Random) -> str:
    """Same string as str(uuid.UUID(int=rng.getrandbits(128), version=4)), without the class."""
    n = rng.getrandbits(128)
    n = (n & ~(0xC000 << 48)) | (0x8000 << 48)
    n = (n & ~(0xF000 << 64)) | (4 << 76)
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _bcrypt_hash(rng: random.Random) -> str:
    """`$2b$12$` + 22 chars of salt and 31 of hash, all in bcrypt's base64 alphabet."""
    return "$2b$12$" + base64.b64encode(rng.randbytes(40)).translate(_B64_TO_BCRYPT)[:53].decode()


def _fmt(dt: datetime | None, iso: bool) -> str | None:
    """The app's two datetime spellings: dt.isoformat() and str(dt)."""
    if dt is None:
        return None
    return dt.isoformat() if iso else str(dt)


def _epoch(dt: datetime) -> float:
    """Epoch seconds of a naive datetime read as UTC."""
    return (dt - _EPOCH).total_seconds()


def _between(rng: random.Random, start: datetime, end: datetime) -> datetime:
    """A random instant in [start, end] (microsecond resolution)."""
    fraction = rng.random()  # drawn even for an empty span, so `now` never shifts the sequence
    return start if end <= start else start + (end - start) * fraction


def _ago(ctx: _Ctx, lo_s: float, hi_s: float) -> datetime:
    """A random instant between hi_s and lo_s seconds before now."""
    return ctx.now - timedelta(seconds=lo_s + (hi_s - lo_s) * ctx.rng.random())


def _ttl_left(ctx: _Ctx, ttl_s: int, written_at: datetime) -> int:
    """Seconds left of a TTL set at written_at, floored at MIN_TTL."""
    return max(MIN_TTL, int(ttl_s - (ctx.now - written_at).total_seconds()))


def _client_ip(rng: random.Random, i: int, ipv6: bool) -> str:
    """One address per user, unique by construction from the user index."""
    if ipv6:
        return f"2001:db8:{_rint(rng, 1, 0xFFFF):x}::{i + 1:x}"
    # First octet starts at 24 so 0.x, 10.x and 127.x never appear for up to ~6.5M users.
    return f"{24 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}.{_rint(rng, 1, 254)}"


def _random_ip(rng: random.Random, ipv6: bool) -> str:
    if ipv6:
        return "2001:db8:f00d:" + ":".join(f"{_rint(rng, 0, 0xFFFF):x}" for _ in range(5))
    return f"198.51.100.{_rint(rng, 1, 254)}"


def _email(rng: random.Random, i: int, style: str) -> str:
    """A unique address per user index; style covers the shapes the migrator must keep intact."""
    first, last = _pick(rng, _FIRST), _pick(rng, _LAST)
    if style == "obrien":
        return f"o'brien{i}@example.org"
    if style == "odd":
        return f"{_pick(rng, _ODD_LOCALS)}{i}@{_pick(rng, _ODD_DOMAINS)}"
    if style == "plus":
        return f"{first}.{last}{i}+{_pick(rng, _PLUS_TAGS)}@{_pick(rng, _DOMAINS)}"
    if style == "upper":
        return f"{first.capitalize()}.{last.upper()}{i}@{_pick(rng, _DOMAINS).capitalize()}"
    return f"{first}.{last}{i}@{_pick(rng, _DOMAINS)}"


# ---------------------------------------------------------------- per-user plan

def _plan_user(rng: random.Random, i: int) -> _Plan:
    n_threads = _weighted(rng, range(5), _THREAD_COUNT_CUM)
    style_roll, premium_roll, sub_roll = rng.random(), rng.random(), rng.random()
    plan = _Plan(
        iso=_chance(rng, 0.5),
        ipv6=_chance(rng, 0.3),
        email_style=("plain" if style_roll < 0.80 else "plus" if style_roll < 0.88
                     else "upper" if style_roll < 0.95 else "odd"),
        n_threads=n_threads,
        timeseries=_chance(rng, 0.48) and n_threads > 0,   # ~30% of all users
        period_enum=_chance(rng, 0.2),
        session=_chance(rng, 0.20),
        failed_login=_chance(rng, 0.03),
        usage_email=_chance(rng, 0.50),
        usage_user=_chance(rng, 0.30),
        usage_logs=_rint(rng, 0, 3),
        ratelimit=_chance(rng, 0.10),
        premium=None if premium_roll >= 0.08 else ("manual" if premium_roll < 0.012 else "stripe"),
        grant_ip="client",
        grant_expired=_chance(rng, 0.25),
        subscription=None if sub_roll >= 0.05 else ("email" if sub_roll < 0.012 else "user_id"),
        sub_status=None,
        newsletter=_chance(rng, 0.15),
    )
    if i < len(_FORCED):
        return dataclasses.replace(plan, **dict(_FORCED[i]))
    return plan


# ---------------------------------------------------------------- value builders (one per kind)

def _user_doc(ctx: _Ctx, user_id: str, email: str, role: str, ip: str, created: datetime,
              updated: datetime, iso: bool) -> dict[str, Any]:
    rng = ctx.rng
    logged_in = _chance(rng, 0.85)
    failed = _weighted(rng, _FAILED_ATTEMPTS, _FAILED_ATTEMPTS_CUM)
    verified = _chance(rng, 0.8)
    reset = _chance(rng, 0.05)
    return {
        "user_id": user_id,
        "email": email,
        "password_hash": _bcrypt_hash(rng),
        "role": role,
        "status": _weighted(rng, _USER_STATUSES, _USER_STATUS_CUM),
        "created_at": _fmt(created, iso),
        "updated_at": _fmt(updated, iso),
        "last_login_at": _fmt(_between(rng, created, updated), iso) if logged_in else None,
        "login_count": _rint(rng, 1, 300) if logged_in else 0,
        "failed_login_attempts": failed,
        "last_failed_login": _fmt(_between(rng, created, ctx.now), iso) if failed else None,
        "is_email_verified": verified,
        "email_verification_token": None if verified else _token(rng, 32),
        "password_reset_token": _token(rng, 32) if reset else None,
        "password_reset_expires": _fmt(_ago(ctx, -HOUR, HOUR), iso) if reset else None,
        "metadata": {"registration_ip": ip, "registration_timestamp": _fmt(created, iso)},
    }


def _session_doc(ctx: _Ctx, user: Mapping[str, Any], ip: str, last_activity: datetime,
                 iso: bool) -> dict[str, Any]:
    login = last_activity - timedelta(seconds=ctx.rng.random() * 20 * 60)
    return {
        "user_id": user["user_id"], "email": user["email"], "role": user["role"],
        "status": user["status"], "login_timestamp": _fmt(login, iso), "client_ip": ip,
        # Python's hash() of the token: a signed 64-bit int (often beyond 2^53, half of them negative)
        "last_activity": _fmt(last_activity, iso), "access_token_hash": ctx.rng.getrandbits(64) - 2 ** 63,
    }


def _failed_login_doc(rng: random.Random, email: str, ip: str, last: datetime, iso: bool) -> dict[str, Any]:
    return {"attempts": _rint(rng, 1, 5), "last_attempt": _fmt(last, iso), "email": email, "client_ip": ip}


def _tweets(rng: random.Random) -> list[dict[str, Any]]:
    n = _rint(rng, 2, 8)
    tweets = []
    for order in range(1, n + 1):
        content = f"{order}/{n} {_pick(rng, _SENTENCES)}"
        tweets.append({"id": _uuid4(rng), "content": content, "order": order, "character_count": len(content)})
    return tweets


def _thread_doc(rng: random.Random, thread_id: str, user_id: str, created: datetime,
                updated: datetime, iso: bool) -> dict[str, Any]:
    original = " ".join(rng.choices(_SENTENCES, k=_rint(rng, 2, 6)))
    from_url = _chance(rng, 0.7)
    return {
        "id": thread_id,
        "user_id": user_id,
        "title": _pick(rng, _TOPICS),
        "original_content": original,
        "tweets": _tweets(rng),
        "metadata": {
            "source_url": f"https://example.com/blog/post-{_rint(rng, 1, 999_999)}?ref=x&utm=1" if from_url else None,
            "source_type": "url" if from_url else "text",
            "generation_time_ms": _rint(rng, 800, 15_000),
            "ai_model": _pick(rng, _AI_MODELS),
            "content_length": len(original),
            "tags": list(_TAGS[_rint(rng, 0, 7):][:_rint(rng, 0, 3)]),
        },
        # SavedThread.model_dump_json is json.dumps(..., default=str): str(datetime), a space
        "created_at": str(created),
        "updated_at": str(updated),
        "view_count": _rint(rng, 0, 200),
        "copy_count": _rint(rng, 0, 20),
        "is_favorite": _chance(rng, 0.15),
        "is_archived": _chance(rng, 0.05),
    }


def _analytics_doc(rng: random.Random, thread: Mapping[str, Any], posted: datetime,
                   updated: datetime) -> dict[str, Any]:
    """ThreadAnalytics.json() (analytics_models.py): totals as ints, rates as floats, one entry per tweet."""
    rnd = rng.random  # the innermost loop of the seeder: plain floats, no helper calls
    metrics = []
    for tweet in thread["tweets"]:
        impressions = int(rnd() * 5001)
        likes, retweets, replies = int(rnd() * impressions * 0.05), int(rnd() * impressions * 0.0125), int(rnd() * 9)
        metrics.append({"tweet_id": f"{thread['id']}_tweet_{tweet['order']}", "position": tweet["order"],
                        "content": tweet["content"], "character_count": tweet["character_count"],
                        "impressions": impressions, "likes": likes, "retweets": retweets, "replies": replies,
                        "bookmarks": int(rnd() * 5), "quotes": int(rnd() * 3),
                        "engagement_rate": round(100.0 * (likes + retweets + replies) / impressions, 4) if impressions else 0.0,
                        "drop_off_rate": round(rnd() * 30, 2) if tweet["order"] > 1 else None,
                        "posted_at": posted.isoformat(), "peak_hour": int(rnd() * 24)})
    impressions = sum(m["impressions"] for m in metrics)
    engagements = sum(m["likes"] + m["retweets"] + m["replies"] for m in metrics)
    return {
        "thread_id": thread["id"], "user_id": thread["user_id"], "created_at": posted.isoformat(),
        "title": thread["title"], "source_url": thread["metadata"]["source_url"],
        "content_type": _pick(rng, ("educational", "news", "personal", "technical", "other")),
        "tweet_count": len(metrics), "total_character_count": sum(m["character_count"] for m in metrics),
        "total_impressions": impressions, "total_engagements": engagements,
        "engagement_rate": round(100.0 * engagements / impressions, 4) if impressions else 0.0,
        "total_likes": sum(m["likes"] for m in metrics), "total_retweets": sum(m["retweets"] for m in metrics),
        "total_replies": sum(m["replies"] for m in metrics), "total_bookmarks": sum(m["bookmarks"] for m in metrics),
        "total_quotes": sum(m["quotes"] for m in metrics), "profile_visits": int(rnd() * 50),
        "link_clicks": int(rnd() * 80), "new_followers": int(rnd() * 10),
        "thread_completion_rate": round(rnd() * 100, 2), "avg_time_on_thread": round(rnd() * 90, 2),
        "virality_score": round(10 + rnd() * 40, 3), "tweet_metrics": metrics,
        "best_tweet_position": max(metrics, key=lambda m: m["impressions"])["position"],
        "worst_tweet_position": min(metrics, key=lambda m: m["impressions"])["position"],
        "optimal_length": None, "posted_at": posted.isoformat(), "peak_engagement_hour": int(rnd() * 24),
        "peak_engagement_day": _pick(rng, ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")),
        "last_updated": updated.isoformat(),
    }


def _timeseries_members(ctx: _Ctx, metric: str) -> dict[str, float]:
    """member JSON -> epoch score, one point per distinct day: TimeSeriesDataPoint.json(), compact,
    its value a float (an int metric is coerced: 523.0) and its period the enum's value."""
    rng, points = ctx.rng, {}
    for back in sorted(rng.sample(range(60), _rint(rng, 3, 10)), reverse=True):
        ts = ctx.midnight - timedelta(days=back)
        value = float(_rint(rng, 0, 5000)) if metric == "impressions" else round(rng.random() * 9, 4)
        points[json.dumps({"timestamp": ts.isoformat(), "value": value, "period": "day"}, separators=(",", ":"))] = \
            _epoch(ts)
    return points


def _usage_log_doc(at: datetime, ip: str, email: str | None) -> dict[str, Any]:
    iso = at.isoformat()
    return {"timestamp": iso, "client_ip": ip, "email": email, "date": iso[:10], "month": iso[:7]}


def _grant_doc(rng: random.Random, kind: str, email: str | None, ip: str | None, granted: datetime,
               days: int) -> dict[str, Any]:
    """A premium grant as grant_premium_access writes it (ISO datetimes, local time), with the
    payment_info of its caller: the Stripe webhook, the admin API, or a hand-written template."""
    if kind == "stripe":
        session_id = "cs_test_" + _alnum(rng, 58)
        payment = {"payment_reference": f"stripe_session_{session_id}", "granted_at": granted.isoformat(),
                   "granted_by": "stripe_webhook", "client_ip": "stripe_webhook", "stripe_session_id": session_id,
                   "amount": 499 if days <= 31 else 4999, "currency": "usd"}
    elif kind == "api":
        payment = {"payment_reference": f"order-{_alnum(rng, 10)}", "granted_at": granted.isoformat(),
                   "granted_by": "api", "client_ip": ip}
    else:  # a support grant pasted from scripts/show_redis_commands.py
        payment = {"source": "manual_test_grant", "granted_by": "manual_redis_commands",
                   "timestamp": granted.isoformat(), "test_account": True}
    return {"granted_at": granted.isoformat(), "expires_at": (granted + timedelta(days=days)).isoformat(),
            "plan": "premium" if kind != "manual" else "pro", "duration_days": days, "client_ip": ip, "email": email,
            "payment_info": payment}


def _subscription_doc(ctx: _Ctx, status: str | None) -> tuple[dict[str, Any], int]:
    """A Stripe subscription and the seconds its key has left."""
    rng, now = ctx.rng, ctx.now
    name, display, tier, limit, monthly, annual, features = _weighted(rng, _PLANS, _PLAN_CUM)
    status = status or _weighted(rng, _SUB_STATUSES, _SUB_STATUS_CUM)
    is_annual = _chance(rng, 0.25)
    length = timedelta(days=365 if is_annual else 30)
    if status in ("canceled", "cancelled", "unpaid", "incomplete") and _chance(rng, 0.5):
        end = _ago(ctx, HOUR, 6 * DAY)   # period already over: the key lives until end + 7 d
        start = end - length
        ttl = _ttl_left(ctx, 7 * DAY, end)
    else:
        start = _ago(ctx, HOUR, length.total_seconds() - HOUR)
        end = start + length
        ttl = _ttl_left(ctx, 365 * DAY, start) if _chance(rng, 0.5) else int((end - now).total_seconds()) + 7 * DAY
    # json.dumps(..., default=str) of datetime.fromtimestamp(<Stripe's int>): a space, no microseconds
    doc = {
        "subscription_id": "sub_" + _alnum(rng, 24),
        "plan_name": name, "plan_display_name": display, "tier_level": tier, "status": status,
        "current_period_start": str(start.replace(microsecond=0)), "current_period_end": str(end.replace(microsecond=0)),
        "cancel_at_period_end": status in ("canceled", "cancelled") or _chance(rng, 0.1),
        "thread_limit": limit, "features": list(features), "is_annual": is_annual,
        "monthly_price": monthly, "annual_price": annual,
    }
    if name != "unknown" and _chance(rng, 0.3):  # routes/subscription.py @1af4fa7: fewer fields, shorter names
        doc["plan_name"] = name.removeprefix("threadr_")
        for field in ("plan_display_name", "tier_level", "is_annual", "monthly_price", "annual_price"):
            del doc[field]
    return doc, ttl


def _newsletter_doc(rng: random.Random, email: str, ip: str, subscribed: datetime, iso: bool) -> dict[str, Any]:
    return {"email": email, "subscribed_at": _fmt(subscribed, iso), "client_ip": ip,
            "user_agent": _pick(rng, _USER_AGENTS), "referrer": _pick(rng, _REFERRERS),
            "source": _pick(rng, _NEWSLETTER_SOURCES)}


def _cache_doc(rng: random.Random, source_url: str | None) -> dict[str, Any]:
    tweets = _tweets(rng)
    return {"success": True, "thread": [{"content": t["content"], "order": t["order"]} for t in tweets],
            "title": _pick(rng, _TOPICS), "source_url": source_url,
            "_cached_at": round(rng.uniform(1_000, 900_000), 3)}  # time.monotonic(), not epoch


# ---------------------------------------------------------------- per-user writers

def _write_counters(ctx: _Ctx, scope: str, subject: str) -> None:
    """Daily and monthly counters of one subject, under one of the app's two TTL schemes."""
    rng, now, midnight = ctx.rng, ctx.now, ctx.midnight
    long_ttl = _chance(rng, 0.5)
    daily_ttl, monthly_ttl = (30 * DAY, 365 * DAY) if long_ttl else (DAY, 31 * DAY)
    # Only the 30-day scheme keeps earlier days alive; a stride keeps the days distinct.
    stride = _rint(rng, 1, 9)
    days_back = range(0, stride * _rint(rng, 1, 4), stride) if long_ttl else (0,)
    this_month, latest = 0, now
    for back in days_back:
        day = midnight - timedelta(days=back)
        last_write = _between(rng, day, min(day + timedelta(hours=23, minutes=59), now))
        count = _rint(rng, 1, 8)
        if back == 0:
            latest = last_write
        if day.month == now.month:  # within 29 days, so the same month means the same year
            this_month += count
        ctx.w.string("usage_counter", f"threadr:usage:{scope}:{subject}:daily:{day.isoformat()[:10]}",
                     str(count), _ttl_left(ctx, daily_ttl, last_write))
    ctx.w.string("usage_counter", f"threadr:usage:{scope}:{subject}:monthly:{now.isoformat()[:7]}",
                 str(this_month + _rint(rng, 0, 20)), _ttl_left(ctx, monthly_ttl, latest))


def _write_usage(ctx: _Ctx, p: _Plan, ip: str, email: str, user_id: str) -> None:
    rng = ctx.rng
    _write_counters(ctx, "ip", ip)
    if p.usage_email:
        _write_counters(ctx, "email", email)
    if p.usage_user:
        _write_counters(ctx, "user", user_id)
    # Distinct instants give distinct epoch-float key suffixes.
    for at in sorted({_ago(ctx, 0, 7 * DAY - HOUR) for _ in range(p.usage_logs)}):
        ctx.w.json_doc("usage_log", f"threadr:usage:log:{ip}:{_epoch(at)}",
                       _usage_log_doc(at, ip, email if p.usage_email else None), _ttl_left(ctx, 7 * DAY, at))
    if p.ratelimit:
        ctx.w.string("ratelimit", f"threadr:ratelimit:{ip}", str(_rint(rng, 1, 10)), _rint(rng, MIN_TTL, HOUR))


def _write_threads(ctx: _Ctx, p: _Plan, user_id: str, user_created: datetime) -> None:
    if not p.n_threads:
        return
    rng, now, w = ctx.rng, ctx.now, ctx.w
    threads: list[tuple[datetime, str]] = []
    for _ in range(p.n_threads):
        thread_id = _uuid4(rng)
        created = _between(rng, max(user_created, now - timedelta(days=360)), now)
        updated = _between(rng, created, now)
        doc = _thread_doc(rng, thread_id, user_id, created, updated, p.iso)
        w.json_doc("thread", f"threadr:thread:{thread_id}", doc, _ttl_left(ctx, 365 * DAY, updated))
        posted = _between(rng, created, min(created + timedelta(hours=6), now))
        refreshed = _between(rng, max(posted, now - timedelta(days=89)), now)
        w.json_doc("thread_analytics", f"analytics:{user_id}:thread:{thread_id}",
                   _analytics_doc(rng, doc, posted, refreshed), _ttl_left(ctx, 90 * DAY, refreshed))
        threads.append((created, thread_id))
        ctx.threads += 1
        if now - created < timedelta(days=7):
            day = created.isoformat()[:10]
            ctx.threads_by_day[day] = ctx.threads_by_day.get(day, 0) + 1
    threads.sort(reverse=True)
    w.json_doc("user_threads", f"threadr:user_threads:{user_id}", [tid for _, tid in threads],
               365 * DAY - _rint(rng, 0, 30 * DAY))
    deleted = _weighted(rng, (0, 1, 2), (80, 95, 100))
    stats = {"created": len(threads) + deleted, "viewed": _rint(rng, 0, 100), "updated": _rint(rng, 0, 10),
             "deleted": deleted, "copied": _rint(rng, 0, 30)}
    w.json_doc("thread_stats", f"threadr:thread_stats:{user_id}", stats, _rint(rng, DAY, 30 * DAY))
    w.zadd("analytics_threads", f"analytics:{user_id}:threads", {tid: _epoch(at) for at, tid in threads}, None)
    if p.timeseries:
        period = "MetricPeriod.DAY" if p.period_enum else "day"  # str() of the enum leaked into keys
        for metric in _pick(rng, _METRIC_SETS):
            w.zadd("analytics_timeseries", f"analytics:{user_id}:timeseries:{metric}:{period}",
                   _timeseries_members(ctx, metric), None)


def _write_premium(ctx: _Ctx, p: _Plan, email: str, ip: str) -> None:
    if not p.premium:
        return
    rng = ctx.rng
    days = 30 if _chance(rng, 0.8) else 365
    if p.grant_expired:
        # Past expires_at but inside the 7-day key buffer, so the key is still alive.
        granted = _ago(ctx, days * DAY + HOUR, (days + 7) * DAY - HOUR)
    else:
        granted = _ago(ctx, 60, days * DAY - HOUR)
    # the webhook grants to no ip (its key is ip:None), dual_write's email grants to 0.0.0.0, the
    # admin API to the caller's address
    grant_ip = {"client": ip, "zero": "0.0.0.0", "none": None}[p.grant_ip]
    kind = "manual" if p.premium == "manual" else "stripe" if p.grant_ip == "none" else "api"
    value = json.dumps(_grant_doc(rng, kind, email, grant_ip, granted, days))
    ttl = _ttl_left(ctx, (days + 7) * DAY, granted)
    # One purchase, both keys, the same bytes: as the app wrote them.
    ctx.w.string("premium_ip", f"threadr:premium:ip:{grant_ip}", value, ttl, shared=p.grant_ip != "client")
    ctx.w.string("premium_email", f"threadr:premium:email:{email}", value, ttl)
    month = granted.isoformat()[:7]
    ctx.grants_by_month[month] = ctx.grants_by_month.get(month, 0) + 1


def _write_subscription(ctx: _Ctx, p: _Plan, user_id: str, email: str) -> bool:
    """Returns whether the subscription grants premium now (for the user's role)."""
    if not p.subscription:
        return False
    doc, ttl = _subscription_doc(ctx, p.sub_status)
    owners = [user_id if p.subscription == "user_id" else email, *([email] if p.sub_both_keys else [])]
    for owner in owners:
        ctx.w.json_doc("subscription", f"threadr:subscription:user:{owner}", doc, ttl)
    # create_user_subscription adds the customer to the set whatever the status
    ctx.w.sadd("subscriptions_active", "threadr:subscriptions:active", owners, None, shared=True)
    return doc["status"] in ("active", "trialing")


def _write_newsletter(ctx: _Ctx, email: str, ip: str, iso: bool) -> None:
    subscribed = _ago(ctx, 60, 700 * DAY)
    ctx.w.json_doc("newsletter", f"threadr:email:{email}", _newsletter_doc(ctx.rng, email, ip, subscribed, iso),
                   _ttl_left(ctx, 730 * DAY, subscribed))
    ctx.w.sadd("newsletter_list", "threadr:emails:list", [email], 730 * DAY, shared=True)


def _write_account(ctx: _Ctx, p: _Plan, user_id: str, email: str, ip: str, role: str) -> datetime:
    """User document, email index, session and failed logins; returns the user's created_at."""
    rng, now, w = ctx.rng, ctx.now, ctx.w
    created = _ago(ctx, HOUR, 700 * DAY)
    updated = _between(rng, max(created, now - timedelta(days=300)), now)
    doc = _user_doc(ctx, user_id, email, role, ip, created, updated, True)  # User.model_dump_json: ISO, a T
    ttl = _ttl_left(ctx, _pick(rng, (365, 730)) * DAY, updated)
    w.json_doc("user", f"threadr:user:{user_id}", doc, ttl)
    w.string("user_email_index", f"threadr:user:email:{email}", user_id, ttl)  # plain string, not JSON
    if p.session:
        last_activity = _ago(ctx, 0, 59 * 60)
        w.json_doc("session", f"threadr:session:{user_id}", _session_doc(ctx, doc, ip, last_activity, p.iso),
                   _ttl_left(ctx, HOUR, last_activity))
    if p.failed_login:
        attacker = _random_ip(rng, ipv6=p.ipv6 or _chance(rng, 0.5))
        last = _ago(ctx, 0, 80 * 60)
        w.json_doc("failed_login", f"threadr:failed_login:{email}:{attacker}",
                   _failed_login_doc(rng, email, attacker, last, p.iso), _ttl_left(ctx, 90 * 60, last))
    return created


def _write_team(ctx: _Ctx, owner_id: str, iso: bool) -> None:
    """Unmapped keys of a feature that never made it into the spec."""
    rng = ctx.rng
    team_id = _uuid4(rng)
    members = [owner_id] + ["user_" + _token(rng) for _ in range(_rint(rng, 1, 4))]
    ctx.w.hset("unmapped", f"team:{team_id}",
               {"name": f"Team {_pick(rng, _LAST).title()}", "owner_id": owner_id, "plan": "threadr_team",
                "created_at": _fmt(_ago(ctx, DAY, 200 * DAY), iso), "member_count": len(members)}, None)
    ctx.w.sadd("unmapped", f"team:{team_id}:members", members, None)


def _seed_user(ctx: _Ctx, i: int) -> None:
    rng = ctx.rng
    p = _plan_user(rng, i)
    user_id = "user_" + _token(rng)
    typed = _email(rng, i, p.email_style)  # as the person typed it, and as Stripe keeps it
    email = typed.lower()  # registration, subscription and login lower-case it
    ip = _client_ip(rng, i, p.ipv6)
    # The role depends on paid state, so premium keys are written before the user document.
    has_sub = _write_subscription(ctx, p, user_id, typed)
    _write_premium(ctx, p, typed, ip)
    paid = has_sub or (p.premium is not None and not p.grant_expired)
    role = "premium" if paid and _chance(rng, 0.9) else _weighted(rng, _ROLES, _ROLES_CUM)
    created = _write_account(ctx, p, user_id, email, ip, role)
    if i < len(_FORCED):
        ctx.users.append((user_id, email))
    _write_threads(ctx, p, user_id, created)
    _write_usage(ctx, p, ip, email, user_id)
    if p.newsletter:
        _write_newsletter(ctx, email, ip, p.iso)
    if i % 25 == 10:  # a newsletter subscriber who never registered
        _write_newsletter(ctx, _email(rng, i, "plain").replace("@", ".reader@", 1),
                          _random_ip(rng, _chance(rng, 0.3)), p.iso)
    if i % 400 == 0:
        _write_team(ctx, user_id, p.iso)


# ---------------------------------------------------------------- global and hostile keys

def _write_globals(ctx: _Ctx, users: int) -> None:
    rng, w = ctx.rng, ctx.w
    stats: dict[str, int] = {"total_threads": ctx.threads + _rint(rng, 0, 2 * users),  # anonymous runs count too
                             "total_premium_grants": sum(ctx.grants_by_month.values())}
    stats.update({f"threads_{day}": n for day, n in sorted(ctx.threads_by_day.items())})
    stats.update({f"premium_grants_{month}": n for month, n in sorted(ctx.grants_by_month.items())})
    w.hset("usage_stats", "threadr:usage:stats", stats, 365 * DAY - _rint(rng, 0, DAY), shared=True)
    for k in range(2):  # the cache is ephemeral and usually near empty
        url = f"https://example.com/articles/{k}/why-redis?utm_source=x&lang=en"
        w.json_doc("cache_url", f"threadr:cache:url:{url}", _cache_doc(rng, url), _rint(rng, MIN_TTL, DAY),
                   shared=True)
        digest = hashlib.sha256(f"pasted text {k}".encode()).hexdigest()[:16]
        w.json_doc("cache_text", f"threadr:cache:text:{digest}", _cache_doc(rng, None), _rint(rng, MIN_TTL, DAY),
                   shared=True)
    w.string("unmapped", "legacy:flag", "1", None, shared=True)
    w.hset("unmapped", "threadr:feature_flags", {"new_editor": "on", "beta_analytics": "off"}, None, shared=True)


# The edge cases below leave these dangling references, per pattern: stale index members are
# the app's design (it adds members and rarely removes them), the rest its races and half-done writes.
DANGLING = {"subscriptions_active": 1, "user": 1, "user_email_index": 1, "thread": 1, "user_threads": 1,
            "analytics_threads": 1, "newsletter": 2, "newsletter_list": 1}
# A saved thread this long is over the 4 MiB cap earlier versions refused values at.
LARGE_THREAD_CHARS = 4_500_000


def _write_edge_cases(ctx: _Ctx) -> None:
    """Shapes Threadr's own code (and its scripts) write, once each, so that every run of the test
    suite proves them: docs/threadr-mapping.md says which code writes each."""
    rng, w, now = ctx.rng, ctx.w, ctx.now
    granted = now - timedelta(days=3)
    # two admin API grants reusing one payment_reference (free text): two records, not one
    for email, ip in (("ann.collide@example.com", "203.0.113.50"), ("bob.collide@example.com", "203.0.113.51")):
        doc = _grant_doc(rng, "api", email, ip, granted, 30)
        doc["payment_info"]["payment_reference"] = "ORDER-1001"
        w.string("premium_ip", f"threadr:premium:ip:{ip}", json.dumps(doc), 37 * DAY)
        w.string("premium_email", f"threadr:premium:email:{email}", json.dumps(doc), 37 * DAY)
    # pasted from show_redis_commands.py: compact JSON, no client_ip at all, its ip key 127.0.0.1
    manual = _grant_doc(rng, "manual", "support@example.com", None, granted, 365)
    del manual["client_ip"]
    w.string("premium_ip", "threadr:premium:ip:127.0.0.1", json.dumps(manual, separators=(",", ":")), 372 * DAY)
    w.string("premium_email", "threadr:premium:email:support@example.com", json.dumps(manual, separators=(",", ":")),
             372 * DAY)
    # the webhook for a Stripe customer without an email: the key says None
    orphan_sub, ttl = _subscription_doc(ctx, "active")
    w.json_doc("subscription", "threadr:subscription:user:None", orphan_sub, ttl)
    # dual_write_service's grant_subscription_access: its own id, periods with microseconds, a `source`
    owner = ctx.users[5][0]
    start = now - timedelta(days=2)
    w.json_doc("subscription", f"threadr:subscription:user:{owner}", {
        "subscription_id": f"dual_write_{owner}_{_epoch(start)}", "plan_name": "premium", "status": "active",
        "current_period_start": str(start), "current_period_end": str(start + timedelta(days=30)), "tier_level": 2,
        "thread_limit": -1, "features": ["unlimited_threads"], "source": "dual_write"}, 35 * DAY)
    w.sadd("subscriptions_active", "threadr:subscriptions:active", ["None", owner, "user_gone_long_ago"], None,
           shared=True)  # the last one: a member outliving its record
    # a user of the app's PostgreSQL fallback (a UUID id), two registrations that raced for one
    # email (the index names the second), and an index entry whose user is gone
    uuid_user = _uuid4(rng)
    created = now - timedelta(days=40)
    for user_id, email in ((uuid_user, "fallback.user@example.com"), ("user_" + _token(rng), "twin@example.com"),
                           ("user_" + _token(rng), "twin@example.com")):
        w.json_doc("user", f"threadr:user:{user_id}",
                   _user_doc(ctx, user_id, email, "user", "unknown", created, now - timedelta(days=1), True), 730 * DAY)
        w.string("user_email_index", f"threadr:user:email:{email}", user_id, 730 * DAY, shared=True)
    w.string("user_email_index", "threadr:user:email:ghost@example.com", "user_" + _token(rng), 730 * DAY)
    _write_counters(ctx, "user", uuid_user)
    for ip in ("unknown", "not an ip"):  # X-Forwarded-For is whatever the client sent
        _write_counters(ctx, "ip", ip)
    at = now - timedelta(hours=2)
    w.json_doc("usage_log", f"threadr:usage:log:unknown:{_epoch(at)}", _usage_log_doc(at, "unknown", None), 7 * DAY)
    # a user's threads: a 200-character title, a large one, one its list misses, one the list
    # names that is gone, and one the SavedThread model refuses (a tweet over 280 characters)
    user_id = "user_" + _token(rng)
    w.json_doc("user", f"threadr:user:{user_id}",
               _user_doc(ctx, user_id, "writer@example.com", "premium", "unknown", created, now, True), 730 * DAY)
    w.string("user_email_index", "threadr:user:email:writer@example.com", user_id, 730 * DAY)
    ids = [_uuid4(rng) for _ in range(5)]
    docs = [_thread_doc(rng, tid, user_id, now - timedelta(days=k + 1), now - timedelta(days=k), False)
            for k, tid in enumerate(ids)]
    docs[0]["title"] = ("Two hundred characters: " + "x" * 200)[:200]
    docs[1]["original_content"] = ("Ünïcödé 🚀 " + "An article pasted whole, long. " * LARGE_THREAD_CHARS)[:LARGE_THREAD_CHARS]
    docs[4]["tweets"][0]["content"] = "y" * 281
    for k in (0, 1, 2):
        w.json_doc("thread", f"threadr:thread:{ids[k]}", docs[k], 365 * DAY)
    w.json_doc("refused", f"threadr:thread:{ids[4]}", docs[4], 365 * DAY)
    w.json_doc("user_threads", f"threadr:user_threads:{user_id}", [ids[0], ids[1], ids[3], ids[4]], 365 * DAY)
    analytics = _analytics_doc(rng, docs[0], now - timedelta(days=1), now)
    w.json_doc("thread_analytics", f"analytics:{user_id}:thread:{ids[0]}", analytics, 90 * DAY)
    posted = {**analytics, "thread_id": "ext:thread:42", "created_at": "2026-01-02T03:04:05+00:00",
              "posted_at": "2026-01-02T03:04:05+00:00", "optimal_length": None}  # posted by a client
    w.json_doc("thread_analytics", f"analytics:{user_id}:thread:ext:thread:42", posted, 90 * DAY)
    w.zadd("analytics_threads", f"analytics:{user_id}:threads",
           {ids[0]: _epoch(now), "ext:thread:42": _epoch(now), ids[3]: _epoch(now)}, None)
    # newsletter records a script wrote: dual_write's (a user_id and more, not in the list) and a
    # case variant of an address; and a list member whose record is gone
    w.json_doc("newsletter", "threadr:email:dual.writer@example.com", {
        "user_id": _uuid4(rng), "subscribed_at": granted.isoformat(), "source": "dual_write",
        "email": "dual.writer@example.com", "plan": "free"}, 730 * DAY)
    w.json_doc("newsletter", "threadr:email:Dana@Example.com", _newsletter_doc(rng, "Dana@Example.com", "unknown", granted,
                                                                               True), 730 * DAY)
    w.sadd("newsletter_list", "threadr:emails:list", ["gone.reader@example.com"], 730 * DAY, shared=True)
    # failed logins are recorded for accounts that do not exist too
    w.json_doc("failed_login", "threadr:failed_login:nobody@example.com:2001:db8::dead",
               _failed_login_doc(rng, "nobody@example.com", "2001:db8::dead", now, True), 90 * 60)
    w.string("unmapped", "legacy:line\nbreak", "1", None)  # a control character in a key name


def _write_malformed(ctx: _Ctx, count: int) -> None:
    """Hostile values under mapped patterns. Key names never collide with realistic ones: user
    IPv6 addresses have one group between db8 and ::, these have two."""
    rng, w, today = ctx.rng, ctx.w, ctx.now.isoformat()[:10]
    for k in range(count):
        kind = k % 7
        if kind == 0:
            key = _pick(rng, ("threadr:user:", "threadr:subscription:user:")) + "user_" + _token(rng)
            w.string("malformed", key, '{"email": "x@', None)
        elif kind == 1:
            w.hset("malformed", "threadr:user:user_" + _token(rng), {"email": "hash@example.com"}, None)
        elif kind == 2:
            w.rpush("malformed", f"threadr:thread:{_uuid4(rng)}", ["not", "a", "thread"], None)
        elif kind == 3:
            w.string("malformed", f"threadr:email:bad{k}@example.net", b"\xff\xfe\x00bad", None)
        elif kind == 4:
            w.string("malformed", f"threadr:premium:ip:2001:db8:dead:beef::{k + 1:x}", "[1, 2]", None)
        elif kind == 5:
            w.string("malformed", f"threadr:usage:ip:2001:db8:dead:beef::{k + 1:x}:daily:{today}", "abc", DAY)
        else:  # an index of the wrong type: a set where the app keeps a JSON array
            w.sadd("malformed", "threadr:user_threads:user_" + _token(rng), [_uuid4(rng)], None)


def seed_demo(r: "redis.Redis", users: int, *, seed: int = 42, now: datetime | None = None,
              malformed: int = 0) -> dict[str, int]:
    """Write a realistic Threadr keyspace for `users` registered users; return keys written per pattern name.

    The same seed and `now` write the same keys and values. Counts are keys that exist when the
    call returns (every TTL is at least MIN_TTL); `malformed` hostile keys are counted under
    "malformed" only, not under the pattern their name matches.
    """
    if users < 0 or malformed < 0:
        raise ValueError("users and malformed must be >= 0")
    if now is None:
        now = datetime.now(timezone.utc).replace(tzinfo=None)  # == utcnow(), naive like the app
    elif now.tzinfo is not None:
        now = now.astimezone(timezone.utc).replace(tzinfo=None)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    ctx = _Ctx(rng=random.Random(seed), w=_Writer(r), now=now, midnight=midnight)
    for i in range(users):
        _seed_user(ctx, i)
    if users:
        _write_globals(ctx, users)
    if users >= len(_FORCED):
        _write_edge_cases(ctx)
    _write_malformed(ctx, malformed)
    ctx.w.flush()
    counts = dict(ctx.w.counts)
    for extra in ("malformed", "refused"):
        if not counts[extra]:
            del counts[extra]
    return counts


HUGE_VALUE_BYTES = 5 * 1024 * 1024
# Members of the hostile keyspace's large time series, and counters added to its stats hash.
WIDE_MEMBERS = 1_000_000
# A saved thread the app would write for an article pasted whole: valid, and migrated whole.
GIANT_THREAD_BYTES = 64 * 1024 * 1024


def write_large_thread(r: "redis.Redis", size: int, *, seed: int = 7) -> str:
    """One valid saved thread of about `size` bytes (its original_content an article pasted
    whole), as SavedThread writes it; returns its key."""
    rng, now = random.Random(seed), datetime.now(timezone.utc).replace(tzinfo=None)
    doc = _thread_doc(rng, _uuid4(rng), "user_giant", now - timedelta(days=1), now, False)
    doc["original_content"] = "An article pasted whole, long. " * (size // 31)
    key = f"threadr:thread:{doc['id']}"
    r.set(key, json.dumps(doc))
    return key


def write_large_timeseries(r: "redis.Redis", members: int, *, user: str = "user_wide", refused_last: bool = False) -> str:
    """One time series of `members` valid points, one a second from 2026-01-01, each as the app
    writes one (TimeSeriesDataPoint.json(), compact, scored by its epoch); with `refused_last`, one
    point more, the latest, without a value: its model refuses it, and with it the whole key.
    Returns its key."""
    key, start = f"analytics:{user}:timeseries:impressions:day", datetime(2026, 1, 1)
    points = {}
    for i in range(members + refused_last):
        at = start + timedelta(seconds=i)
        point = {"timestamp": at.isoformat(), "value": float(i % 5000), "period": "day"}
        if i == members:
            del point["value"]
        points[json.dumps(point, separators=(",", ":"))] = _epoch(at)
        if len(points) == FLUSH_EVERY or i == members + refused_last - 1:
            r.zadd(key, points)
            points = {}
    return key


def add_usage_stats(r: "redis.Redis", counters: int) -> None:
    """`counters` more integer fields in the app's global stats hash (threadr:usage:stats)."""
    for start in range(0, counters, FLUSH_EVERY):
        r.hset("threadr:usage:stats", mapping={f"counter_{i:07d}": i for i in range(start, min(counters, start + FLUSH_EVERY))})


def seed_hostile(r: "redis.Redis", good_keys: int, *, seed: int = 7, wide: int = WIDE_MEMBERS) -> dict[str, int]:
    """On top of a keyspace of `good_keys` keys (its stats hash among them): 5 % more malformed
    keys of every kind, three broken values of 5 MB, a valid thread of 64 MiB, a time series of
    `wide` valid points and a last one its model refuses (the key is one dead letter, none of its
    rows kept), and `wide` more counters in the stats hash (`wide` rows more). Returns the keys
    written per kind."""
    counts = seed_demo(r, 0, malformed=int(good_keys * 0.05), seed=seed)
    for i in range(3):
        r.set(f"threadr:user:user_huge{i}", b'{"email": "h@x.io", "pad": "' + b"x" * HUGE_VALUE_BYTES + b'"}')
    write_large_thread(r, GIANT_THREAD_BYTES, seed=seed)
    write_large_timeseries(r, wide, refused_last=True)
    add_usage_stats(r, wide)
    return {**counts, "huge": 3, "giant": 1, "wide": 1}
