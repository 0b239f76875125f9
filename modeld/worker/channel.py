"""A bounded one-producer, one-consumer channel for a generation's events.

anyio's memory object streams add a scheduler round trip to every send and every receive
(each is a checkpoint). For a model that makes a token every few milliseconds that is most
of the daemon's cost per token, so this channel only suspends a side when it must: the
reader when the channel is full, the consumer when it is empty.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class Channel(Generic[T]):
    """Items in order; `put` waits while `limit` are pending, `get` while none are."""

    def __init__(self, limit: int) -> None:
        self._items: deque[T] = deque()
        self._limit = limit
        self._closed = False
        self._readable: anyio.Event | None = None  # set when the waiting consumer may go on
        self._writable: anyio.Event | None = None  # set when the waiting producer may go on

    @property
    def closed(self) -> bool:
        return self._closed

    async def put(self, item: T) -> bool:
        """Add an item; False (and the item dropped) once the channel is closed."""
        while len(self._items) >= self._limit and not self._closed:
            self._writable = anyio.Event()
            await self._writable.wait()
        return self.put_nowait(item, force=True)

    def put_nowait(self, item: T, *, force: bool = False) -> bool:
        """Add an item without waiting (past the limit only with `force`)."""
        if self._closed or (not force and len(self._items) >= self._limit):
            return False
        self._items.append(item)
        self._wake_reader()
        return True

    async def get(self) -> T:
        """The next item; raises anyio.EndOfStream once closed and drained."""
        while not self._items:
            if self._closed:
                raise anyio.EndOfStream
            self._readable = anyio.Event()
            await self._readable.wait()
        item = self._items.popleft()
        if self._writable is not None:
            self._writable.set()
            self._writable = None
        return item

    def close(self) -> None:
        """No more items: the consumer drains what is there, the producer stops waiting."""
        self._closed = True
        self._wake_reader()
        if self._writable is not None:
            self._writable.set()
            self._writable = None

    def _wake_reader(self) -> None:
        if self._readable is not None:
            self._readable.set()
            self._readable = None
