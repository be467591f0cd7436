"""Where bytes live: the object store (S3 or a local folder), content-addressed blobs and
uploads, input manifests, and the Redis log buffer and channels a run's output passes
through. Imports only ``rgrid.core``."""
