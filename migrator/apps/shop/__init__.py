"""A small online shop: the second application the migrator moves, with a mapping that is a file
(mapping.toml, docs/mapping-file.md) and its demo keyspace (demo.py)."""
