-- The fence between a bulk run and a live `migrator follow` session (merge.SYNCED_AT): a row follow
-- deleted carries no mark, so its id is kept here with when follow deleted it (after it read the key
-- gone). A bulk batch that began before then does not insert that row again from its older read.
-- A key follow read and found giving no row of a table (gone, or its value gives none there) is kept
-- as a whole: row_id is then the nil uuid (ledger.WHOLE_KEY), and the batch inserts no row of that key
-- there (follow had none to delete: the batch's write would be the first).
-- One entry per row (or key), the latest; a rollback of the session takes its entries back, and a
-- follow session forgets those older than every running batch (ledger.record_follow_figures).
CREATE TABLE IF NOT EXISTS migration_retired (
    table_name  text NOT NULL,
    source_key  text NOT NULL,                  -- the key whose row it was
    row_id      uuid NOT NULL,
    run_id      uuid NOT NULL REFERENCES migration_runs (id) ON DELETE CASCADE,
    retired_at  timestamptz NOT NULL,
    PRIMARY KEY (table_name, source_key, row_id)
);
CREATE INDEX IF NOT EXISTS migration_retired_run_idx ON migration_retired (run_id);
-- (a batch's statement asks first whether follow deleted any row of its table since it began)
CREATE INDEX IF NOT EXISTS migration_retired_at_idx ON migration_retired (table_name, retired_at);
-- (the roles' grants: migrator_grant_roles(), 009_roles.sql)
