-- A queued secondary write keeps when its key expires, not its TTL (migrator/cutover/dualwrite.py):
-- repaired later, the key expires when the app's write said, not a TTL after the repair, and one
-- whose time is up by then is not made again. Rows queued before this keep their TTL, counted from
-- when they were queued.
ALTER TABLE dual_write_repairs ADD COLUMN IF NOT EXISTS expires_at timestamptz;
