"""A request's events from the engine's worker thread to the HTTP event loop.

Waking the event loop from another thread (`call_soon_threadsafe`) costs a socket write and a
turn of the loop; done per token it was most of the loop's work on a streamed reply
(docs/serve.md). Here the engine appends to a deque and wakes the loop only when the request is
waiting on an empty inbox, so a request that is busy elsewhere (sending, or pausing between
stream events) takes everything that piled up in one go, without a wake per token.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque


class Inbox:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._waiter: asyncio.Future | None = None

    def put(self, *event) -> None:
        """Add an event (any thread)."""
        with self._lock:
            self._items.append(event)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            try:
                self._loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # the event loop has closed
                pass

    def drain(self) -> list[tuple]:
        """Every event added since the last take, without waiting."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items

    async def take(self) -> list[tuple]:
        """Every event added since the last take, waiting for one if there are none (event loop only)."""
        while True:
            with self._lock:
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    return items
                self._waiter = waiter = self._loop.create_future()
            await waiter


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
