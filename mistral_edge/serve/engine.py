"""The server's generation engine: one worker thread, a bounded queue, batched decode, cached conversations.

Two sessions share the work. A batch-1 session prefills each new request (one chunk per loop
turn, so running requests keep decoding meanwhile) and decodes alone when only one request runs;
a batch-B session decodes several requests a token each per step. A request moves between them
as a SessionState (snapshot.py), which is also what a finished chat leaves in the conversation
cache: a later request whose tokens extend a cached conversation restores it and prefills only
the new tokens. Requests beyond B running and `queue` waiting are refused (Busy), never parked.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import EdgeError, first_line
from ..runtime.generate import LogitsProcessor
from ..runtime.sampling import Sampler, SamplingParams
from ..tokenizer import StreamDecoder
from .snapshot import SessionState, TokenHistory, capture, restore


class Busy(Exception):
    """The queue is full."""


@dataclass(frozen=True)
class EngineConfig:
    batch: int = 4  # requests decoded together (1: one at a time)
    queue: int = 16  # requests waiting beyond those running
    max_prompt: int = 8192  # prompt tokens
    max_tokens: int = 4096  # completion tokens per request
    cache_bytes: int = 512 << 20  # cached conversations' caches, in all
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("batch", "max_prompt", "max_tokens"):
            if getattr(self, name) < 1:
                raise EdgeError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.queue < 0 or self.cache_bytes < 0:
            raise EdgeError("queue and cache size must be >= 0")


@dataclass(eq=False)
class Job:
    """One request. `on_event` (called from the worker thread) gets ('text', str) pieces, then
    ('done', finish_reason, usage) or ('error', message)."""

    ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    on_event: Callable[..., None]
    stop: tuple[str, ...] = ()
    reuse: bool = False  # look up and leave behind a cached conversation
    processor: LogitsProcessor | None = None  # e.g. the grammar of a response_format (runtime/constrain.py)
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Text:
    """A reply's text in final pieces: a piece is held back while it could still begin a stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...], continuation: bool = False):
        self.decoder = StreamDecoder(tokenizer, continuation)
        self.stops = stops
        self.hold = max(map(len, stops), default=1) - 1
        self.text, self.sent = "", 0

    def add(self, token: int) -> tuple[str, bool]:
        """(text now final, whether a stop string ended the reply)."""
        return self._scan(self.decoder.add(token), final=False)

    def flush(self) -> tuple[str, bool]:
        return self._scan(self.decoder.flush(), final=True)

    def _scan(self, new: str, final: bool) -> tuple[str, bool]:
        self.text += new
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        upto = min(hits) if hits else len(self.text) if final else len(self.text) - self.hold
        piece, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return piece, bool(hits)


class _Run:
    """A request being served: where its state lives, what it has fed and generated."""

    def __init__(self, job: Job, tokenizer, fed: list[int], sampler: Sampler):
        self.job, self.sampler = job, sampler
        self.fed = fed  # tokens in its cache
        self.todo = job.ids[len(fed):]  # prompt tokens still to prefill
        self.cached = len(fed)
        self.generated: list[int] = []
        self.text = _Text(tokenizer, job.stop, continuation=job.processor is not None)
        self.row = -1  # its row in the batch session, or -1: in the batch-1 session
        self.next = -1  # the sampled token to feed next

    def usage(self) -> dict:
        n, g = len(self.job.ids), len(self.generated)
        return {"prompt_tokens": n, "completion_tokens": g, "total_tokens": n + g,
                "prompt_tokens_details": {"cached_tokens": self.cached}}


