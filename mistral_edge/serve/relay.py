"""Events from the engine's worker thread to the HTTP event loop, off the engine's critical path.

Calling `loop.call_soon_threadsafe` from the engine writes to the loop's wake-up socket; the
loop thread wakes, takes the GIL and runs the request's response code, and the engine, back
from the write, waits for the GIL before it can start its next step: each token paid the
loop's turn (docs/serve.md, profile). Here the engine only puts the event on a SimpleQueue (no
system call, the GIL kept); a relay thread wakes the loop, so the loop's turn overlaps the
engine's next ONNX Runtime step, which runs without the GIL. Events that pile up meanwhile go
in one wake-up.
"""

from __future__ import annotations

import asyncio
import queue
import threading


class Relay:
    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, loop: asyncio.AbstractEventLoop, target: asyncio.Queue, event: tuple) -> None:
        """Deliver `event` to `target`, an asyncio.Queue of `loop` (any thread)."""
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="mistral-edge-relay", daemon=True)
                    self._thread.start()
        self._queue.put((loop, target, event))

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            by_loop: dict = {}
            for item in items:
                if item is None:
                    return _deliver_all(by_loop)
                by_loop.setdefault(item[0], []).append(item[1:])
            _deliver_all(by_loop)


def _deliver_all(by_loop: dict) -> None:
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # that event loop has closed
            pass


def _deliver(batch: list) -> None:
    for target, event in batch:
        target.put_nowait(event)
