-- migrator_compare (006_verify.sql) with each comparison statement planned once per session: a
-- statement becomes a function of the session's own (pg_temp, named by the statement's digest),
-- whose query PL/pgSQL prepares once and runs again on every later call, where EXECUTE parsed and
-- planned each statement on every call. A verification of every priority sends about fifteen
-- statements per chunk of keys, a third of a millisecond each to plan: a fifth of what the
-- comparison cost PostgreSQL (measured). A function made in a transaction that rolls back goes
-- with it, and is made again on the next call. (Like the temporary table of large documents, it
-- needs a session that may make temporary objects: every role may, unless TEMP is revoked.)
CREATE OR REPLACE FUNCTION migrator_compare(statements text[], documents text[],
    OUT attributed bigint[], OUT problems jsonb[], OUT error_state text, OUT error_message text)
LANGUAGE plpgsql AS $$
DECLARE
    a bigint;
    p jsonb;
    planned text;
BEGIN
    attributed := '{}';
    problems := '{}';
    FOR i IN 1 .. coalesce(array_length(statements, 1), 0) LOOP
        planned := 'migrator_compare_' || left(encode(sha256(convert_to(statements[i], 'UTF8')), 'hex'), 40);
        IF to_regprocedure('pg_temp.' || planned || '(text)') IS NULL THEN
            EXECUTE format('CREATE FUNCTION pg_temp.%I(text) RETURNS TABLE (migrator_attributed bigint, migrator_problems jsonb)'
                           ' LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS %L',
                           planned, 'BEGIN RETURN QUERY ' || statements[i] || '; END');
        END IF;
        EXECUTE format('SELECT * FROM pg_temp.%I($1)', planned) INTO a, p USING documents[i];
        attributed := attributed || a;
        problems := problems || p;
    END LOOP;
EXCEPTION WHEN data_exception OR integrity_constraint_violation OR program_limit_exceeded THEN
    GET STACKED DIAGNOSTICS error_state = RETURNED_SQLSTATE, error_message = MESSAGE_TEXT;
    attributed := NULL;
    problems := NULL;
END
$$;
