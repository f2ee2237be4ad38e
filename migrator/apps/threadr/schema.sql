-- Threadr's target tables: the THREADR mapping's schema (migrator/threadr.py), which `migrator init-db`
-- applies after the engine's own SQL (migrator/core/sql/). The engine then gives every table the mapping
-- writes its provenance columns and the journal trigger exact rollback depends on (migrator/core/schema.py).
-- Every table: a deterministic uuid id (uuid5 of the natural key) so reruns upsert in place,
-- provenance (migration_run, source_key, metadata->>'source'), expires_at from the key's TTL,
-- timezone-aware timestamps only, and no generated column that would need a mutable function.
-- Idempotent: loads inside one transaction and again on top of itself.

CREATE TABLE IF NOT EXISTS users (
    id                       uuid PRIMARY KEY,
    legacy_id                text NOT NULL UNIQUE,      -- user_<token> as the app knew it
    email                    text NOT NULL,
    password_hash            text NOT NULL,             -- bcrypt, byte for byte
    role                     text NOT NULL CHECK (role IN ('user', 'premium', 'admin')),
    status                   text NOT NULL CHECK (status IN ('active', 'inactive', 'suspended')),
    created_at               timestamptz,
    updated_at               timestamptz,
    last_login_at            timestamptz,
    login_count              integer NOT NULL DEFAULT 0,
    failed_login_attempts    integer NOT NULL DEFAULT 0,
    last_failed_login        timestamptz,
    is_email_verified        boolean NOT NULL DEFAULT false,
    email_verification_token text,
    password_reset_token     text,
    password_reset_expires   timestamptz,
    app_metadata             jsonb NOT NULL DEFAULT '{}',
    migration_run            uuid,
    source_key               text,
    metadata                 jsonb NOT NULL DEFAULT '{}',
    expires_at               timestamptz
);
-- Not unique: two registrations that raced keep one email on two user records (the app's own
-- email index says which one it finds).
CREATE INDEX IF NOT EXISTS users_email_idx ON users (lower(email));

