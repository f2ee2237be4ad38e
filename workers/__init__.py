"""The Celery layer: `celery -A workers worker -Q critical,high,medium,low`."""
from .app import app

__all__ = ["app"]
