"""The one definition of each default setting, shared by Writer, the config loader and the CLI."""

from __future__ import annotations

ENDPOINT = "http://127.0.0.1:2379"
RING_SIZE = 64 << 20  # bytes of event history
SNAPSHOT_INTERVAL = 30.0  # seconds between snapshot republishes while keys change
PROGRESS_INTERVAL = 1.0  # seconds of idle range before the writer asks etcd for progress
MODE = 0o600
BACKOFF_MAX = 5.0  # longest pause between reconnects, seconds
ETCD_TIMEOUT = 5.0  # seconds per etcd request (the watch stream has none)
VERIFY_INTERVAL = 600.0  # seconds between checks of the cache against etcd (0: never)
