"""Threadr, the first application whose keyspace the migrator moves: its mapping (mapping.py,
schema.sql), its demo keyspace (demo.py). Registered like any other mapping: the entry point
`threadr` of the group `migrator.mappings` (pyproject.toml)."""
from .mapping import THREADR

__all__ = ["THREADR"]
