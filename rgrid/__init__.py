"""RGrid: run Python scripts on Docker hosts with content-hash caching."""

__version__ = "0.1.0"
