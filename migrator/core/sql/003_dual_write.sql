-- Secondary writes of the dual-write service that failed, kept for `repair()` (migrator/cutover/dualwrite.py).
-- A failed write to PostgreSQL waits in Redis instead (PostgreSQL was the one failing).
CREATE TABLE IF NOT EXISTS dual_write_repairs (
    id          bigserial PRIMARY KEY,
    store       text NOT NULL CHECK (store IN ('redis', 'postgres')),
    redis_key   text NOT NULL,
    raw_value   bytea,                 -- NULL: the key was deleted
    ttl_s       integer,
    error       text NOT NULL,
    attempts    integer NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    repaired_at timestamptz
);

-- The write strategy the app's dual-write services follow, switched by `migrator cutover`.
CREATE TABLE IF NOT EXISTS dual_write_settings (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),   -- one row
    strategy    text NOT NULL CHECK (strategy IN ('redis_only', 'dual_write', 'postgres_primary', 'postgres_only')),
    changed_at  timestamptz NOT NULL DEFAULT now(),
    reason      text
);

-- Shadow reads: a sample of the app's reads answered by both stores and compared.
CREATE TABLE IF NOT EXISTS dual_write_shadow_reads (
    id          bigserial PRIMARY KEY,
    operation   text NOT NULL,
    matched     boolean NOT NULL,
    redis_answer    jsonb,
    postgres_answer jsonb,
    identifier  text,                                          -- kept in PostgreSQL only, never logged
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS dual_write_shadow_reads_op_idx ON dual_write_shadow_reads (operation, created_at);
