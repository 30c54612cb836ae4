"""The server's generation engine: one worker thread, a bounded queue, batched decode and prefill, cached conversations.

Two sessions share the work: a batch-1 session and a batch-B one. Each loop turn takes every
waiting request there is a row for and then steps (_step): when prompts still prefilling hold more
than half the rows, they go through one batch-B step together, padded to the longest chunk (the
graph's per-row valid lengths), and rows that are decoding feed their next token in the same step
as one valid token of it; otherwise the oldest prompt prefills in the batch-1 session, one chunk a
turn, while the decoding rows take a token each in a batch-B step beside it; a request running
alone decodes in the batch-1 session, which costs less per token. A request moves between the
sessions as a SessionState (snapshot.py), which is also what a finished chat leaves in the
conversation cache: a later request whose tokens extend a cached conversation restores it and
prefills only the new tokens. Requests beyond B running and `queue` waiting are refused (Busy),
never parked.
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

    def __init__(self, job: Job, tokenizer, fed: list[int], sampler: Sampler, start: SessionState):
        self.job, self.sampler = job, sampler
        self.fed = fed  # tokens in its cache
        self.todo = job.ids[len(fed):]  # prompt tokens still to prefill
        self.cached = len(fed)
        self.generated: list[int] = []
        self.text = _Text(tokenizer, job.stop, continuation=job.processor is not None)
        self.start: SessionState | None = start  # the state it begins from, until it is given a place
        self.row: int | None = None  # its row in the batch session, -1: the batch-1 session, None: no place yet
        self.next = -1  # the sampled token to feed next

    @property
    def batched(self) -> bool:
        return self.row is not None and self.row >= 0

    def piece(self, chunk: int) -> list[int]:
        """What it feeds in the next step: its next prompt chunk, or once prefilled its next token."""
        return self.todo[:chunk] if self.todo else [self.next]

    def usage(self) -> dict:
        n, g = len(self.job.ids), len(self.generated)
        return {"prompt_tokens": n, "completion_tokens": g, "total_tokens": n + g,
                "prompt_tokens_details": {"cached_tokens": self.cached}}


class Engine:
    """Serves `source`: anything with a `tokenizer()` and `session(threads=, batch=)`: a runtime
    Bundle (a model loaded per session), or serve/source.py's OneModel (one model for every session)."""

    def __init__(self, source, config: EngineConfig = EngineConfig()):
        self.config = config
        self.tokenizer = source.tokenizer()
        self.single = source.session(threads=config.threads)
        self.multi = source.session(threads=config.threads, batch=config.batch) if config.batch > 1 else None
        self.window = self.single.window
        self.stops = set(self.tokenizer.eos_ids)
        self._empty = capture(self.single, 0, TokenHistory.of([], self.window))  # a new conversation's state
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._runs: list[_Run] = []  # every request started, prefilling or decoding, oldest first
        self._conversations: OrderedDict[int, SessionState] = OrderedDict()
        self._keys = itertools.count()
        self._closed = False
        self.generated = 0  # tokens generated since start, all requests together
        self.batched_steps = 0  # steps that served several requests at once
        self.batched_prefills = 0  # steps that prefilled several prompts at once
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
        return len(self._runs) >= self.config.batch

    def stats(self) -> dict:
        with self._lock:
            return {"running": len(self._runs), "queued": len(self._waiting),
                    "cached_conversations": len(self._conversations), "generated_tokens": self.generated,
                    "batched_steps": self.batched_steps, "batched_prefills": self.batched_prefills}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=30)

    # --- the worker thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or self._waiting or self._runs):
                    self._lock.wait()
                if self._closed:
                    break
                jobs = []  # every waiting request there is a row for: requests arriving together start together
                while self._waiting and len(self._runs) + len(jobs) < self.config.batch:
                    jobs.append(self._waiting.popleft())
            try:
                self._turn(jobs)
            except Exception as e:  # a failing step must not take the server down with it
                self._drop_all(first_line(e), jobs)
        self._drop_all("server shutting down", list(self._waiting))

    def _drop_all(self, message: str, jobs: list[Job]) -> None:
        """Fail every run (and `jobs`) with `message` and start afresh."""
        for job in [r.job for r in self._runs if r.job not in jobs] + jobs:
            job.on_event("error", message)
        self._runs = []
        self.single.reset()
        if self.multi:
            self.multi.reset()

    def _turn(self, jobs: list[Job]) -> None:
        for run in [r for r in self._runs if r.job.cancelled.is_set()]:
            self._finish(run, None)
        for job in jobs:
            if not job.cancelled.is_set():
                self._start(job)
        if self._runs:
            self._step()

    def _start(self, job: Job) -> None:
        """A run for `job`, from the cached conversation it extends or from nothing (placed by _step)."""
        state = self._lookup(job.ids) if job.reuse else None
        fed = list(job.ids[:state.history.count]) if state else []
        self._runs.append(_Run(job, self.tokenizer, fed, Sampler(job.sampling), state or self._empty))

    def _step(self) -> None:
        """One turn's steps. Prompts still prefilling in more than half the rows: everything in one
        batch-session step, each prompt its next chunk and each decoding row its next token. Fewer:
        the oldest prompt's chunk in the batch-1 session, then a step of the batch session in which
        the decoding rows take a token and the other prompts wait. A request alone: the batch-1
        session. Why half: a batch step computes all B rows at the longest row's width, padding
        included, and on the CPU it costs about as much as B / 2 one-prompt steps (docs/serve.md)."""
        prompts = [r for r in self._runs if r.todo]
        if self.multi is None or len(self._runs) == 1:
            lead = self._runs[0]
        elif 2 * len(prompts) > self.multi.batch:
            lead = None
        else:
            lead = prompts[0] if prompts else None
        rest = [r for r in self._runs if r is not lead]
        self._arrange(lead, rest)
        if lead is not None:
            self._feed(self.single, [lead])
        batched = rest if lead is None else [r for r in rest if not r.todo]
        if batched:
            self._feed(self.multi, batched)

    def _feed(self, session, runs: list[_Run]) -> None:
        """One step of `session` in which each of `runs` (its rows) feeds its next piece; the other
        rows feed nothing (valid length 0: their caches and positions stay as they are)."""
        pieces = [r.piece(session.chunk) for r in runs]
        prompts = sum(bool(r.todo) for r in runs)
        tokens = np.zeros((session.batch, max(map(len, pieces))), np.int64)
        valid = np.zeros(session.batch, np.int64)
        for run, piece in zip(runs, pieces):
            row = max(run.row, 0)
            tokens[row, :len(piece)], valid[row] = piece, len(piece)
        logits = session.step(tokens, valid)
        self.batched_steps += int(len(runs) > 1)
        self.batched_prefills += int(prompts > 1)
        for run, piece in zip(runs, pieces):
            run.fed += piece
            if run.todo:
                run.todo = run.todo[len(piece):]
                if run.todo:
                    continue
            self._advance(run, logits[max(run.row, 0), -1])

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
            self._keep(capture(*self._where(run), TokenHistory.of(run.fed, self.window)))
        run.job.on_event("done", reason if not stopped else "stop", run.usage())

    # --- moving states between sessions and the conversation cache ---------------------------

    def _where(self, run: _Run) -> tuple:
        return (self.multi, run.row) if run.batched else (self.single, 0)

    def _arrange(self, lead: _Run | None, rest: list[_Run]) -> None:
        """Give `lead` the batch-1 session and each of `rest` a row of the batch session. A bundle's
        session that no run holds is reset first, so that its cache is read (all S slots it has grown
        to, runtime/session.py) at the length its new runs need, not at that of the longest before."""
        if rest and not any(r.batched for r in self._runs) and getattr(self.multi, "slots", 0):
            self.multi.reset()
        for run in rest:  # first, so that the batch-1 session is free before `lead` enters it
            if not run.batched:
                self._move(run, self._free_row())
        if lead is not None and lead.row != -1:
            self._move(lead, -1)

    def _free_row(self) -> int:
        taken = {r.row for r in self._runs if r.batched}
        return next(i for i in range(self.multi.batch) if i not in taken)

    def _move(self, run: _Run, row: int) -> None:
        """Put a run's state in batch-session row `row`, or in the batch-1 session (row -1)."""
        if run.row is None:
            state, run.start = run.start, None
        else:
            state = capture(*self._where(run), TokenHistory.of(run.fed, self.window))
        if row < 0 and getattr(self.single, "slots", 0):
            self.single.reset()  # it holds no other run
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
