-- A journaled row's prior image also as the row's own text (its type's output), from which a rollback
-- restores it exactly: to_jsonb(o) makes one of SQL NULL and a jsonb 'null', and gives a json column
-- back reordered and without its duplicate keys (migrator/core/ledger.py: RESTORE_CHANGED). An image
-- journaled before this has no text: it is restored from old_row, as it was.
ALTER TABLE migration_journal ADD COLUMN IF NOT EXISTS old_text text;

CREATE OR REPLACE FUNCTION migrator_journal() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    run text := current_setting('migrator.run_id', true);
BEGIN
    IF run IS NULL OR run = '' THEN
        RETURN NULL;
    END IF;
    INSERT INTO migration_journal (run_id, table_name, row_id, old_row, old_text)
    SELECT run::uuid, TG_TABLE_NAME, o.id, to_jsonb(o), o::text FROM old_rows o
    WHERE o.migration_run IS DISTINCT FROM run::uuid
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;
