-- A value a write makes large enough to compress (a thread's tweets, an analytics document, a
-- journaled prior image) is compressed by lz4 rather than pglz, where the server was built with it
-- and nobody chose otherwise (default_toast_compression at its built-in default): lz4 takes
-- PostgreSQL a fraction of pglz's CPU to compress and to read back (a run's PostgreSQL CPU 36
-- against 40.5 µs per key, scripts/pg_profile.py). A column's own COMPRESSION is kept; so is a
-- default the server, the database or the role sets (the write then leaves it alone). Decided at
-- each `migrator init-db`.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_settings WHERE name = 'default_toast_compression' AND source = 'default'
               AND 'lz4' = ANY (enumvals)) THEN
        ALTER FUNCTION migrator_write(text[], text[]) SET default_toast_compression = lz4;
    ELSE
        ALTER FUNCTION migrator_write(text[], text[]) RESET default_toast_compression;
    END IF;
END
$$;
