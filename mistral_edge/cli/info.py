"""`mistral-edge info`: what a model is and what it costs on a device (weights and KV cache)."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from ..contract import KV_CACHES, attention_note
from ..targets.request import check_window
from .options import ModelArg, TrustPickleOpt, WindowOpt


def _bytes(n: int) -> str:
    return f"{n:,} B ({n / 2**20:,.2f} MiB)"


def info(model: ModelArg = None, window: WindowOpt = None, trust_pickle: TrustPickleOpt = False) -> None:
    """Show a model's config, parameter count, weight bytes and KV-cache bytes (per cache type)."""
    check_window(window, None)
    from ..model.loaders import load_checkpoint  # torch: only for commands that load checkpoints
    from ..targets.budget import kv_cache_bytes

    ck = load_checkpoint(model, trust_pickle=trust_pickle)
    trained_window = ck.config.sliding_window
    ck.config = cfg = ck.config.with_window(window)
    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in cfg.to_dict().items():
        table.add_row(key, str(value))
    table.add_row("parameters", f"{ck.n_params:,}")
    per_dtype: Counter[str] = Counter()
    for name in ck.weights:  # from the headers: info reads no tensor data
        meta = ck.weights.meta(name)
        per_dtype[str(meta.dtype).removeprefix("torch.")] += meta.nbytes
    for dtype, n in sorted(per_dtype.items()):
        table.add_row(f"weights {dtype}", _bytes(n))
    W = cfg.sliding_window
    trained, cache = attention_note(trained_window, W)
    table.add_row("trained with", trained)
    table.add_row("attention", cache + ("" if trained_window else "; export adds attention sinks (--sinks) and can keep a pool of the most-attended tokens (--pool)"))
    for kv_cache in KV_CACHES:  # export --kv-cache: the bytes of one slot of each layer's K and V
        per_token = kv_cache_bytes(cfg, 1, kv_cache)
        table.add_row(f"KV per token {kv_cache}", _bytes(per_token))
        table.add_row(f"KV for W={W} {kv_cache}" if W else f"KV for window {kv_cache}",
                      _bytes(per_token * W) if W else "no window: give --window")
    console = Console()
    console.print(f"{ck.source} ({ck.source_format})", highlight=False, soft_wrap=True)
    console.print(table)

