-- The mapping a run was made with: how it was named (an installed name, module:attribute, a file)
-- and a digest of its declaration (migrator/core/registry.py). Later commands and workers load that
-- mapping and refuse one whose digest differs.
ALTER TABLE migration_runs ADD COLUMN IF NOT EXISTS mapping_spec text;
ALTER TABLE migration_runs ADD COLUMN IF NOT EXISTS mapping_digest text;
