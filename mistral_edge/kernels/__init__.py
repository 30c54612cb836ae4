"""The native ONNX Runtime kernel for `mistral_edge::WindowedGroupQueryAttention` and its sink and
int8-cache variants, over fp32, fp16 and int8 caches (docs/kernel.md).

A custom-op library; a session that registers it runs the attention nodes natively, while the
graph keeps the portable function body for every other runtime. Built by `make install`
(`python -m mistral_edge.kernels.build`); absent or stale, the function body runs.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "wgqa.cc", HERE / "wgqa_impl.cc", HERE / "wgqa.h")
OUT = HERE / "build" / "libmistral_edge_wgqa.so"


def unavailable_reason() -> str | None:
    """Why the library cannot be used, in one line, or None when it can."""
    if not OUT.is_file():
        return "native attention kernel not built (run `make install`)"
    sources = [s.stat().st_mtime for s in SOURCES if s.is_file()]  # an installed copy may lack them
    if OUT.stat().st_mtime < max(sources, default=0):
        return "native attention kernel is older than its sources (run `make install` again)"
    return None


def library_path() -> Path | None:
    """The built library, or None (`unavailable_reason()` says why)."""
    return None if unavailable_reason() else OUT


def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(OUT))  # the same handle ONNX Runtime's dlopen gets
    lib.MistralEdgeWgqaIsa.restype = ctypes.c_char_p
    lib.MistralEdgeWgqaCalls.restype = ctypes.c_uint64
    return lib


def isa() -> str:
    """The compute variant the library picks on this CPU: avx512, avx2 or portable."""
    return _lib().MistralEdgeWgqaIsa().decode()


def calls() -> int:
    """Attention nodes the library has computed in this process (tests use it to prove it ran)."""
    return _lib().MistralEdgeWgqaCalls()
