-- migrator_write (004_write_path.sql) with each upsert planned once per session, as 017 did for
-- migrator_compare: a statement becomes a function of the session's own (pg_temp, named by the
-- statement's digest) whose INSERT PL/pgSQL prepares once, with a generic plan, and runs again on
-- every later call, where EXECUTE parsed and planned it on every call. What that saves is per
-- statement, not per row: little in a sub-batch of 2,000 records, a fifth to a quarter of
-- PostgreSQL's CPU in sub-batches of 20 to 100 (a bisection's halves, follow's writes, a batch's
-- last sub-batch; scripts/write_variants.py, measured). A record error still rolls the
-- subtransaction back and is returned; a function made in it goes with it, and is made again on
-- the next call. (`#variable_conflict use_column`: a column of the statement is never taken for the
-- function's own variable, whatever its name.)
CREATE OR REPLACE FUNCTION migrator_write(statements text[], documents text[],
    OUT written bigint, OUT error_state text, OUT error_message text, OUT error_detail text)
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
    planned text;
BEGIN
    written := 0;
    FOR i IN 1 .. coalesce(array_length(statements, 1), 0) LOOP
        planned := 'migrator_write_' || left(encode(sha256(convert_to(statements[i], 'UTF8')), 'hex'), 40);
        IF to_regprocedure('pg_temp.' || planned || '(text)') IS NULL THEN
            EXECUTE format('CREATE FUNCTION pg_temp.%I(text, OUT migrator_written bigint) LANGUAGE plpgsql'
                           ' SET plan_cache_mode = force_generic_plan AS %L', planned,
                           E'#variable_conflict use_column\nBEGIN ' || statements[i]
                           || '; GET DIAGNOSTICS migrator_written = ROW_COUNT; END');
        END IF;
        EXECUTE format('SELECT pg_temp.%I($1)', planned) INTO n USING documents[i];
        written := written + n;
    END LOOP;
EXCEPTION WHEN data_exception OR integrity_constraint_violation OR program_limit_exceeded THEN
    GET STACKED DIAGNOSTICS error_state = RETURNED_SQLSTATE, error_message = MESSAGE_TEXT,
                            error_detail = PG_EXCEPTION_DETAIL;
    written := 0;
END
$$;
