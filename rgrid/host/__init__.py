"""What one worker host owns: the Docker engine, runtime images, dependency resolution and
installed environments, the sandbox and its warm pool, the disk budget, the host registry
and run slots. Imports ``rgrid.store`` and ``rgrid.core``."""
