"""The torch backend on a GPU against transformers `generate`: decode speed, time to first token, memory.

Mistral-7B-v0.1 shapes with random weights created on the device (never transferred). Rows:
ours (captured steps over the W-slot rolling cache; bf16 compiled, bf16 graph-only, weight-only
int8/int4 on aten kernels, bitsandbytes int8/nf4 eager) and transformers (dynamic cache, static
cache + its torch.compile, bitsandbytes int8/nf4 as the same bnb modules). Per context (a 128-token
prompt, 8K tokens, and for ours-bf16 also 1K and 32K): time to first token (the prefill), decode
tok/s (greedy, after a warm-up run), peak GPU memory; compile and capture time apart (the first
run's extra seconds). Each row runs in its own process under a hard time limit, writes its JSON as
it goes (a killed row keeps what it measured) and the whole run stops launching rows at --budget-s.
Row files go to --work; --out receives results.json alone (rewritten after every row), since the
device machine returns at most 8 files.

    python3 benchmarks/gpu_vs_hf.py --out $OUT            # on the GPU machine, <= 9 minutes
    python3 benchmarks/gpu_vs_hf.py --tiny --out /tmp/gpu  # tiny shapes on a CPU: every code path once
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class Row:
    name: str
    engine: str  # "ours" or "hf"
    quant: str  # none, int8-wo, int4-wo (ours), int8, nf4 (bitsandbytes, both)
    budget_s: float  # hard limit of the row's process
    decode: int  # decode tokens per measured run
    contexts: tuple[int, ...] = (128, 8192)
    compile: bool = False  # ours: the decode step compiled (inductor) before capture; hf: the static cache + compile
    static: bool = False  # hf: static cache
    fused: bool = False  # ours int8-wo: the gpt-fast dequantize-then-matmul form instead of the aten kernel


ROWS = [  # in the order they run: the most wanted figures first
    Row("ours-bf16", "ours", "none", 120, 128, (128, 1024, 8192, 32768), compile=True),
    Row("hf-static-compile-bf16", "hf", "none", 130, 64, compile=True, static=True),
    Row("hf-dynamic-bf16", "hf", "none", 45, 64),
    Row("ours-int4-wo", "ours", "int4-wo", 75, 128, compile=True),
    Row("ours-int8-wo", "ours", "int8-wo", 75, 128, compile=True),
    Row("hf-bnb-nf4", "hf", "nf4", 40, 32),
    Row("ours-bnb-nf4", "ours", "nf4", 40, 32),
    Row("hf-bnb-int8", "hf", "int8", 45, 32),
    Row("ours-bnb-int8", "ours", "int8", 45, 32),
    Row("ours-int8-wo-fused", "ours", "int8-wo", 75, 128, compile=True, fused=True),
    Row("ours-bf16-graph", "ours", "none", 40, 128),
]
CHECK_BUDGET_S = 60
"""The CUDA self-check run first (captured graph vs eager, aten int8/int4 vs dequantized)."""
STARTUP_RESERVE_S = 25
"""A row is not launched with less time left than this (interpreter, torch and CUDA start-up)."""


@dataclass(frozen=True)
class Shapes:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 14336
    vocab_size: int = 32000
    window: int = 4096
    chunks: tuple[int, ...] = (128, 512)  # prefill chunk sizes captured (the largest is the chunk)


TINY = Shapes(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=512, window=64,
              chunks=(8, 32))


def tiny_contexts(contexts: tuple[int, ...]) -> tuple[int, ...]:
    """The tiny run's contexts, scaled to W = 64: 128 -> 8 tokens, 1K -> 40, 8K -> 160, 32K -> 320 (wrapped 5 times)."""
    return tuple({128: 8, 1024: 40, 8192: 160}.get(n, 320) for n in contexts)


@dataclass
class Result:
    row: str
    device: str
    shapes: dict
    weights_bytes: int | None = None
    contexts: list[dict] = field(default_factory=list)
    first_run_s: float | None = None  # warm-up run: includes compile and capture
    note: str = ""


