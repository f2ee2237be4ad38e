-- What the progress display counts of a verification (migrator/views/progress.py): every key a range's SCAN
-- returned, written while the range runs (its own transaction is not visible until it commits), so
-- `migrator verify` shows progress within a long range.
ALTER TABLE migration_verify_ranges ADD COLUMN IF NOT EXISTS keys_walked bigint NOT NULL DEFAULT 0;
