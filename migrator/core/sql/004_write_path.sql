-- One round trip per sub-batch: the writer sends every table's upsert of a sub-batch (each a
-- statement of its mapping, never text from the keyspace) with its JSON rows, and this runs
-- them in order inside a subtransaction. A record error (bad data, a violated constraint, a
-- value too large) rolls the subtransaction back and is returned, not raised, so the batch's
-- transaction stays usable and the writer bisects the sub-batch; any other error is raised.
CREATE OR REPLACE FUNCTION migrator_write(statements text[], documents text[],
    OUT written bigint, OUT error_state text, OUT error_message text, OUT error_detail text)
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    written := 0;
    FOR i IN 1 .. coalesce(array_length(statements, 1), 0) LOOP
        EXECUTE statements[i] USING documents[i];
        GET DIAGNOSTICS n = ROW_COUNT;
        written := written + n;
    END LOOP;
EXCEPTION WHEN data_exception OR integrity_constraint_violation OR program_limit_exceeded THEN
    GET STACKED DIAGNOSTICS error_state = RETURNED_SQLSTATE, error_message = MESSAGE_TEXT,
                            error_detail = PG_EXCEPTION_DETAIL;
    written := 0;
END
$$;

-- Seconds each batch spent per stage (scan, read, transform, write, write_wait), for the
-- report and the benchmark: where a run's time goes, across every worker.
ALTER TABLE migration_batches ADD COLUMN IF NOT EXISTS timings jsonb NOT NULL DEFAULT '{}';
