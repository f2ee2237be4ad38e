"""A small online shop's keyspace, as its own code would write it: the second application the
migrator is tried on end to end, with a mapping that is a file (mapping.toml beside this).

    shop:product:<sku>               hash    name, price_cents, currency, stock, updated_at (epoch)
    shop:cart:<session>              string  JSON {customer, items: [{sku, qty}], updated_at}, TTL 2 days
    shop:order:<order_id>            string  JSON {customer, status, total_cents, items, created_at}
    shop:views:<sku>                 string  an integer counter
    shop:bestsellers                 zset    sku -> units sold
    shop:recent:<customer>           list    skus the customer looked at, newest first
    shop:customer:<customer>:orders  set     the customer's order ids (an index)
    shop:events                      stream  {type, sku, customer} per event, ids kept
"""
from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

STATUSES = ("pending", "paid", "shipped", "delivered", "refunded")
NAMES = ("Mug", "T-shirt", "Poster", "Notebook", "Sticker pack", "Hoodie", "Cap", "Tote bag")


def seed_shop(r: "redis.Redis", customers: int = 100, *, malformed: int = 0, seed: int = 7,
              now: datetime | None = None) -> dict[str, int]:
    """Write the shop of `customers` customers into `r`; the keys written per kind. `malformed` more
    keys are values the mapping refuses (counted under "malformed" alone): its demo seeder (the
    hook `migrator seed-demo` calls as seed(client, count, malformed=N))."""
    if customers < 0 or malformed < 0:
        raise ValueError("customers and malformed must be >= 0")
    rng = random.Random(seed)
    now = now or datetime.now(timezone.utc)
    counts = dict.fromkeys(("product", "cart", "order", "views", "bestsellers", "recent", "customer_orders",
                            "events"), 0)
    pipe = r.pipeline(transaction=False)
    skus = [f"SKU-{n:05d}" for n in range(max(8, customers // 4))]
    for n, sku in enumerate(skus):
        pipe.hset(f"shop:product:{sku}", mapping={
            "name": f"{NAMES[n % len(NAMES)]} #{n}", "price_cents": rng.randint(300, 9_900), "currency": "EUR",
            "stock": rng.randint(0, 500), "updated_at": int((now - timedelta(days=rng.randint(0, 90))).timestamp())})
        pipe.set(f"shop:views:{sku}", rng.randint(0, 10_000))
        counts["product"] += 1
        counts["views"] += 1
    pipe.zadd("shop:bestsellers", {sku: rng.randint(0, 1_000) for sku in skus})
    counts["bestsellers"] += 1
    for c in range(customers):
        customer = f"cust-{c:06d}"
        orders = []
        for o in range(rng.randint(0, 3)):
            order_id = f"{c:06d}-{o}"
            items = [{"sku": rng.choice(skus), "qty": rng.randint(1, 3)} for _ in range(rng.randint(1, 4))]
            pipe.set(f"shop:order:{order_id}", json.dumps({
                "customer": customer, "status": rng.choice(STATUSES), "total_cents": rng.randint(500, 50_000),
                "items": items, "created_at": (now - timedelta(days=rng.randint(0, 365))).isoformat()}))
            orders.append(order_id)
            counts["order"] += 1
        if orders:
            pipe.sadd(f"shop:customer:{customer}:orders", *orders)
            counts["customer_orders"] += 1
        if rng.random() < 0.3:
            pipe.set(f"shop:cart:sess-{c:06d}", json.dumps({
                "customer": customer, "items": [{"sku": rng.choice(skus), "qty": 1}],
                "updated_at": now.isoformat()}), ex=2 * 86_400)
            counts["cart"] += 1
        looked = rng.sample(skus, k=min(len(skus), rng.randint(1, 5)))
        pipe.rpush(f"shop:recent:{customer}", *looked)
        counts["recent"] += 1
    pipe.execute()
    for _ in range(customers * 2):
        r.xadd("shop:events", {"type": rng.choice(("view", "add_to_cart", "purchase")), "sku": rng.choice(skus),
                               "customer": f"cust-{rng.randrange(customers):06d}"})
    counts["events"] += 1
    if malformed:
        counts["malformed"] = write_malformed(r, malformed)
    return counts


# Values a mapping of this shop must refuse, one kind after another: each a dead letter, not a row.
MALFORMED = (
    ("shop:order:bad-{n}", "string", b'{"customer": "cust-x", "status": '),       # JSON cut short
    ("shop:order:nocustomer-{n}", "string", b'{"status": "paid", "total_cents": 1}'),  # required customer missing
    ("shop:views:BAD-{n}", "string", b"lots"),                                      # a counter that is no integer
    ("shop:product:BAD-{n}", "hash", {b"name": b"Mug", b"price_cents": b"cheap"}),  # a price that is no number
    ("shop:cart:bad-{n}", "string", b'{"customer": "\xff\xfe"}'),                  # not UTF-8
    ("shop:product:WRONG-{n}", "string", b"a product as a string"),                 # the wrong Redis type
)


def write_malformed(r: "redis.Redis", n: int) -> int:
    """`n` malformed keys, of the kinds of MALFORMED in turn; how many were written."""
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        key, kind, value = MALFORMED[i % len(MALFORMED)]
        key = key.format(n=i)
        if kind == "hash":
            pipe.hset(key, mapping=value)
        else:
            pipe.set(key, value)
    pipe.execute()
    return n
