"""Celery settings, in one place, built from RGrid's one Settings (rgrid/core/config.py), so each
has one name and one default (loaded by workers/celery_app.py)."""

from celery.schedules import crontab

from rgrid.core import queueing
from rgrid.core.config import get_settings

_settings = get_settings()

broker_url = _settings.redis_url
# Results are not read (state lives in the execution row) and Flower shows each task from
# its events, so none is stored unless a task asks (the nightly purge keeps its counts).
# Storing them, and the sender subscribing to each one's result, cost every step Redis round
# trips on the user's path.
result_backend = _settings.result_backend or broker_url
result_expires = 24 * 3600
task_ignore_result = True

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
timezone = "UTC"
enable_utc = True

# A step is acknowledged when it finishes, so a worker that dies mid-step has it redelivered;
# every step is idempotent for that reason.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

# A hard limit per step; the run step's own deadline (the execution's timeout) is enforced by
# the sandbox and the runner, and the hard limit only catches a worker that hangs past it.
task_time_limit = _settings.task_time_limit_s
task_soft_time_limit = task_time_limit - 300
# Redis redelivers an unacked task after the visibility timeout: keep it above the hard limit,
# or a long run would be started a second time while the first still runs.
broker_transport_options = {"visibility_timeout": task_time_limit + 3600}

# One queue per deployment; test sessions take their own so that two never share tasks.
task_default_queue = _settings.queue
worker_send_task_events = True
# No "task-sent" event: Flower shows a step from the moment a worker receives it. Sending one
# took ~9 ms of the API's answer to each submission, and as long again at every step.
task_send_sent_event = False
broker_connection_retry_on_startup = True

#: How often abandoned uploads are purged.
UPLOAD_PURGE_EVERY_S = 600

beat_schedule = {
    # Twice per lease, so a lost worker is noticed within 1.5 leases.
    "sweep-lost-workers": {
        "task": queueing.SWEEP_LOST_WORKERS,
        "schedule": _settings.lease_s / 2,
    },
    "reap-leftover-containers": {
        "task": queueing.REAP_CONTAINERS,
        "schedule": _settings.reap_interval_s,
    },
    # The backstop for a batch whose dispatching worker died before handing on its next
    # executions (rgrid/service/batches.py).
    "dispatch-stalled-batches": {
        "task": queueing.DISPATCH_BATCHES,
        "schedule": _settings.lease_s,
    },
    # Staged bytes of uploads never completed: gone within the hour, not at the nightly purge
    # (issue 24); the job only reads the uploads table and lists the staging prefix.
    "purge-abandoned-uploads": {
        "task": queueing.PURGE_UPLOADS,
        "schedule": UPLOAD_PURGE_EVERY_S,
    },
    "purge-unused-cache-entries": {
        "task": queueing.PURGE_CACHES,
        "schedule": crontab(hour=3, minute=17),
    },
}
