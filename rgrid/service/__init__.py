"""What the HTTP API and the embedded default both call: creating and listing executions and
batches, accounts, purges, maintenance, preflight checks, and the wiring (``context``) that
builds a pipeline context for a process. Imports ``rgrid.pipeline`` and below."""
