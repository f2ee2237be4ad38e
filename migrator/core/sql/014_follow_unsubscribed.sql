-- `migrator follow` on a Redis Cluster subscribes per master, and follows the masters as they change
-- (a failover, a node added): the servers whose keyspace notifications are not being received now,
-- and why (a subscription down and trying again), which `status` shows and `cutover` refuses; NULL
-- when every one is. `nodes` is rewritten with the figures: the masters subscribed to now.
ALTER TABLE migration_follow ADD COLUMN IF NOT EXISTS unsubscribed text;
