"""What every other package stands on: settings, the database models and session, the
statuses and their transitions, the error model, hashing, units, the cache keys, the queue
names, locks and metrics. Nothing here imports another rgrid package."""
