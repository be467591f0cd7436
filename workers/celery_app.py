"""The one Celery application. Start a worker with ``celery -A workers.celery_app worker``; it
imports the tasks (workers/tasks.py) when it starts."""

from rgrid.core.queueing import create_celery_app

app = create_celery_app(include=["workers.tasks"])
