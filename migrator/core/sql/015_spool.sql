-- The spool (migrator/core/spool.py): the keys one SCAN of a cursor range returned, kept by the first
-- priority's batch of the range, in its own transaction, sorted out per priority of the run, so that
-- every later priority's batch and every priority's in-run validation read them instead of walking
-- the range again (one SCAN pass per run, not one per priority and validation: Redis's CPU is the
-- scarce one). A run's spool is dropped when it completes or is rolled back.
--
-- UNLOGGED: no WAL for what is only a cache of the source's key names. A crash of PostgreSQL empties
-- both tables, and a range without its row in migration_spool_ranges is SCANned again.

-- One row per range spooled: which server process it was scanned on (Redis's run_id: a restart
-- reshuffles the cursor order and voids it), how many keys the SCAN returned (what progress
-- counts as walked, whichever share of them a priority's pass reads), and the key names its chunks
-- hold and their bytes (what `status` shows: the read-only role sees these, not the names).
CREATE UNLOGGED TABLE IF NOT EXISTS migration_spool_ranges (
    run_id         uuid NOT NULL REFERENCES migration_runs (id) ON DELETE CASCADE,
    node           text NOT NULL,       -- host:port of the cluster master; '' standalone
    range_count    integer NOT NULL,
    range_index    integer NOT NULL,
    range_start    numeric(20, 0) NOT NULL,
    range_end      numeric(20, 0) NOT NULL,
    source_process text,
    keys_walked    bigint NOT NULL,
    keys_spooled   bigint NOT NULL,
    bytes_spooled  bigint NOT NULL,
    PRIMARY KEY (run_id, node, range_count, range_index)
);

-- The keys themselves, a chunk of up to spool.CHUNK_KEYS per row: `lengths` the length of each key
-- (uint32, little-endian), `packed` the keys one after another. Stored uncompressed (EXTERNAL): key
-- names compress a little, and compressing them costs PostgreSQL more CPU than the bytes are worth.
CREATE UNLOGGED TABLE IF NOT EXISTS migration_spool (
    run_id       uuid NOT NULL,
    node         text NOT NULL,
    range_count  integer NOT NULL,
    range_index  integer NOT NULL,
    priority     text NOT NULL,
    chunk        integer NOT NULL,
    keys         integer NOT NULL,
    lengths      bytea NOT NULL,
    packed       bytea NOT NULL,
    PRIMARY KEY (run_id, node, range_count, range_index, priority, chunk),
    FOREIGN KEY (run_id, node, range_count, range_index) REFERENCES migration_spool_ranges ON DELETE CASCADE
);
ALTER TABLE migration_spool ALTER COLUMN lengths SET STORAGE EXTERNAL, ALTER COLUMN packed SET STORAGE EXTERNAL;

-- Whether a verification's ranges read the run's spool (the in-run validation) or SCAN (`migrator
-- verify`: the independent check, which also finds keys written after the spool was taken).
ALTER TABLE migration_verifications ADD COLUMN IF NOT EXISTS from_spool boolean NOT NULL DEFAULT false;
