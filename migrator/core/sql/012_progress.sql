-- What the progress display counts (migrator/views/progress.py): every key a batch's SCAN returned, written
-- by its heartbeat while it runs (so progress moves within a long range) and at its commit; and the
-- keyspace's size when the run was planned, the estimate each priority's pass walks.
ALTER TABLE migration_runs ADD COLUMN IF NOT EXISTS keys_planned bigint;
ALTER TABLE migration_batches ADD COLUMN IF NOT EXISTS keys_walked bigint NOT NULL DEFAULT 0;
