"""The command line (`shmcache`, `python -m shmcache`) and the operator tools behind it:
the service, its config and metrics, check, bench, demo."""

from .commands import main

__all__ = ["main"]
