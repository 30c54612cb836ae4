"""`serve --moderate`: runtime/moderate.py's Guard on a session of its own, off the event loop.

The engine's worker thread owns the engine's sessions, so the moderator has its own batch-1
session (on the engine's model: serve/source.py) and its own thread: checks run one at a time, in the order they came, while the engine
goes on decoding other requests. Checks beyond `limit` waiting are refused (Busy), never parked.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from ..runtime.moderate import Guard
from .engine import Busy


class Moderation:
    def __init__(self, guard: Guard, limit: int):
        self.guard, self.limit = guard, limit
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mistral-edge-moderation")
        self._pending = 0  # touched on the event loop only

    @property
    def refusal(self) -> str:
        return self.guard.refusal

    @property
    def checks_input(self) -> bool:
        return self.guard.mode != "output"

    @property
    def checks_output(self) -> bool:
        return self.guard.checks_output

    async def refuses_request(self, text: str) -> bool:
        return self.checks_input and await self._run(self.guard.refuses_request, text)

    async def refuses_reply(self, text: str, reply: str) -> bool:
        return self.checks_output and await self._run(self.guard.refuses_reply, text, reply)

    async def _run(self, check, *args) -> bool:
        if self._pending >= self.limit:
            raise Busy(f"server busy: {self._pending} moderation checks already waiting; retry later")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, check, *args)
        finally:
            self._pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
