"""Every way the CLI reaches a grid: the remote HTTP client, the embedded default that runs
the service in-process, the local agent that keeps it warm between commands, and the
client-side work of a submission (finding the source tree, saving outputs). Imports
``rgrid.service`` and below; the CLI imports this."""