class Engine:
    """Serves `source`: a runtime Bundle, or anything with its `tokenizer()` and
    `session(threads=, batch=)` (cli/serve.py's checkpoint on the PyTorch reference)."""

    def __init__(self, source, config: EngineConfig = EngineConfig()):
        self.config = config
        self.tokenizer = source.tokenizer()
        self.single = source.session(threads=config.threads)
        self.multi = source.session(threads=config.threads, batch=config.batch) if config.batch > 1 else None
        self.window = self.single.window
        self.stops = set(self.tokenizer.eos_ids)
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._runs: list[_Run] = []
        self._prefill: _Run | None = None  # in the batch-1 session, taking its prompt chunk by chunk
        self._conversations: OrderedDict[int, SessionState] = OrderedDict()
        self._keys = itertools.count()
        self._closed = False
        self.generated = 0  # tokens generated since start, all requests together
        self.batched_steps = 0  # decode steps that served several requests at once
        self._thread = threading.Thread(target=self._loop, name="mistral-edge-engine", daemon=True)
        self._thread.start()

    # --- the request side (any thread) -------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise EdgeError("the engine is shut down")
            if len(self._waiting) >= self.config.queue and self._busy():
                raise Busy(f"server busy: {len(self._waiting)} requests already queued; retry later")
            self._waiting.append(job)
            self._lock.notify()

    def _busy(self) -> bool:
        return len(self._runs) + (self._prefill is not None) >= self.config.batch

    def stats(self) -> dict:
        with self._lock:
            return {"running": len(self._runs) + (self._prefill is not None), "queued": len(self._waiting),
                    "cached_conversations": len(self._conversations), "generated_tokens": self.generated,
                    "batched_steps": self.batched_steps}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=30)

    # --- the worker thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or self._waiting or self._runs or self._prefill):
                    self._lock.wait()
                if self._closed:
                    break
                job = self._waiting.popleft() if self._waiting and self._prefill is None and not self._busy() else None
            try:
                self._turn(job)
            except Exception as e:  # a failing step must not take the server down with it
                self._drop_all(first_line(e), [job] if job else [])
        self._drop_all("server shutting down", list(self._waiting))

    def _drop_all(self, message: str, jobs: list[Job]) -> None:
        """Fail every run (and `jobs`) with `message` and start afresh."""
        runs = [*self._runs, *([self._prefill] if self._prefill else [])]
        for job in [r.job for r in runs if r.job not in jobs] + jobs:
            job.on_event("error", message)
        self._runs, self._prefill = [], None
        self.single.reset()
        if self.multi:
            self.multi.reset()

    def _turn(self, job: Job | None) -> None:
        for run in [r for r in self._runs if r.job.cancelled.is_set()]:
            self._finish(run, None)
        if self._prefill and self._prefill.job.cancelled.is_set():
            self._prefill = None
        if job is not None and not job.cancelled.is_set():
            self._start(job)
        prefilled = self._prefill is not None and self._prefill_chunk()
        if self._runs and not (prefilled and self._row_for_next()):
            self._decode()

    def _row_for_next(self) -> bool:
        """Whether a waiting request can start now: then a prompt just prefilled waits for it, and
        the batch fills before it decodes (a step with one busy row of B costs most of a full one)."""
        with self._lock:
            return bool(self._waiting) and not self._busy()

    def _start(self, job: Job) -> None:
        """Move a lone decoding run out of the batch-1 session, then restore or reset it for `job`."""
        for run in self._runs:
            if run.row < 0:
                self._move(run, self._free_row())
        state = self._lookup(job.ids) if job.reuse else None
        if state is None:
            self.single.reset()
            fed = []
        else:
            restore(self.single, 0, state)
            fed = list(job.ids[:state.history.count])
        self._prefill = _Run(job, self.tokenizer, fed, Sampler(job.sampling))

    def _prefill_chunk(self) -> bool:
        """Feed the next chunk of the prompt being prefilled; True once it is all in."""
        run = self._prefill
        piece, run.todo = run.todo[:self.single.chunk], run.todo[self.single.chunk:]
        logits = self.single.step(np.asarray([piece], np.int64))[0, -1]
        run.fed += piece
        if run.todo:
            return False
        self._prefill = None
        self._runs.append(run)
        if self.multi is not None and len(self._runs) > 1:
            self._move(run, self._free_row())
        self._advance(run, logits)
        return True

    def _decode(self) -> None:
        alone = len(self._runs) == 1 and self._runs[0].row < 0
        if not alone and len(self._runs) == 1 and self._prefill is None:
            self._move(self._runs[0], -1)  # back to the cheaper batch-1 session
            alone = True
        if alone:
            run = self._runs[0]
            logits = self.single.step(np.asarray([[run.next]], np.int64))
            run.fed.append(run.next)
            self._advance(run, logits[0, -1])
            return
        tokens = np.zeros((self.multi.batch, 1), np.int64)
        valid = np.zeros(self.multi.batch, np.int64)
        for run in self._runs:
            tokens[run.row, 0], valid[run.row] = run.next, 1
            run.fed.append(run.next)
        logits = self.multi.step(tokens, valid)
        self.batched_steps += 1
        for run in list(self._runs):
            self._advance(run, logits[run.row, -1])

    def _advance(self, run: _Run, logits: np.ndarray) -> None:
        """Sample the next token from `logits` and pass on its text; finish on EOS, a stop string
        or the token budget (the last token sampled is then not fed: the cache holds `fed`)."""
        processor = run.job.processor
        token = run.sampler(logits if processor is None else processor(logits), run.fed)
        if token in self.stops:
            return self._finish(run, "stop")
        complete = processor is not None and not processor.accept(token)
        run.generated.append(token)
        self.generated += 1
        piece, stopped = run.text.add(token)
        if piece:
            run.job.on_event("text", piece)
        if stopped or complete:
            return self._finish(run, "stop")
        if len(run.generated) >= run.job.max_tokens:
            return self._finish(run, "length")
        run.next = token

    def _finish(self, run: _Run, reason: str | None) -> None:
        """End a run: pass on held-back text, keep its conversation, free its place (reason None: cancelled)."""
        self._runs.remove(run)
        if reason is None:
            return
        piece, stopped = run.text.flush()
        if piece:
            run.job.on_event("text", piece)
        if run.job.reuse and self.config.cache_bytes:
            session, row = (self.single, 0) if run.row < 0 else (self.multi, run.row)
            self._keep(capture(session, row, TokenHistory.of(run.fed, self.window)))
        run.job.on_event("done", reason if not stopped else "stop", run.usage())

    # --- moving states between sessions and the conversation cache ---------------------------

    def _free_row(self) -> int:
        taken = {r.row for r in self._runs}
        return next(i for i in range(self.multi.batch) if i not in taken)

    def _move(self, run: _Run, row: int) -> None:
        """Carry a run's cache to batch-session row `row`, or to the batch-1 session (row -1)."""
        src, src_row = (self.single, 0) if run.row < 0 else (self.multi, run.row)
        state = capture(src, src_row, TokenHistory.of(run.fed, self.window))
        restore(self.single if row < 0 else self.multi, max(row, 0), state)
        run.row = row

    def _keep(self, state: SessionState) -> None:
        if state.nbytes > self.config.cache_bytes:
            return
        self._conversations[next(self._keys)] = state
        while sum(s.nbytes for s in self._conversations.values()) > self.config.cache_bytes:
            self._conversations.popitem(last=False)  # the least recently used

    def _lookup(self, ids: list[int]) -> SessionState | None:
        """Take out the cached conversation sharing the longest prefix with `ids` (at least one
        token must remain to prefill, for the next logits)."""
        best, best_key = None, None
        for key, state in self._conversations.items():
            n = min(state.history.common_prefix(ids), len(ids) - 1)
            usable = state.truncated(n, self.window) if n > 0 else None
            if usable is not None and (best is None or n > best.history.count):
                best, best_key = usable, key
        if best_key is not None:
            del self._conversations[best_key]
        return best
