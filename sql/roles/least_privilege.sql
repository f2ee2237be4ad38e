-- Least-privilege roles for the migrator, applied by hand (roles belong to the whole server, so
-- `migrator init-db` does not create them). As a superuser (or a role that may create roles and owns
-- the tables), before or after init-db:
--   psql "$DATABASE_URL" -f sql/roles/least_privilege.sql
--   psql "$DATABASE_URL" -c "ALTER ROLE migrator_run PASSWORD '...'"      (and migrator_report)
-- migrator_run: what a run, its workers and the dual-write service need, and no more (no DDL).
-- migrator_report: reads only: status, batches, report, and validate and verify, which print their
-- findings without recording them ("not recorded: role migrator_report cannot write the ledger");
-- raw dead-letter values stay hidden.
-- What each may do is granted by init-db whenever they exist (migrator_grant_roles, in
-- migrator/core/sql/009_roles.sql: the ledger and every table a mapping writes); this file grants the same
-- once it has created them, if init-db ran before.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'migrator_run') THEN
        CREATE ROLE migrator_run LOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'migrator_report') THEN
        CREATE ROLE migrator_report LOGIN;
    END IF;
    IF to_regprocedure('migrator_grant_roles()') IS NOT NULL THEN
        PERFORM migrator_grant_roles();
    END IF;
END
$$;
