"""Threadr's addition to the audit: the premium summary and the guide's premium-users stop rule.

Read in the audit's own pass from the values of critical JSON strings (premium grants and
Stripe subscriptions); registered on the mapping as `Hooks(audit=(PremiumTally,))`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from migrator.core import jsoncodec
from migrator.core.mapping import BadRecord, Mapping, Pattern, Priority
from migrator.core.values import parse_dt

# Fields of a critical value that make it a time-limited grant or a subscription.
GRANT_EXPIRY = "expires_at"
PURCHASE_REFERENCE = ("payment_info", "payment_reference")
SUBSCRIPTION_STATUS = "status"
SUBSCRIPTION_PERIOD_END = "current_period_end"
ACTIVE_STATUSES = frozenset({"active", "trialing"})

# The migration guide's stop condition: past this, migrate in stages.
PREMIUM_USERS_LIMIT = 50_000


def premium_patterns(mapping: Mapping) -> list[Pattern]:
    """Patterns whose values the premium summary reads: migrated critical JSON strings."""
    return [p for p in mapping.patterns
            if p.migrated and p.priority == Priority.CRITICAL and p.redis_type == "string" and p.value_format == "json"]


@dataclass
class PremiumTally:
    """Grants (values with an expiry) and subscriptions (values with a status) among critical values.

    Premium users = distinct active purchases (the ip and the email key of one purchase hold the
    same payment reference) + active grants without a reference (counted per key) + active
    subscriptions.
    """

    mapping: Mapping
    name: str = "premium"
    grants_active: int = 0  # keys, as the app read them: each grants access on its own
    grants_expired: int = 0
    unparseable: int = 0
    unreferenced_active: int = 0
    subscriptions_active: int = 0
    subscriptions_inactive: int = 0
    purchases: set[str] = field(default_factory=set)
    active_purchases: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.names = {p.name for p in premium_patterns(self.mapping)}

    def reads(self, pattern: Pattern) -> bool:
        return pattern.name in self.names

    def add(self, pattern: Pattern, raw: bytes | str, now: datetime) -> None:
        try:
            value = jsoncodec.loads(raw)
            if not isinstance(value, dict):
                raise BadRecord("not a JSON object")
            if GRANT_EXPIRY in value:
                self._grant(value, now)
            elif SUBSCRIPTION_STATUS in value:
                self._subscription(value, now)
            else:
                raise BadRecord("neither a grant nor a subscription")
        except (ValueError, OverflowError, OSError):  # BadRecord and JSON errors are ValueErrors; huge epochs overflow
            self.unparseable += 1

    def _grant(self, value: dict[str, Any], now: datetime) -> None:
        expires = parse_dt(value[GRANT_EXPIRY], timezone.utc, field=GRANT_EXPIRY)
        if expires is None:
            raise BadRecord(f"{GRANT_EXPIRY} is empty")
        active = expires > now
        info = value.get(PURCHASE_REFERENCE[0])
        reference = info.get(PURCHASE_REFERENCE[1]) if isinstance(info, dict) else None
        if active:
            self.grants_active += 1
        else:
            self.grants_expired += 1
        if reference is None:
            self.unreferenced_active += active
            return
        self.purchases.add(str(reference))
        if active:
            self.active_purchases.add(str(reference))

    def _subscription(self, value: dict[str, Any], now: datetime) -> None:
        end = parse_dt(value.get(SUBSCRIPTION_PERIOD_END), timezone.utc, field=SUBSCRIPTION_PERIOD_END)
        status = value[SUBSCRIPTION_STATUS]
        if isinstance(status, str) and status in ACTIVE_STATUSES and (end is None or end > now):
            self.subscriptions_active += 1
        else:
            self.subscriptions_inactive += 1

    def premium_users(self) -> int:
        return len(self.active_purchases) + self.unreferenced_active + self.subscriptions_active

    def stop_conditions(self) -> list[str]:
        users = self.premium_users()
        if users > PREMIUM_USERS_LIMIT:
            return [f"{users:,} premium users (over {PREMIUM_USERS_LIMIT:,}): "
                    "consider a staged migration (--priority critical first)"]
        return []

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "grants_active": self.grants_active,
            "grants_expired": self.grants_expired,
            "unparseable": self.unparseable,
            "distinct_purchases": len(self.purchases),
            "active_purchases": len(self.active_purchases),
            "unreferenced_active_grants": self.unreferenced_active,
            "subscriptions_active": self.subscriptions_active,
            "subscriptions_inactive": self.subscriptions_inactive,
            "premium_users": self.premium_users(),
            "patterns": sorted(self.names),
        }
        out["summary"] = (
            f"premium ({', '.join(out['patterns']) or 'no critical JSON patterns'}): "
            f"{self.grants_active:,} active and {self.grants_expired:,} expired grant keys, "
            f"{len(self.purchases):,} distinct purchases ({len(self.active_purchases):,} active), "
            f"{self.subscriptions_active:,} active subscriptions, {self.unparseable:,} unparseable; "
            f"premium users {self.premium_users():,}")
        return out