def peak_bytes(torch) -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def sync(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- ours -----------------------------------------------------------------------------------------


def ours_model(shapes: Shapes, device, dtype):
    import torch

    from mistral_edge.model.config import ModelConfig
    from mistral_edge.model.reference import ReferenceModel

    s = shapes
    cfg = ModelConfig(dim=s.dim, n_layers=s.n_layers, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, head_dim=s.head_dim,
                      hidden_dim=s.hidden_dim, vocab_size=s.vocab_size, sliding_window=s.window)
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim

    def rand(*shape):
        return torch.randn(shape, device=device, dtype=dtype) * 0.02

    w = {"tok_embeddings.weight": rand(s.vocab_size, s.dim), "norm.weight": torch.ones(s.dim, device=device, dtype=dtype),
         "output.weight": rand(s.vocab_size, s.dim)}
    for i in range(s.n_layers):
        p = f"layers.{i}."
        w |= {p + "attention.wq.weight": rand(q, s.dim), p + "attention.wk.weight": rand(kv, s.dim),
              p + "attention.wv.weight": rand(kv, s.dim), p + "attention.wo.weight": rand(s.dim, q),
              p + "feed_forward.w1.weight": rand(s.hidden_dim, s.dim), p + "feed_forward.w3.weight": rand(s.hidden_dim, s.dim),
              p + "feed_forward.w2.weight": rand(s.dim, s.hidden_dim),
              p + "attention_norm.weight": torch.ones(s.dim, device=device, dtype=dtype),
              p + "ffn_norm.weight": torch.ones(s.dim, device=device, dtype=dtype)}
    return ReferenceModel(cfg, w, dtype, device)


def run_ours(row: Row, shapes: Shapes, contexts, device, save) -> None:
    import numpy as np
    import torch

    from mistral_edge.model.bnb import BNB_QUANTS
    from mistral_edge.model.captured import CaptureConfig, CapturedSession
    from mistral_edge.model.torch_session import TorchSession, quantize

    dtype = torch.bfloat16
    model = ours_model(shapes, device, dtype)
    result = save.result
    result.weights_bytes = quantize(model, row.quant)
    if row.fused:
        for module in model.linears.values():
            module.fused = True
    chunk = max(shapes.chunks)
    if row.quant in BNB_QUANTS:
        session = TorchSession(model, shapes.window, chunk)
    else:
        backend = ("inductor" if device.type == "cuda" else "eager") if row.compile else None
        session = CapturedSession(model, shapes.window, chunk, config=CaptureConfig(
            sizes=(1, *shapes.chunks), compile=backend, compile_sizes=(1,)))
    result.note = (f"cache {session.cache.nbytes} B (W={shapes.window}); prefill chunks {shapes.chunks}; "
                   f"{'decode compiled ' + backend + ', ' if row.compile and row.quant not in BNB_QUANTS else ''}"
                   f"{'eager (bitsandbytes)' if row.quant in BNB_QUANTS else 'captured steps'}")
    rng = np.random.default_rng(0)

    def one(n_prompt: int, n_decode: int) -> tuple[float, float]:
        session.reset()
        prompt = rng.integers(0, shapes.vocab_size, (1, n_prompt))
        sync(torch)
        t0 = time.perf_counter()
        for s in range(0, n_prompt, chunk):
            logits = session.step(prompt[:, s:s + chunk])
        t1 = time.perf_counter()
        for _ in range(n_decode):
            logits = session.step(np.asarray([[int(logits[0, -1].argmax())]]))
        return t1 - t0, time.perf_counter() - t1

    t = time.perf_counter()
    one(min(shapes.chunks) + chunk, 4)  # every captured size once: compile and capture happen here
    result.first_run_s = time.perf_counter() - t
    save()
    for n in contexts:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        ttft, decode_s = one(n, row.decode)
        result.contexts.append({"context": n, "ttft_s": ttft, "decode_tok_s": row.decode / decode_s,
                                "peak_bytes": peak_bytes(torch)})
        save()


# ---- transformers ---------------------------------------------------------------------------------


class Clock:
    """A generate streamer that records when each token arrives (the first put is the prompt)."""

    def __init__(self, torch):
        self.torch, self.times = torch, []

    def put(self, value) -> None:
        sync(self.torch)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_model(shapes: Shapes, quant: str, device, dtype):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from mistral_edge.model.bnb import bnb_linear

    s = shapes
    cfg = MistralConfig(hidden_size=s.dim, intermediate_size=s.hidden_dim, num_hidden_layers=s.n_layers,
                        num_attention_heads=s.n_heads, num_key_value_heads=s.n_kv_heads, head_dim=s.head_dim,
                        vocab_size=s.vocab_size, sliding_window=s.window, max_position_embeddings=32768)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MistralForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    if quant != "none":  # the bitsandbytes modules transformers' integration would put there, head excluded
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        setattr(parent, name, bnb_linear(child.weight.data, quant, dtype, device.type))
    return model


def run_hf(row: Row, shapes: Shapes, contexts, device, save) -> None:
    import torch

    model = hf_model(shapes, row.quant, device, torch.bfloat16)
    result = save.result
    result.weights_bytes = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
    kwargs = {"cache_implementation": "static"} if row.static else {}
    result.note = ("static cache (sized to prompt + new tokens); generate compiles the forward on CUDA"
                   if row.static else "dynamic cache") + f"; transformers {__import__('transformers').__version__}"
    gen = torch.Generator().manual_seed(0)

    def one(n_prompt: int, n_decode: int) -> tuple[float, float]:
        ids = torch.randint(0, shapes.vocab_size, (1, n_prompt), generator=gen).to(device)
        clock = Clock(torch)
        sync(torch)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_decode, min_new_tokens=n_decode,
                           do_sample=False, streamer=clock, pad_token_id=0, **kwargs)
        return clock.times[1] - t0, (n_decode - 1) / (clock.times[-1] - clock.times[1])

    for n in contexts:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        one(n, row.decode)  # warm-up: a static cache's shape is prompt + new tokens, so compile happens per context
        first = time.perf_counter() - t
        ttft, rate = one(n, row.decode)
        result.contexts.append({"context": n, "ttft_s": ttft, "decode_tok_s": rate, "peak_bytes": peak_bytes(torch),
                                "first_run_s": first})
        save()


