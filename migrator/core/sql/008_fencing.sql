-- A run's one state machine (migrator/core/runstate.py) and its fence: `fence` moves whenever the run
-- leaves or re-enters `running`, and work begun under an older fence never commits.
ALTER TABLE migration_runs DROP CONSTRAINT IF EXISTS migration_runs_status_check;
ALTER TABLE migration_runs ADD CONSTRAINT migration_runs_status_check CHECK (status IN
    ('planned', 'running', 'cancelling', 'cancelled', 'completed', 'failed', 'rolling_back', 'rolled_back',
     'rollback_failed', 'dry_run'));
ALTER TABLE migration_runs ADD COLUMN IF NOT EXISTS fence bigint NOT NULL DEFAULT 1;

-- A batch's lease (migrator/core/lease.py): who runs it, and when it last said so. A running batch
-- whose heartbeat stopped is stale: its worker died, or is cut off, and another may take it over
-- (its attempt number moves on, and the first one's commit is refused).
ALTER TABLE migration_batches ADD COLUMN IF NOT EXISTS heartbeat_at timestamptz;
ALTER TABLE migration_batches ADD COLUMN IF NOT EXISTS worker text;
-- The Celery task last sent for it, so that `migrator cancel` can revoke it while it is queued.
ALTER TABLE migration_batches ADD COLUMN IF NOT EXISTS task_id text;

-- How many times a priority's batches were sent to the workers (migrator/workers/tasks.py): each
-- chord's callbacks carry the number they were sent with, and only the latest one goes on, so a
-- chord that a `resume` or `requeue` replaced (its stale batch was taken over) ends quietly.
ALTER TABLE migration_runs ADD COLUMN IF NOT EXISTS dispatch bigint NOT NULL DEFAULT 0;

-- One dead letter per key and run, whatever the key's length: by a digest of the key's bytes (a
-- half-megabyte key name is past what a btree index row may hold, and failed its whole batch).
ALTER TABLE migration_dead_letters DROP CONSTRAINT IF EXISTS migration_dead_letters_run_id_redis_key_key;
CREATE UNIQUE INDEX IF NOT EXISTS migration_dead_letters_run_key ON migration_dead_letters (run_id, sha256(redis_key));