CREATE TABLE IF NOT EXISTS newsletter_subscribers (
    id             uuid PRIMARY KEY,
    email          text NOT NULL,
    subscribed_at  timestamptz,
    client_ip      text,
    user_agent     text,
    referrer       text,
    signup_source  text,
    extra          jsonb NOT NULL DEFAULT '{}',   -- fields a script added (dual_write's user_id, ...)
    migration_run  uuid,
    source_key     text,
    metadata       jsonb NOT NULL DEFAULT '{}',
    expires_at     timestamptz
);
CREATE INDEX IF NOT EXISTS newsletter_subscribers_email_idx ON newsletter_subscribers (lower(email));

-- Legacy premium grants and Stripe subscriptions. A grant may belong to an ip or an email
-- with no registered user, so user_id is optional and ip/email are the lookup subjects.
CREATE TABLE IF NOT EXISTS subscriptions (
    id                     uuid PRIMARY KEY,
    kind                   text NOT NULL CHECK (kind IN ('premium_grant', 'stripe')),
    user_id                uuid,
    customer_ref           text,                   -- the id in the Redis key: user_<token> or an email
    ip                     text,                   -- set only from a threadr:premium:ip:<ip> key
    email                  text,                   -- set only from a threadr:premium:email:<email> key
    plan                   text NOT NULL,
    plan_display_name      text,
    tier_level             smallint,
    status                 text NOT NULL,          -- Stripe's, 'canceled' for the app's 'cancelled'; 'active' for a grant (it counts while premium_expires_at is ahead)
    status_raw             text,                   -- as Stripe/the app spelt it (e.g. 'cancelled')
    stripe_subscription_id text,                   -- not unique: the app may keep one under two keys
    current_period_start   timestamptz,
    current_period_end     timestamptz,
    cancel_at_period_end   boolean,
    thread_limit           integer,                -- -1 = unlimited
    features               jsonb,
    is_annual              boolean,
    monthly_price          integer,                -- cents
    annual_price           integer,                -- cents
    granted_at             timestamptz,
    premium_expires_at     timestamptz,
    duration_days          integer,
    payment_reference      text,
    granted_by             text,
    amount_cents           integer,
    currency               text,
    grant_client_ip        text,                   -- as recorded inside the grant value
    grant_email            text,
    payment_info           jsonb,
    extra                  jsonb NOT NULL DEFAULT '{}',   -- fields a script added (dual_write's source, ...)
    migration_run          uuid,
    source_key             text,
    metadata               jsonb NOT NULL DEFAULT '{}',
    expires_at             timestamptz
);
CREATE INDEX IF NOT EXISTS subscriptions_ip_idx ON subscriptions (ip) WHERE ip IS NOT NULL;
CREATE INDEX IF NOT EXISTS subscriptions_email_idx ON subscriptions (lower(email)) WHERE email IS NOT NULL;
CREATE INDEX IF NOT EXISTS subscriptions_user_idx ON subscriptions (user_id) WHERE user_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS subscriptions_customer_idx ON subscriptions (customer_ref) WHERE customer_ref IS NOT NULL;
CREATE INDEX IF NOT EXISTS subscriptions_stripe_idx ON subscriptions (stripe_subscription_id)
    WHERE stripe_subscription_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS usage_counters (
    id             uuid PRIMARY KEY,
    subject_type   text NOT NULL CHECK (subject_type IN ('ip', 'email', 'user')),
    subject        text NOT NULL,
    period         text NOT NULL CHECK (period IN ('daily', 'monthly')),
    period_start   date NOT NULL,
    count          bigint NOT NULL CHECK (count >= 0),
    migration_run  uuid,
    source_key     text,
    metadata       jsonb NOT NULL DEFAULT '{}',
    expires_at     timestamptz,
    UNIQUE NULLS NOT DISTINCT (subject_type, subject, period, period_start)
);

CREATE TABLE IF NOT EXISTS usage_events (
    id             uuid PRIMARY KEY,
    occurred_at    timestamptz NOT NULL,
    client_ip      text,
    email          text,
    event_date     date,
    event_month    text,
    migration_run  uuid,
    source_key     text,
    metadata       jsonb NOT NULL DEFAULT '{}',
    expires_at     timestamptz
);
CREATE INDEX IF NOT EXISTS usage_events_occurred_idx ON usage_events (occurred_at);

CREATE TABLE IF NOT EXISTS usage_stats (
    id             uuid PRIMARY KEY,
    stat_name      text NOT NULL UNIQUE,
    value          bigint NOT NULL,
    migration_run  uuid,
    source_key     text,
    metadata       jsonb NOT NULL DEFAULT '{}',
    expires_at     timestamptz
);

CREATE TABLE IF NOT EXISTS threads (
    id                uuid PRIMARY KEY,             -- the thread's own id from the app
    user_id           uuid,
    user_ref          text,                         -- the app's user id
    title             text,
    original_content  text,
    tweets            jsonb NOT NULL,
    app_metadata      jsonb NOT NULL DEFAULT '{}',
    created_at        timestamptz,
    updated_at        timestamptz,
    view_count        integer NOT NULL DEFAULT 0,
    copy_count        integer NOT NULL DEFAULT 0,
    is_favorite       boolean NOT NULL DEFAULT false,
    is_archived       boolean NOT NULL DEFAULT false,
    migration_run     uuid,
    source_key        text,
    metadata          jsonb NOT NULL DEFAULT '{}',
    expires_at        timestamptz
);
CREATE INDEX IF NOT EXISTS threads_user_idx ON threads (user_ref);

CREATE TABLE IF NOT EXISTS thread_stats (
    id             uuid PRIMARY KEY,
    user_id        uuid,
    user_ref       text NOT NULL UNIQUE,
    created        bigint NOT NULL DEFAULT 0,
    viewed         bigint NOT NULL DEFAULT 0,
    updated        bigint NOT NULL DEFAULT 0,
    deleted        bigint NOT NULL DEFAULT 0,
    copied         bigint NOT NULL DEFAULT 0,
    migration_run  uuid,
    source_key     text,
    metadata       jsonb NOT NULL DEFAULT '{}',
    expires_at     timestamptz
);

CREATE TABLE IF NOT EXISTS thread_analytics (
    id             uuid PRIMARY KEY,
    user_id        uuid,
    user_ref       text NOT NULL,
    thread_id      text NOT NULL,
    posted_at      timestamptz,
    analytics      jsonb NOT NULL,
    migration_run  uuid,
    source_key     text,
    metadata       jsonb NOT NULL DEFAULT '{}',
    expires_at     timestamptz,
    UNIQUE (user_ref, thread_id)
);

CREATE TABLE IF NOT EXISTS analytics_timeseries (
    id             uuid PRIMARY KEY,
    user_id        uuid,
    user_ref       text NOT NULL,
    metric         text NOT NULL,
    period         text NOT NULL,                -- normalised: 'MetricPeriod.DAY' -> 'day'
    point_at       timestamptz NOT NULL,
    value          double precision,             -- NULL: a NaN or inf posted, which pydantic writes as null
    migration_run  uuid,
    source_key     text,
    metadata       jsonb NOT NULL DEFAULT '{}',
    expires_at     timestamptz
);
ALTER TABLE analytics_timeseries ALTER COLUMN value DROP NOT NULL;
-- Not unique: two points of a series may share a timestamp (each member is a point).
CREATE INDEX IF NOT EXISTS analytics_timeseries_point_idx ON analytics_timeseries (user_ref, metric, period, point_at);

CREATE TABLE IF NOT EXISTS sessions (
    id                 uuid PRIMARY KEY,
    user_id            uuid,
    user_ref           text NOT NULL UNIQUE,
    email              text,
    role               text,
    status             text,
    login_at           timestamptz,
    last_activity      timestamptz,
    client_ip          text,
    access_token_hash  bigint,                  -- Python's hash() of the token, as the app stored it
    migration_run      uuid,
    source_key         text,
    metadata           jsonb NOT NULL DEFAULT '{}',
    expires_at         timestamptz
);

CREATE TABLE IF NOT EXISTS login_failures (
    id             uuid PRIMARY KEY,
    email          text NOT NULL,
    client_ip      text NOT NULL,
    attempts       integer NOT NULL CHECK (attempts >= 0),
    last_attempt   timestamptz,
    migration_run  uuid,
    source_key     text,
    metadata       jsonb NOT NULL DEFAULT '{}',
    expires_at     timestamptz,
    UNIQUE (email, client_ip)
);

-- Databases made by earlier versions of this file: the same schema.
DROP INDEX IF EXISTS users_email_key;
DROP INDEX IF EXISTS newsletter_subscribers_email_key;
ALTER TABLE newsletter_subscribers ADD COLUMN IF NOT EXISTS extra jsonb NOT NULL DEFAULT '{}';
ALTER TABLE subscriptions DROP CONSTRAINT IF EXISTS subscriptions_status_check;
ALTER TABLE subscriptions DROP CONSTRAINT IF EXISTS subscriptions_tier_level_check;
ALTER TABLE subscriptions DROP CONSTRAINT IF EXISTS subscriptions_stripe_subscription_id_key;
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS extra jsonb NOT NULL DEFAULT '{}';
ALTER TABLE analytics_timeseries DROP CONSTRAINT IF EXISTS analytics_timeseries_user_ref_metric_period_point_at_key;
DO $$
BEGIN
    IF (SELECT data_type FROM information_schema.columns
        WHERE table_name = 'sessions' AND column_name = 'access_token_hash') = 'text' THEN
        ALTER TABLE sessions ALTER COLUMN access_token_hash TYPE bigint
            USING CASE WHEN access_token_hash ~ '^-?[0-9]{1,19}$' THEN access_token_hash::numeric END;
    END IF;
END
$$;