# ---- the CUDA self-check --------------------------------------------------------------------------


def run_check(out: Path, device) -> dict:
    """Captured CUDA graphs against eager over 3W steps, and the aten int8/int4 kernels against the
    dequantized weights, on tiny shapes: the GPU numbers below mean nothing if these fail."""
    import numpy as np
    import torch

    from mistral_edge.model.captured import CaptureConfig, CapturedSession
    from mistral_edge.model.torch_session import TorchSession
    from mistral_edge.model.weight_only import Int4Linear, Int8Linear, dequantize_int4, quantize_int4, quantize_int8

    checks = {}
    model = ours_model(TINY, device, torch.bfloat16)
    captured = CapturedSession(model, TINY.window, 8, config=CaptureConfig(sizes=(1, 8)))
    eager = TorchSession(model, TINY.window, 8)
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, 8 + 3 * TINY.window)
    worst = float(np.abs(captured.step(tokens[None, :8]) - eager.step(tokens[None, :8])).max())
    for tok in tokens[8:]:
        worst = max(worst, float(np.abs(captured.step(np.array([[tok]])) - eager.step(np.array([[tok]]))).max()))
    checks["captured_vs_eager_max_abs"] = worst
    checks["captures"] = captured.captures
    checks["cuda_graphs"] = sum(s.graph is not None for s in captured.steps.values())
    torch.manual_seed(0)
    w, x = torch.randn(512, 1024, device=device), torch.randn(3, 1024, device=device, dtype=torch.bfloat16)
    q8, s8 = quantize_int8(w)
    q4, sz = quantize_int4(w, 128)
    for name, layer, deq in [("int8", Int8Linear(w, torch.bfloat16), q8.float() * s8[:, None]),
                             ("int4", Int4Linear(w, torch.bfloat16, 128, 8), dequantize_int4(q4, sz.bfloat16(), 128))]:
        ref = x.float() @ deq.T
        checks[f"{name}_rel_err"] = float((layer(x).float() - ref).abs().max() / ref.abs().max())
    checks["ok"] = (worst < 0.05 and checks["captures"] == 2 and checks["int8_rel_err"] < 0.02
                    and checks["int4_rel_err"] < 0.02)
    (out / "check.json").write_text(json.dumps(checks))
    return checks


