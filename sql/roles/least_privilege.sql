-- Least-privilege roles for the migrator, applied by hand (roles belong to the whole server, so
-- `migrator init-db` does not create them). As a superuser or the tables' owner, after init-db:
--   psql "$DATABASE_URL" -f sql/roles/least_privilege.sql
--   psql "$DATABASE_URL" -c "ALTER ROLE migrator_run PASSWORD '...'"      (and migrator_report)
-- migrator_run: what a run, its workers and the dual-write service need, and no more (no DDL).
-- migrator_report: reads only: status, batches, report, and validate and verify, which print their
-- findings without recording them ("not recorded: role migrator_report cannot write the ledger");
-- raw dead-letter values stay hidden.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'migrator_run') THEN
        CREATE ROLE migrator_run LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'migrator_report') THEN
        CREATE ROLE migrator_report LOGIN;
    END IF;
END
$$;

GRANT SELECT, INSERT, UPDATE, DELETE ON
    users, newsletter_subscribers, subscriptions, usage_counters, usage_events, usage_stats, threads,
    thread_stats, thread_analytics, analytics_timeseries, sessions, login_failures, legacy_id_map,
    migration_runs, migration_batches, migration_dead_letters, migration_validations, migration_journal,
    migration_verifications, migration_verify_ranges, dual_write_repairs, dual_write_settings, dual_write_shadow_reads
    TO migrator_run;
GRANT SELECT ON schema_migrations TO migrator_run;
GRANT USAGE ON SEQUENCE migration_batches_id_seq, migration_dead_letters_id_seq, migration_verifications_id_seq,
    migration_verify_ranges_id_seq, dual_write_repairs_id_seq, dual_write_shadow_reads_id_seq TO migrator_run;

GRANT SELECT ON
    users, newsletter_subscribers, subscriptions, usage_counters, usage_events, usage_stats, threads,
    thread_stats, thread_analytics, analytics_timeseries, sessions, login_failures, legacy_id_map,
    migration_runs, migration_batches, migration_validations, migration_verifications, migration_verify_ranges,
    schema_migrations, dual_write_shadow_reads
    TO migrator_report;
GRANT SELECT (id, run_id, batch_id, pattern, redis_key, key_text, redis_type, ttl_ms, error, created_at)
    ON migration_dead_letters TO migrator_report;
-- An earlier version of this file let it record its verifications: read-only now.
REVOKE INSERT, UPDATE ON migration_verifications, migration_verify_ranges FROM migrator_report;
REVOKE USAGE ON SEQUENCE migration_verifications_id_seq, migration_verify_ranges_id_seq FROM migrator_report;
