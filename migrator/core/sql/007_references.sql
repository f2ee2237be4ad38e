-- Per batch and pattern, a few of the references its keys made that dangle (an index entry whose
-- record is not there, a record its index does not list); their counts are in pattern_counts.
ALTER TABLE migration_batches ADD COLUMN IF NOT EXISTS dangling jsonb NOT NULL DEFAULT '{}';
