"""What every segment read in place has: its name, its buffer, errors that name it, and
the memoryview its checksums read through, released by ``close``."""

from __future__ import annotations

from typing import Any

from ..errors import CorruptSegmentError


class MappedSegment:
    """A read-only view of one mapped segment (snapshot, delta or index segment).

    Concurrency contract: immutable once made (the writer never rewrites a published
    segment); any thread may read it until ``close``, which its owner calls once no
    read uses it (reader/lifetime.py). ``close`` releases only the memoryview: the
    mapping belongs to whoever mapped ``buf`` (ipc/shm.py's Segment).
    """

    __slots__ = ("name", "buf", "size", "memview")  # memview: the view checksums read through

    def __init__(self, name: str, buf: Any, size: int) -> None:
        """Read and check the header (``_read_header``): CorruptSegmentError if it fails,
        with the view released, so that the caller can unmap at once even while the
        error (and this half-made object in its traceback) lives on."""
        self.name = name
        self.buf = buf
        self.size = size
        self.memview = memoryview(buf)
        try:
            self._read_header()
        except BaseException:
            self.close()
            raise

    def _read_header(self) -> None:
        """Check the header and take its fields (each kind of segment its own)."""
        raise NotImplementedError

    def _corrupt(self, message: str) -> CorruptSegmentError:
        """The error for damage found in this segment (raised by the caller)."""
        return CorruptSegmentError(message, segment=self.name)

    def close(self) -> None:
        try:
            self.memview.release()
        except Exception:
            pass  # (released already, or a slice of it is still in use: collected later)
