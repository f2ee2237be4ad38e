-- The temporary tables a large sub-batch's rows are staged in by COPY, a row's JSON array a line, for
-- its upserts to read (migrator/core/writer.py: STAGED_MIN_RECORDS), made the first time a session
-- needs one and emptied before each use (a failed write leaves its rows there). Their text is stored
-- as it came (EXTERNAL, a row of up to 8 kB in its page): each is read once, right after it came, and
-- compressing it cost more than the upsert reading it. A TRUNCATE after the first in a transaction
-- truncates in place; the first makes the table's files anew, once per batch.
CREATE OR REPLACE FUNCTION migrator_stage(stages text[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    stage text;
BEGIN
    FOREACH stage IN ARRAY stages LOOP
        IF to_regclass('pg_temp.' || quote_ident(stage)) IS NULL THEN
            EXECUTE format('CREATE TEMP TABLE %I (doc text) WITH (toast_tuple_target = 8160)', stage);
            EXECUTE format('ALTER TABLE pg_temp.%I ALTER doc SET STORAGE EXTERNAL', stage);
        ELSE
            EXECUTE format('TRUNCATE pg_temp.%I', stage);
        END IF;
    END LOOP;
END
$$;

-- The planner knows nothing of a stage's rows (a temporary table has no statistics) and, from its
-- size, may cost an upsert over the JIT threshold: compiling it took more than the write (on every
-- sub-batch, the TRUNCATE having invalidated its plan). A write's statements are never worth it.
ALTER FUNCTION migrator_write(text[], text[]) SET jit = off;
