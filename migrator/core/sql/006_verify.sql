-- Full verification (migrator/core/verify.py): every key of a run's mapping read again, transformed,
-- and compared with its rows, range by range.

-- The fresh source count a priority's validation needs now comes from its verification pass.
ALTER TABLE migration_batches DROP COLUMN IF EXISTS recount;

CREATE TABLE IF NOT EXISTS migration_verifications (
    id           bigserial PRIMARY KEY,
    run_id       uuid NOT NULL REFERENCES migration_runs (id) ON DELETE CASCADE,
    priorities   text[] NOT NULL,                 -- whose patterns it checks
    compare      boolean NOT NULL DEFAULT true,   -- false: count the source keys only (a dry run kept no rows)
    redis_run_id text,                            -- the server process it scans: a restart voids it
    status       text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'failed')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    result       jsonb,                           -- per pattern, once every range is in (verify.summarise)
    error        text
);
CREATE INDEX IF NOT EXISTS migration_verifications_run_idx ON migration_verifications (run_id, id);

CREATE TABLE IF NOT EXISTS migration_verify_ranges (
    id               bigserial PRIMARY KEY,
    verification_id  bigint NOT NULL REFERENCES migration_verifications (id) ON DELETE CASCADE,
    node             text NOT NULL DEFAULT '',
    range_index      integer NOT NULL,
    range_count      integer NOT NULL,
    range_start      numeric(20, 0) NOT NULL,
    range_end        numeric(20, 0) NOT NULL,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    counts           jsonb NOT NULL DEFAULT '{}',  -- per pattern: keys, compared, missing, different, ...
    attributed       jsonb NOT NULL DEFAULT '{}',  -- per table: rows found whose source_key is the key that expects them
    examples         jsonb NOT NULL DEFAULT '[]',  -- a few problem rows per pattern (key, kind, table, id, columns)
    started_at       timestamptz,
    finished_at      timestamptz,
    error            text,
    UNIQUE (verification_id, node, range_index)
);

-- Runs comparison statements (each built by migrator.core.merge.TableRule.compare from the mapping, never
-- from key contents) over their documents of expected rows; reads only. Per statement: the rows of
-- its document found under the key that expects them, and the rows that are missing or differ. A
-- value PostgreSQL cannot take (a record error, as in migrator_write) is returned, not raised, so
-- the caller can split the documents and set that one record aside.
CREATE OR REPLACE FUNCTION migrator_compare(statements text[], documents text[],
    OUT attributed bigint[], OUT problems jsonb[], OUT error_state text, OUT error_message text)
LANGUAGE plpgsql AS $$
DECLARE
    a bigint;
    p jsonb;
BEGIN
    attributed := '{}';
    problems := '{}';
    FOR i IN 1 .. coalesce(array_length(statements, 1), 0) LOOP
        EXECUTE statements[i] INTO a, p USING documents[i];
        attributed := attributed || a;
        problems := problems || p;
    END LOOP;
EXCEPTION WHEN data_exception OR integrity_constraint_violation OR program_limit_exceeded THEN
    GET STACKED DIAGNOSTICS error_state = RETURNED_SQLSTATE, error_message = MESSAGE_TEXT;
    attributed := NULL;
    problems := NULL;
END
$$;
