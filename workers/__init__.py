"""The Celery layer: `celery -A workers worker -Q critical,high,medium,low` (the app is workers.celery.app)."""
from .celery import app

__all__ = ["app"]
