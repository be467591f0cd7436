"""The one Celery application. Start a worker with ``celery -A workers.celery_app worker``."""

from celery import Celery

app = Celery("rgrid")
app.config_from_object("celeryconfig")
app.autodiscover_tasks(["workers"], related_name="tasks", force=True)
