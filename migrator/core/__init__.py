"""The engine core: mappings and their values, the source's reads, the target's writes and schema,
the ledger, and one batch, verification, validation or rollback at a time. It imports no layer
above it (tests/test_layout.py)."""
