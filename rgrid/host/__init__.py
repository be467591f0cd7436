"""What one worker host owns: the Docker engine, runtime images, dependency resolution and
installed environments, the sandbox (``sandbox`` and the ``sandbox_*`` modules) and its warm
pool, the disk budget, the host registry, which queues the host serves (``placement``) and run
slots. Imports ``rgrid.store`` and ``rgrid.core``."""
