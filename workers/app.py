"""The Celery application; every setting lives in celeryconfig.py."""
from celery import Celery

app = Celery("migrator", include=["workers.tasks"])
app.config_from_object("celeryconfig")
