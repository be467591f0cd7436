"""An execution's chain, hash -> cache lookup -> build -> run -> store, run against one host,
and the output cache (reuse) that answers a repeat without running it. Imports
``rgrid.host``, ``rgrid.store`` and ``rgrid.core``; kept light so that importing the output
cache does not load the steps (and docker-py with them)."""
