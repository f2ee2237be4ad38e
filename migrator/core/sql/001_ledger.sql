-- The run ledger: PostgreSQL is the system of record for every run (Flower and the result
-- backend are only views). Idempotent: loads inside one transaction and again on top of itself.

CREATE TABLE IF NOT EXISTS schema_migrations (
    version     text PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS migration_runs (
    id            uuid PRIMARY KEY,
    status        text NOT NULL CHECK (status IN
                    ('planned', 'running', 'completed', 'failed', 'rolling_back', 'rolled_back', 'dry_run')),
    mapping       text NOT NULL,
    dry_run       boolean NOT NULL DEFAULT false,
    options       jsonb NOT NULL DEFAULT '{}',
    source        text NOT NULL,            -- Redis URL with any password redacted
    redis_run_id  text,                     -- cursors are only valid on this server process
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz,
    error         text
);

CREATE TABLE IF NOT EXISTS migration_batches (
    id             bigserial PRIMARY KEY,
    run_id         uuid NOT NULL REFERENCES migration_runs (id) ON DELETE CASCADE,
    priority       text NOT NULL CHECK (priority IN ('critical', 'high', 'medium', 'low')),
    node           text NOT NULL DEFAULT '', -- host:port of the cluster master; '' standalone
    range_index    integer NOT NULL,
    range_count    integer NOT NULL,
    range_start    numeric(20, 0) NOT NULL, -- reversed-bit cursor space, [start, end)
    range_end      numeric(20, 0) NOT NULL,
    status         text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts       integer NOT NULL DEFAULT 0,
    keys_scanned   bigint NOT NULL DEFAULT 0,
    keys_migrated  bigint NOT NULL DEFAULT 0,
    keys_skipped   bigint NOT NULL DEFAULT 0,
    keys_dead      bigint NOT NULL DEFAULT 0,
    keys_expired   bigint NOT NULL DEFAULT 0,
    rows_written   bigint NOT NULL DEFAULT 0,
    pattern_counts jsonb NOT NULL DEFAULT '{}',
    checksum       text,
    last_cursor    numeric(20, 0),
    started_at     timestamptz,
    finished_at    timestamptz,
    error          text,
    UNIQUE (run_id, priority, node, range_index)
);

CREATE TABLE IF NOT EXISTS migration_dead_letters (
    id          bigserial PRIMARY KEY,
    run_id      uuid NOT NULL REFERENCES migration_runs (id) ON DELETE CASCADE,
    batch_id    bigint REFERENCES migration_batches (id) ON DELETE CASCADE,
    pattern     text NOT NULL,
    redis_key   bytea NOT NULL,             -- exact key bytes, even when not UTF-8
    key_text    text NOT NULL,              -- printable form for people
    redis_type  text,
    raw_value   bytea,                      -- raw values stay here, never in logs
    ttl_ms      bigint,
    error       text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, redis_key)
);

-- The verdict of each priority: what was checked, and whether the run went on.
CREATE TABLE IF NOT EXISTS migration_validations (
    run_id      uuid NOT NULL REFERENCES migration_runs (id) ON DELETE CASCADE,
    priority    text NOT NULL,
    ok          boolean NOT NULL,
    checks      jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, priority, created_at)
);

-- Prior images of rows a run updated, so a rollback restores them exactly.
CREATE TABLE IF NOT EXISTS migration_journal (
    run_id      uuid NOT NULL,
    table_name  text NOT NULL,
    row_id      uuid NOT NULL,
    old_row     jsonb NOT NULL,
    PRIMARY KEY (run_id, table_name, row_id)
);

-- Legacy ids (user_<token>, emails) to the UUIDs of the rows they name.
CREATE TABLE IF NOT EXISTS legacy_id_map (
    id            uuid PRIMARY KEY,
    legacy_id     text NOT NULL UNIQUE,
    entity        text NOT NULL,
    entity_id     uuid NOT NULL,
    migration_run uuid,
    source_key    text,
    metadata      jsonb NOT NULL DEFAULT '{}',
    expires_at    timestamptz
);
CREATE INDEX IF NOT EXISTS legacy_id_map_entity_idx ON legacy_id_map (entity_id);

-- Journals the first prior image per run of every row a run's statement updates, unless the
-- run itself wrote that row (rollback deletes those). Only sessions that set migrator.run_id
-- (the migrator's own) are journaled: the app's writes are not. `init-db` puts it on every table a
-- mapping writes, legacy_id_map included (migrator/core/schema.py: journal_sql).
CREATE OR REPLACE FUNCTION migrator_journal() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    run text := current_setting('migrator.run_id', true);
BEGIN
    IF run IS NULL OR run = '' THEN
        RETURN NULL;
    END IF;
    INSERT INTO migration_journal (run_id, table_name, row_id, old_row)
    SELECT run::uuid, TG_TABLE_NAME, o.id, to_jsonb(o) FROM old_rows o
    WHERE o.migration_run IS DISTINCT FROM run::uuid
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;