# ---- the driver -----------------------------------------------------------------------------------


def child(args) -> None:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.row == "check":
        print(json.dumps(run_check(args.work, device)))
        return
    row = next(r for r in ROWS if r.name == args.row)
    shapes = TINY if args.tiny else Shapes()
    contexts = tiny_contexts(row.contexts) if args.tiny else row.contexts
    result = Result(row.name, torch.cuda.get_device_name() if device.type == "cuda" else "cpu", asdict(shapes))
    path = args.work / f"{row.name}.json"

    def save() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"row": asdict(row), **asdict(result)}, indent=1))
        tmp.replace(path)

    save.result = result
    (run_ours if row.engine == "ours" else run_hf)(row, shapes, contexts, device, save)


def launch(args, name: str, limit: float) -> tuple[str, float]:
    cmd = [sys.executable, __file__, "--row", name, "--work", str(args.work)] + (["--tiny"] if args.tiny else [])
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        status = "ok" if proc.returncode == 0 else \
            "failed: " + (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:300]
    except subprocess.TimeoutExpired:
        status = f"killed at its {limit:.0f} s limit"
    return status, time.perf_counter() - t


def summary(work: Path, statuses: dict) -> list[dict]:
    table = []
    for name, (status, seconds) in statuses.items():
        path = work / f"{name}.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        keys = ("device", "weights_bytes", "first_run_s", "contexts", "note") if name != "check" else tuple(data)
        table.append({"row": name, "status": status, "wall_s": round(seconds, 1), **{k: data.get(k) for k in keys}})
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-bench")), help="results.json goes here")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpu_vs_hf",
                    help="each row's own JSON, as it is measured")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (runs on a CPU)")
    ap.add_argument("--budget-s", type=float, default=530, help="no row is launched past this many seconds")
    ap.add_argument("--rows", help="comma-separated row names (default: all, in order)")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # a child process: run this one row
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.row:
        child(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.work.glob("*.json"):  # a row this run skips must not report an earlier run's figures
        old.unlink()
    start = time.perf_counter()
    names = args.rows.split(",") if args.rows else [r.name for r in ROWS]
    unknown = set(names) - {r.name for r in ROWS}
    if unknown:
        sys.exit(f"error: unknown rows {', '.join(sorted(unknown))}")
    budgets = {r.name: r.budget_s for r in ROWS} | {"check": CHECK_BUDGET_S}
    statuses = {}
    for name in ["check", *names]:
        left = args.budget_s - (time.perf_counter() - start)
        if left < STARTUP_RESERVE_S:
            statuses[name] = ("skipped: the run's time budget is spent", 0.0)
            continue
        statuses[name] = launch(args, name, min(budgets[name] * (3 if args.tiny else 1), left))
        print(f"{name}: {statuses[name][0]} ({statuses[name][1]:.0f} s)", flush=True)
        table = summary(args.work, statuses)
        (args.out / "results.json").write_text(json.dumps({"tiny": args.tiny, "wall_s": time.perf_counter() - start,
                                                           "rows": table}, indent=1))
    for r in table:
        for c in r.get("contexts") or []:
            peak = "n/a" if c["peak_bytes"] is None else f"{c['peak_bytes'] / 2**30:.2f} GiB"
            print(f"{r['row']:24} ctx {c['context']:>6}: decode {c['decode_tok_s']:8.1f} tok/s  "
                  f"ttft {c['ttft_s']:.3f} s  peak {peak}")


if __name__ == "__main__":
    main()
