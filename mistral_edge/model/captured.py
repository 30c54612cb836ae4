"""Captured steps over a static rolling cache: the torch backend's decode and prefill on a GPU.

A rolling cache of exactly W slots is a fixed shape whatever the position, so a step of
C tokens is one fixed computation: its inputs (tokens, valid lengths) live in static
device buffers copied into before each step, the cache's slot indices, masks and RoPE
angles are computed on the device from the cache's position tensor, and the cache is
written in place. Nothing the step computes depends on a Python-side position, so one
capture per chunk size serves every position, past W and on.

Why `torch.cuda.CUDAGraph` directly rather than torch.compile(mode="reduce-overhead"):
the cache is several tensors mutated in place on every step; CUDA-graph trees treat a
mutated graph input as a reason to skip the graph unless it is a module buffer, while a
manual capture replays exactly these buffers with no heuristic in between, and the
capture count is ours to check. torch.compile stays available underneath (`compile`: its
fused kernels are what the graph records), so the two are orthogonal.

On a CPU there is no graph: the same static buffers are fed to the same (optionally
compiled) step, which is what the CPU tests check, capture count included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .bnb import BNB_QUANTS
from .cache import RollingKVCache, quantize_rows
from .reference import ReferenceModel
from .torch_session import TorchSession

WARMUP_STEPS = 3
"""Eager runs on a side stream before a capture (cuBLAS workspaces, a compiled step's first call)."""


@dataclass(frozen=True)
class CaptureConfig:
    sizes: tuple[int, ...] = (1,)  # chunk sizes run as captured steps (1: decode); other chunks run eagerly
    compile: str | Callable | None = None  # torch.compile backend applied before capture (None: eager kernels)
    compile_sizes: tuple[int, ...] | None = None  # the sizes compiled (None: all of `sizes`)
    graphs: bool | None = None  # record CUDA graphs; None: when the model is on a CUDA device


class StaticRollingCache(RollingKVCache):
    """The rolling cache with a fixed-shape write: the slots of positions pos + i for every token of
    the chunk, padding rewriting what its slot held (an int8 cache's scales too), so no Python int
    of a position is read."""

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, n_valid: torch.Tensor) -> None:
        B, _, C, _ = k.shape
        i = torch.arange(C, device=k.device)
        slots = self.slots_of(self.pos[:, None] + i)  # [B, C], distinct per row as C <= W - sinks
        rows = torch.arange(B, device=k.device)[:, None]
        keep = (i < n_valid[:, None])[:, :, None, None]
        int8 = self.kv_cache == "int8"
        for buf, scales, new in ((self.k[layer], self.k_scale, k), (self.v[layer], self.v_scale, v)):
            new = new.transpose(1, 2)  # [B, C, Hkv, D]
            if int8:
                new, scale = quantize_rows(new)
                scales[layer][rows, :, slots] = torch.where(keep, scale, scales[layer][rows, :, slots])
            buf[rows, :, slots] = torch.where(keep, new.to(buf.dtype), buf[rows, :, slots])

    def clear(self) -> None:
        """Back to position 0 in place: captured steps keep pointing at these buffers."""
        self.pos.zero_()
        for t in self.k + self.v + self.k_scale + self.v_scale:
            t.zero_()


class CapturedStep:
    """One chunk size: static input buffers, and the step captured on first use."""

    def __init__(self, model: ReferenceModel, cache: StaticRollingCache, batch: int, size: int,
                 config: CaptureConfig, pool=None):
        dev = model.device
        self.tokens = torch.zeros((batch, size), dtype=torch.long, device=dev)
        self.valid = torch.zeros(batch, dtype=torch.long, device=dev)
        run = bound_step(model, cache)
        compiled = config.compile is not None and (config.compile_sizes is None or size in config.compile_sizes)
        self.run = torch.compile(run, backend=config.compile, fullgraph=True, dynamic=False) if compiled else run
        self.graphs = dev.type == "cuda" if config.graphs is None else config.graphs
        self.pool, self.graph, self.out, self.captured = pool, None, None, False

    def __call__(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if not self.captured:
            self.capture()
        self.tokens.copy_(tokens)
        self.valid.copy_(valid)
        if self.graph is None:
            return self.run(self.tokens, n_valid=self.valid)
        self.graph.replay()
        return self.out

    def capture(self) -> None:
        """Warm up and record the step with valid lengths 0: those runs write no slot and advance nothing."""
        self.captured = True
        self.valid.zero_()
        if not self.graphs:
            self.run(self.tokens, n_valid=self.valid)  # a compiled step compiles here
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.run(self.tokens, n_valid=self.valid)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.out = self.run(self.tokens, n_valid=self.valid)


def bound_step(model: ReferenceModel, cache: StaticRollingCache):
    """model.forward over `cache` as a plain function of (tokens, n_valid), the one torch.compile sees."""
    def run(tokens: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        return model.forward(tokens, cache, n_valid)
    return run


class CapturedSession(TorchSession):
    """TorchSession whose chunks of a captured size run captured; a shorter chunk is padded up
    to the next captured size (its padding is invalid, so it writes nothing), a longer one runs eagerly."""

    def __init__(self, model: ReferenceModel, window: int, chunk: int, batch: int = 1,
                 config: CaptureConfig = CaptureConfig(), sinks: int = 0, kv_cache: str | None = None):
        super().__init__(model, window, chunk, batch, sinks, kv_cache)
        pool = torch.cuda.graph_pool_handle() if model.device.type == "cuda" else None
        self.steps = {size: CapturedStep(model, self.cache, batch, size, config, pool)
                      for size in sorted(set(config.sizes)) if 0 < size <= window - sinks}

    @property
    def captures(self) -> int:
        return sum(s.captured for s in self.steps.values())

    def new_cache(self) -> StaticRollingCache:
        c = self.model.cfg
        return StaticRollingCache(c.n_layers, self.batch, c.n_kv_heads, self.window, c.head_dim, self.model.dtype,
                                  self.sinks, self.model.device, self.kv_cache)

    def reset(self) -> None:
        self.cache.clear()

    def run(self, tokens: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        B, C = tokens.shape
        valid = torch.full((B,), C, dtype=torch.long, device=tokens.device) if valid is None else valid
        size = min((s for s in self.steps if s >= C), default=None)
        if size is None:
            return self.model.forward(tokens, self.cache, valid)
        padded = torch.nn.functional.pad(tokens, (0, size - C)) if size > C else tokens
        return self.steps[size](padded, valid.clamp(max=C))[:, :C]


def open_session(model: ReferenceModel, window: int, chunk: int, quant: str, compile: bool = False,
                 kv_cache: str | None = None) -> TorchSession:
    """The torch backend's session: eager on a CPU; captured decode and prefill steps on a GPU or with
    `compile`, except under bitsandbytes (LLM.int8 picks its outlier columns on the host every step)."""
    if quant in BNB_QUANTS or not (model.device.type == "cuda" or compile):
        return TorchSession(model, window, chunk, kv_cache=kv_cache)
    return CapturedSession(model, window, chunk, kv_cache=kv_cache,
                           config=CaptureConfig(sizes=(1, chunk), compile="inductor" if compile else None))
