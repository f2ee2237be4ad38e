"""The engine's own SQL (the ledger, the write path, verification, fencing, the roles' grants), shipped
as package data and applied in file order by `migrator init-db` (migrator/core/schema.py)."""
