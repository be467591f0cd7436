"""An execution's chain, hash -> cache lookup -> build -> run -> store, run against one host,
and the output cache (reuse) that answers a repeat without running it. Imports
``rgrid.host``, ``rgrid.store`` and ``rgrid.core``; kept light so that importing the output
cache does not load the steps (and docker-py with them).

The chain is in ``chain``; each step in its own module (``hash``, ``lookup``, ``build``,
``run``, ``store``) with the parts of the run beside it (``claim``, ``inputs``, ``watch``,
``reattach``, ``outputs``); the lease sweep in ``lost``. ``rows`` and ``logs`` load no Docker
code: the service's cancel uses them from the API's process."""
