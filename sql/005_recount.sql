-- Per pattern, the keys of the priority before a batch's own that its SCAN pass counted again:
-- that priority's fresh source count, taken without a pass of its own (migrator/validate.py).
ALTER TABLE migration_batches ADD COLUMN IF NOT EXISTS recount jsonb;
