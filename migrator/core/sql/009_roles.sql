-- What the least-privilege roles may do (they are created by sql/roles/least_privilege.sql, since
-- roles belong to the whole server): granted to each one that exists, by `migrator init-db` after
-- it has applied a mapping, and by that file after it creates them, so either order works.
-- migrator_run: what a run, its workers and the dual-write service need, and no more (no DDL).
-- migrator_report: reads only; raw dead-letter values stay hidden.
-- A table carrying the journal trigger is one a mapping writes (init-db gives it to every one of
-- them), so those are granted as the ledger is.
CREATE OR REPLACE FUNCTION migrator_grant_roles() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    written regclass[] := array(SELECT DISTINCT tgrelid::regclass FROM pg_trigger
                                WHERE tgfoid = 'migrator_journal()'::regprocedure);
    t regclass;
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'migrator_run') THEN
        GRANT SELECT, INSERT, UPDATE, DELETE ON
            migration_runs, migration_batches, migration_dead_letters, migration_validations, migration_journal,
            migration_verifications, migration_verify_ranges, dual_write_repairs, dual_write_settings,
            dual_write_shadow_reads, migration_follow, migration_reconciliations, migration_spool_ranges,
            migration_spool, migration_retired
            TO migrator_run;
        GRANT SELECT ON schema_migrations TO migrator_run;
        GRANT USAGE ON SEQUENCE migration_batches_id_seq, migration_dead_letters_id_seq,
            migration_verifications_id_seq, migration_verify_ranges_id_seq, dual_write_repairs_id_seq,
            dual_write_shadow_reads_id_seq, migration_reconciliations_id_seq TO migrator_run;
        FOREACH t IN ARRAY written LOOP
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %s TO migrator_run', t);
        END LOOP;
        -- a serial column of a mapping's table: inserting takes its sequence too
        FOR t IN SELECT DISTINCT d.objid::regclass FROM pg_depend d JOIN pg_class s ON s.oid = d.objid
                 WHERE d.classid = 'pg_class'::regclass AND s.relkind = 'S' AND d.refobjid = ANY(written::oid[]) LOOP
            EXECUTE format('GRANT USAGE ON SEQUENCE %s TO migrator_run', t);
        END LOOP;
    END IF;
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'migrator_report') THEN
        GRANT SELECT ON
            migration_runs, migration_batches, migration_validations, migration_verifications,
            migration_verify_ranges, schema_migrations, dual_write_shadow_reads, migration_follow,
            migration_reconciliations, migration_spool_ranges
            TO migrator_report;
        GRANT SELECT (id, run_id, batch_id, pattern, redis_key, key_text, redis_type, ttl_ms, error, created_at)
            ON migration_dead_letters TO migrator_report;
        -- An earlier version let it record its verifications: read-only now.
        REVOKE INSERT, UPDATE ON migration_verifications, migration_verify_ranges FROM migrator_report;
        REVOKE USAGE ON SEQUENCE migration_verifications_id_seq, migration_verify_ranges_id_seq FROM migrator_report;
        FOREACH t IN ARRAY written LOOP
            EXECUTE format('GRANT SELECT ON %s TO migrator_report', t);
        END LOOP;
    END IF;
END
$$;
