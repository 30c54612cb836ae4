"""The comparison's outputs: one Row per variant, as a rich table, compare.json, compare.csv and compare.png.

Each file is written to a temporary name beside its target and renamed, so a
reader never sees a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from rich.table import Table


@dataclass(frozen=True)
class Row:
    quant: str
    backend: str  # "onnx", "torch" or "bitsandbytes"
    window: int | None
    model_bits_per_weight: float | None
    """Stored weight bits over the parameter count, whole model (scales and zero points included)."""
    size_bytes: int | None  # bundle on disk
    weight_bytes: int | None  # resident weights (manifest)
    kv_cache_bytes: int | None
    peak_rss_bytes: int | None  # of a fresh process running the speed benchmark
    perplexity: float | None
    kl_vs_fp32: float | None
    top1_vs_fp32: float | None
    prefill_tok_s: float | None
    decode_tok_s: float | None
    threads: int | None
    ctx: int | None = None
    n_windows: int | None = None
    scored_tokens: int | None = None
    text: str | None = None
    sinks: int | None = None
    pool: int | None = None  # of the W slots, those keeping the most-attended keys (docs/cache.md)
    ppl_within_w: float | None = None
    """Perplexity of the predictions made from positions < W (nothing evicted yet: exact)."""
    ppl_beyond_w: float | None = None
    """Perplexity of those made from positions >= W (the window, and its sinks, in effect); None when ctx <= W."""
    note: str = ""


    @classmethod
    def unmeasured(cls, quant: str, backend: str, note: str) -> "Row":
        """A row that says why a variant could not be measured here."""
        return cls(quant, backend, *[None] * (len(FIELDS) - 3), note=note)


FIELDS = [f.name for f in fields(Row)]


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(rows: list[Row], path: Path) -> None:
    _atomic_write(path, (json.dumps([asdict(r) for r in rows], indent=2) + "\n").encode())


def write_csv(rows: list[Row], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in asdict(r).items()} for r in rows)
    _atomic_write(path, buf.getvalue().encode())


def write_png(rows: list[Row], path: Path) -> None:
    """Perplexity against bundle size; marker area and colour show decode tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    pts = [r for r in rows if r.size_bytes and r.perplexity is not None]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    speeds = [r.decode_tok_s or 0.0 for r in pts]
    top = max(speeds, default=0.0) or 1.0
    sc = ax.scatter([r.size_bytes / 2**20 for r in pts], [r.perplexity for r in pts], c=speeds, cmap="viridis",
                    s=[60 + 440 * v / top for v in speeds], edgecolors="black", linewidths=0.5, zorder=3)
    for r in pts:
        ax.annotate(_label(r, rows), (r.size_bytes / 2**20, r.perplexity), textcoords="offset points",
                    xytext=(8, 6), fontsize=8)
    ref = next((r for r in rows if r.backend == "torch" and r.quant == "fp32" and r.perplexity), None)
    if ref is not None:
        ax.axhline(ref.perplexity, color="grey", linestyle="--", linewidth=0.8, label="PyTorch fp32 reference")
        ax.legend(loc="upper right", fontsize=8)
    fig.colorbar(sc, ax=ax, label="decode tokens/s")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("bundle size on disk (MiB, log scale)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Quality against size; marker size and colour: decode speed", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    _atomic_write(path, buf.getvalue())


def _label(row: Row, rows: list[Row]) -> str:
    """The quant name, plus W, the sinks and the pool when the rows sweep several."""
    swept = lambda key: len({getattr(r, key) for r in rows if r.backend == "onnx"}) > 1  # noqa: E731
    return row.quant + (f" W={row.window}" if swept("window") else "") + (f" S={row.sinks}" if swept("sinks") else "") \
        + (f" P={row.pool}" if swept("pool") else "")


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table(rows: list[Row], title: str = "") -> Table:
    t = Table(title=title or None)
    for name, justify in (("quant", "left"), ("backend", "left"), ("W", "right"), ("sinks", "right"), ("pool", "right"),
                          ("bits/w", "right"),
                          ("size MiB", "right"), ("weights MiB", "right"), ("KV MiB", "right"),
                          ("peak RSS MiB", "right"), ("PPL", "right"), ("ΔPPL", "right"), ("PPL <W", "right"),
                          ("PPL ≥W", "right"), ("KL", "right"),
                          ("top-1", "right"), ("prefill tok/s", "right"), ("decode tok/s", "right"),
                          ("threads", "right")):
        t.add_column(name, justify=justify)
    base = next((r.perplexity for r in rows if r.backend == "onnx" and r.quant == "fp32" and r.kl_vs_fp32 == 0), None)
    for r in rows:
        if r.perplexity is None and r.note:
            t.add_row(r.quant, r.backend, *["-"] * 16, style="dim")
            continue
        delta = None if base is None or r.perplexity is None else 100 * (r.perplexity / base - 1)
        t.add_row(r.quant, r.backend, _num(r.window, "d"), _num(r.sinks, "d"), _num(r.pool, "d"),
                  _num(r.model_bits_per_weight, ".2f"),
                  _mib(r.size_bytes), _mib(r.weight_bytes), _mib(r.kv_cache_bytes), _mib(r.peak_rss_bytes),
                  _num(r.perplexity, ".3f"), _num(delta, "+.2f") + ("%" if delta is not None else ""),
                  _num(r.ppl_within_w, ".3f"), _num(r.ppl_beyond_w, ".3f"),
                  _num(None if r.kl_vs_fp32 is None else max(r.kl_vs_fp32, 0.0), ".5f"),  # rounding: -1e-9 shows as 0
                  _num(r.top1_vs_fp32, ".2%"), _num(r.prefill_tok_s, ".1f"), _num(r.decode_tok_s, ".1f"),
                  _num(r.threads, "d"))
    return t


def write_all(rows: list[Row], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "compare.json", out / "compare.csv", out / "compare.png"]
    for writer, path in zip((write_json, write_csv, write_png), paths):
        writer(rows, path)
    return paths
