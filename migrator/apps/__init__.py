"""Applications' mappings, each a package of its own registered like any other mapping
(migrator/core/registry.py); the engine around them names none of them."""
