-- The row seal (migrator/core/seal.py): every row a bulk batch writes carries a 64-bit digest of
-- what the batch sent (row_seal, a provenance column init-db adds to every mapped table), and each
-- batch records the count and sum of the seals it wrote, so a run's validation can tell that the
-- rows are still as their batches wrote them without reading Redis again.

-- An INSERT or UPDATE keeps a row's seal only inside a write that sets migrator.sealing (a bulk batch's upsert,
-- which itself keeps it only for a row that ends as it was sent, and the link step, which fills only
-- the linked columns a seal leaves out; a rollback putting a prior image back, seal and all, which held
-- for that image): any other (follow, dual-write, an operator's own)
-- changes the row without vouching for it, so its seal goes; so does an update another trigger makes
-- (depth > 1) even inside such a write: a table's trigger of its own may change what was sent (and
-- seal.check does not trust the seals of a table that has one). `init-db` puts it on every table a
-- mapping writes, row by row, before the write (migrator/core/schema.py: journal_sql), an INSERT too (a
-- row put back by hand with a copied seal would otherwise be vouched for); its WHEN tests the same as
-- this function, so a sealed write's rows cost no call of it.
CREATE OR REPLACE FUNCTION migrator_unseal() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('migrator.sealing', true) IS DISTINCT FROM 'on' OR pg_trigger_depth() > 1 THEN
        NEW.row_seal := NULL;
    END IF;
    RETURN NEW;
END
$$;

-- migrator_write (004_write_path.sql) of a bulk batch: its upserts may keep the seals they write,
-- and no other statement of the transaction may (sealing is off again before it returns).
CREATE OR REPLACE FUNCTION migrator_write_sealed(statements text[], documents text[],
    OUT written bigint, OUT error_state text, OUT error_message text, OUT error_detail text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('migrator.sealing', 'on', true);
    SELECT * INTO written, error_state, error_message, error_detail FROM migrator_write(statements, documents);
    PERFORM set_config('migrator.sealing', 'off', true);
END
$$;

-- Per table and pattern's provenance, the rows a batch wrote and the sum of their seals modulo 2^64
-- ({table: {metadata: [rows, sum]}}): a retried batch replaces them.
ALTER TABLE migration_batches ADD COLUMN IF NOT EXISTS seals jsonb NOT NULL DEFAULT '{}';
-- A sealed verification counts the source keys (from the spool) and checks the seals of the rows;
-- `reason`: why a verification ran, when it is the full re-read a seal check that did not hold asked for.
ALTER TABLE migration_verifications ADD COLUMN IF NOT EXISTS sealed boolean NOT NULL DEFAULT false;
ALTER TABLE migration_verifications ADD COLUMN IF NOT EXISTS reason jsonb;
