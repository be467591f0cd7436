"""The Celery side of RGrid: the app and its tasks."""
