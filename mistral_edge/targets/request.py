"""The whole export request, typed and checked when it is made: a bad target, quant, format,
activation type, KV cache type, window, chunk or device memory is refused before a checkpoint is loaded
(a 7B model takes minutes to load). Checks that need the model (its own window, the memory
budget) stay with write_bundle.

Torch-free at import (the runtime's `generate --bundle` checks --chunk with check_window); the
exporter's own lists of formats, activation types and MLC's scheme are read when a request is made.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..contract import check_kv_cache, ring_span
from ..errors import EdgeError
from ..quantize.spec import Calibration, QuantSpec, check_calibration, parse_quant
from .profiles import TargetProfile, parse_memory

MAX_WINDOW = 1 << 20
"""The most KV-cache slots (W) or chunk tokens asked for: past a million tokens a cache, or the
attention scores of one chunk, would not fit any device this toolkit targets."""


def check_window(window: int | None, chunk: int | None, sinks: int | None = None, pool: int | None = None) -> None:
    """--window, --chunk, --sinks and --pool as given (None: the model's or the default), before any model is read."""
    for name, value in (("window", window), ("chunk size", chunk)):
        if value is not None and not (isinstance(value, int) and 0 < value <= MAX_WINDOW):
            raise EdgeError(f"{name} must be an integer between 1 and {MAX_WINDOW:,}, got {value}")
    if sinks is not None and not (isinstance(sinks, int) and 0 <= sinks < (window or MAX_WINDOW)):
        raise EdgeError(f"sinks must be an integer between 0 and {(window or MAX_WINDOW) - 1:,}, got {sinks}")
    if pool is not None and not (isinstance(pool, int) and 0 <= pool < (window or MAX_WINDOW) - (sinks or 0)):
        raise EdgeError(f"pool must be an integer between 0 and {(window or MAX_WINDOW) - (sinks or 0) - 1:,} "
                        f"(the window minus its sinks, minus 1), got {pool}")
    ring = (window or 0) - (sinks or 0) - (pool or 0)
    if window is not None and chunk is not None and chunk > ring:
        raise EdgeError(f"chunk size must be between 1 and {ring_span(window, sinks or 0, pool or 0)}, got {chunk}")


@dataclass(frozen=True)
class BundleRequest:
    """What to export for which target; the options left None take the target's (or the model's) value."""

    target: TargetProfile
    quant: QuantSpec
    window: int | None = None
    chunk: int | None = None
    device_memory: str | None = None  # overrides the target's default budget
    fmt: str | None = None  # overrides the target's weight format: one of export.pipeline.FORMATS
    activations: str | None = None  # "fp32" | "fp16": overrides the target's activation dtype
    sinks: int | None = None  # attention sinks; None: export.pipeline.resolve_sinks' default
    kv_cache: str | None = None  # "fp32" | "fp16" | "int8": the KV cache's storage; None: the activation type
    calib: Calibration | None = None  # calibration text: GPTQ codes for the int4 tensors (quantize/calibrate.py)
    pool: int | None = None  # of the W slots, those keeping the most-attended keys that left the ring; None: resolve_pool's

    def __post_init__(self) -> None:
        from ..export.onnx_builder import activation_type
        from ..export.pipeline import check_format

        check_window(self.window, self.chunk, self.sinks, self.pool)
        if self.calib is not None:
            check_calibration(self.calib, self.quant, self.target.name)
        if self.device_memory is not None:
            parse_memory(self.device_memory)
        if self.activations is not None:
            activation_type(self.activations)
        check_kv_cache(self.kv_cache_type, self.activation_dtype)
        if self.target.name == "mlc":
            self._check_mlc()
        else:
            check_format(self.weight_format, self.activation_dtype)

    def _check_mlc(self) -> None:
        """MLC writes its own q4f16_1 (int4 in groups of 32, symmetric, fp16 activations) for every
        matrix: asking for anything else would be silently ignored, so it is refused."""
        from .mlc import GROUP_SIZE as MLC_GROUP_SIZE, QUANTIZATION as MLC_QUANTIZATION

        mlc_like = {parse_quant(self.target.quant), parse_quant(f"int4-g{MLC_GROUP_SIZE}-sym-rtn")}
        if self.sinks or self.pool:
            raise EdgeError("the mlc target has no attention sinks or pool (MLC's own runtime): use --sinks 0, "
                            "no --pool, or another target")
        if self.quant not in mlc_like or self.fmt is not None or \
                self.activation_dtype != self.target.activation_dtype or self.kv_cache_type != "fp16":
            raise EdgeError(f"the mlc target writes MLC's {MLC_QUANTIZATION} (int4, groups of {MLC_GROUP_SIZE}, "
                            f"symmetric, fp16 activations and KV cache) only: use --quant int4 (the default), no "
                            f"--format, no --activations fp32 and no --kv-cache")

    @property
    def weight_format(self) -> str:
        """nbits, qdq or integer (the target's unless --format), or MLC's own q4f16_1."""
        return self.fmt or self.target.fmt

    @property
    def activation_dtype(self) -> str:
        return self.activations or self.target.activation_dtype

    @property
    def kv_cache_type(self) -> str:
        """The cache's storage: --kv-cache, else the activation type."""
        return self.kv_cache or self.activation_dtype
