-- Live sync (`migrator follow`, migrator/execution/follow.py): a follow session is a run of its own kind in
-- migration_runs, so its rows carry its id as their provenance, the journal keeps what it changed
-- and `migrator rollback` undoes it exactly, like any run.
ALTER TABLE migration_runs ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'run';
ALTER TABLE migration_runs DROP CONSTRAINT IF EXISTS migration_runs_kind_check;
ALTER TABLE migration_runs ADD CONSTRAINT migration_runs_kind_check CHECK (kind IN ('run', 'follow'));

-- A follow session's figures, rewritten every second or so by its process: what `status` and
-- `cutover` read. Lag is the age of the oldest change seen and not yet applied.
CREATE TABLE IF NOT EXISTS migration_follow (
    run_id            uuid PRIMARY KEY REFERENCES migration_runs (id) ON DELETE CASCADE,
    mode              text NOT NULL,                  -- local, or celery
    nodes             text[] NOT NULL DEFAULT '{}',   -- the servers it subscribes to
    heartbeat_at      timestamptz NOT NULL DEFAULT now(),
    events            bigint NOT NULL DEFAULT 0,      -- notifications received for keys of the mapping
    keys_applied      bigint NOT NULL DEFAULT 0,      -- keys read and written (a burst on one key is one)
    rows_written      bigint NOT NULL DEFAULT 0,
    rows_retired      bigint NOT NULL DEFAULT 0,      -- deleted or marked by the table's on_delete
    dead              bigint NOT NULL DEFAULT 0,      -- keys that went to the dead letters
    failures          bigint NOT NULL DEFAULT 0,      -- applications that failed (and were retried)
    pending           bigint NOT NULL DEFAULT 0,      -- keys waiting to be applied now
    lag_s             double precision NOT NULL DEFAULT 0,
    events_per_s      double precision NOT NULL DEFAULT 0,
    applied_per_s     double precision NOT NULL DEFAULT 0,
    reconnects        bigint NOT NULL DEFAULT 0,
    error             text
);

-- Each reconciliation: the keyspace compared with its rows by the verification (range by range),
-- and the ranges that still differed once every change received before had been applied,
-- applied again key by key.
CREATE TABLE IF NOT EXISTS migration_reconciliations (
    id                bigserial PRIMARY KEY,
    run_id            uuid NOT NULL REFERENCES migration_runs (id) ON DELETE CASCADE,
    reason            text NOT NULL,                  -- connect, reconnect, interval
    started_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    ranges            integer NOT NULL DEFAULT 0,
    ranges_repaired   integer NOT NULL DEFAULT 0,
    keys_reapplied    bigint NOT NULL DEFAULT 0,
    keys_gone         bigint NOT NULL DEFAULT 0,      -- keys of rows no key gives any more, retired
    clean             boolean,                        -- nothing differed that the events had not brought
    detail            jsonb NOT NULL DEFAULT '{}',    -- per range repaired: what differed
    error             text
);
CREATE INDEX IF NOT EXISTS migration_reconciliations_run_idx ON migration_reconciliations (run_id, id);
-- (the roles' grants on these tables: migrator_grant_roles(), 009_roles.sql)
