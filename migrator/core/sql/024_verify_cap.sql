-- A verification's own cap on the keys per second it scans or reads in Redis (`migrator verify
-- --max-keys-per-sec`), with a token bucket of its own; NULL: the run's cap and bucket; 0: none.
ALTER TABLE migration_verifications ADD COLUMN IF NOT EXISTS max_keys_per_sec integer;
