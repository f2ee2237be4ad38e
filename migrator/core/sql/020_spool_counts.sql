-- A spool chunk's keys per pattern (migrator/core/spool.py), counted as the first priority's batch
-- spools them: a sealed, count-only validation of a priority sums its chunks' counts instead of
-- reading and classifying every key again. NULL in a chunk spooled before this column: its range
-- is walked key by key.
ALTER TABLE migration_spool ADD COLUMN IF NOT EXISTS counts jsonb;
