"""Operating-system primitives: POSIX shared-memory segments, futexes, process liveness."""
