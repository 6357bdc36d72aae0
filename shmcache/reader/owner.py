"""ReaderHandle: the Reader as the parts it creates see it (watches, cursors, the
demultiplexer, AsyncWatch, Subscription).

They take a ReaderHandle rather than import reader.py, which imports them: the
read side's imports then run one way, from the Reader down. ``Reader`` is the
one implementation; mypy checks that it matches wherever one is passed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..format.control import Block
    from ..ipc.control_reader import ControlReader
    from ..ipc.shm import Segment
    from .lifetime import Lifetime


class ReaderHandle(Protocol):
    """What a Reader offers the objects it makes; see reader.py for each contract."""

    name: str
    _life: Lifetime

    @property
    def control(self) -> ControlReader: ...

    @property
    def revision(self) -> int: ...

    def _word(self) -> int: ...

    def _check_read(self) -> None: ...

    def _index_filter(self, index: Any) -> tuple[int, bytes] | None: ...

    def _watch_start(self, prefix: bytes, since: int | None,
                     ) -> tuple[bytes, Block, Segment, int, int]: ...

    def _current_ring(self) -> tuple[Block, Segment]: ...
