"""Executing runs over the core: planning and carrying them on (here in lanes, or on Celery workers
through an executor found by name), the steps after each priority, stopping them, and `follow`."""
