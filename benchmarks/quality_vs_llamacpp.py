"""Our int8 and int4 against llama.cpp's 4-bit GGUF quants on one checkpoint, by compare's protocol (issue 12).

    python benchmarks/quality_vs_llamacpp.py /tmp/smol-rot --n-windows 8     # PYTHONPATH = the checkout

One table: fp32, our int8, default int4 and calibrated int4 (--calibrated, any spec compare takes),
then llama.cpp's f32 GGUF, Q4_0, Q4_0 + imatrix, Q4_K_S, Q4_K_M and Q4_K_M + imatrix (--llama-types).
Protocol, the same for every row: --text (default WikiText-2 test) tokenized once by the checkpoint's
tokenizer without BOS, the first --n-windows windows of --ctx tokens, each from an empty cache, all
logits, every token but a window's first scored; calibration and the imatrix read --calib (default
WikiText-2 valid) only. Our rows run through `mistral_edge.compare.run.run_compare` (ONNX Runtime).
llama.cpp's rows are its own tools from the vendored llama.cpp that benchmarks/setup_peers.sh builds
(`convert_hf_to_gguf.py` to f32, `llama-imatrix`, `llama-quantize`), scored through llama-cpp-python:
one model per GGUF, a fresh llama_context per window, the window's token ids (the same ids as ours)
decoded in one batch with logits for every position, then compare's own `quality.evaluate` (same
perplexity, same KL code). Each GGUF is scored in a child process, so a crash is a row that says so.

Columns: bits/weight over the whole model (ours: compare's figure; llama.cpp: 8 x the bytes of every
tensor's data in the GGUF over the number of elements of every tensor, norms included, which are
0.02% of them), size on disk, PPL, ΔPPL against our fp32 row, KL and top-1 against that system's
own fp32 (ours: the fp32 ONNX export; llama.cpp: its f32 GGUF), and the row's wall seconds.
Intermediate files (f32 GGUF, imatrix, quantized GGUFs, our bundles) are kept under --cache, keyed by
the checkpoint's content hash, and reused: the run says which it reused.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
WIKITEXT = DATA / "wikitext-2"
LLAMA_BUILD = Path(os.environ.get("LLAMA_CPP_BUILD", "/work/peers/llama.cpp"))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mistral-edge" / "quality-vs-llamacpp"
LLAMA_TYPES = "Q4_0,Q4_0+imatrix,Q4_K_S,Q4_K_M,Q4_K_M+imatrix"
DEFAULT_CALIBRATED = "int4-gptq"
"""The calibrated row: GPTQ on the sensitivity-chosen plan (docs/quantization.md: the best calibrated int4)."""
OMP_WAIT = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
"""For llama.cpp's OpenMP threads: sleeping between ops, not spinning, keeps its tools and scoring
fast on a shared machine (10x and more here under load); it changes no number in the table."""


@dataclass
class Line:
    """One row of the table."""

    system: str
    bits: float | None = None
    size_bytes: int | None = None
    perplexity: float | None = None
    kl: float | None = None
    top1: float | None = None
    seconds: float = 0.0
    note: str = ""


class PhaseClock:
    """Stands in for rich's Progress inside run_compare: prints each phase with its wall time and adds
    the seconds up per variant (a task's second word is the variant's name)."""

    def __init__(self):
        self._open: dict[int, tuple[str, float]] = {}
        self._ids = itertools.count()
        self.seconds: Counter[str] = Counter()

    def add_task(self, description: str, total=None) -> int:
        task = next(self._ids)
        self._open[task] = (description, time.perf_counter())
        return task

    def update(self, task: int, description: str) -> None:
        self.remove_task(task)
        self._open[task] = (description, time.perf_counter())

    def advance(self, task: int) -> None:
        pass

    def remove_task(self, task: int) -> None:
        description, start = self._open.pop(task)
        dt = time.perf_counter() - start
        words = description.split()
        if len(words) > 1:
            self.seconds[words[1]] += dt
        log(f"  {description}: {dt:.1f} s")


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def timed(what: str, cmd: list[str], out: Path, env: dict | None = None) -> float:
    """Run a llama.cpp tool that writes `out`, through a temporary name so a stopped run leaves no
    file that a later run would reuse. Returns its wall seconds."""
    tmp = out.with_name(f"{out.stem}.tmp{out.suffix}")  # llama-imatrix picks its format by the suffix
    cmd = [str(tmp) if c == str(out) else c for c in cmd]
    start = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env={**(env or os.environ), **OMP_WAIT})
    if r.returncode:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"error: {what} failed (exit {r.returncode}): {' '.join(cmd)}\n{r.stdout[-3000:]}")
    tmp.rename(out)
    dt = time.perf_counter() - start
    log(f"  {what}: {dt:.1f} s -> {out}")
    return dt


# ---------------------------------------------------------------- llama.cpp's files


@dataclass(frozen=True)
class Tools:
    build: Path
    source: Path  # the llama.cpp tree (convert_hf_to_gguf.py, gguf-py)

    @classmethod
    def find(cls, build: Path) -> Tools:
        cache = build / "CMakeCache.txt"
        if not cache.is_file():
            raise SystemExit(f"error: no llama.cpp build at {build}: run benchmarks/setup_peers.sh "
                             "(or pass --llama-cpp BUILD_DIR)")
        source = next((Path(line.split("=", 1)[1].strip()) for line in cache.read_text().splitlines()
                       if line.startswith("CMAKE_HOME_DIRECTORY:")), None)
        tools = cls(build, source or Path())
        missing = [p for p in (tools.bin("llama-quantize"), tools.bin("llama-imatrix"),
                               tools.source / "convert_hf_to_gguf.py") if not p.is_file()]
        if missing:
            raise SystemExit(f"error: the llama.cpp build lacks {', '.join(map(str, missing))}: "
                             "run benchmarks/setup_peers.sh")
        return tools

    def bin(self, name: str) -> Path:
        return self.build / "bin" / name


def reuse(path: Path) -> bool:
    if path.is_file():
        log(f"  reused {path}")
        return True
    return False


def f32_gguf(tools: Tools, model: Path, work: Path) -> tuple[Path, float]:
    out = work / "f32.gguf"
    if reuse(out):
        return out, 0.0
    env = {**os.environ, "PYTHONPATH": str(tools.source / "gguf-py")}  # llama.cpp's gguf-py, not the installed one
    return out, timed("convert_hf_to_gguf.py --outtype f32", [sys.executable, str(tools.source / "convert_hf_to_gguf.py"),
                                                               str(model), "--outtype", "f32", "--outfile", str(out)],
                      out, env)


def imatrix(tools: Tools, f32: Path, calib: Path, work: Path, chunks: int, ctx: int, threads: int,
            calib_sha: str) -> tuple[Path, float]:
    out = work / f"imatrix-{calib_sha[:12]}-{chunks}x{ctx}.gguf"
    if reuse(out):
        return out, 0.0
    return out, timed(f"llama-imatrix ({chunks} chunks of {ctx} tokens of {calib.name})",
                      [str(tools.bin("llama-imatrix")), "-m", str(f32), "-f", str(calib), "-o", str(out),
                       "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks), "-t", str(threads),
                       "--no-repack", "--no-ppl"], out)


def quantized(tools: Tools, f32: Path, kind: str, imat: Path | None, work: Path, threads: int) -> tuple[Path, float]:
    out = work / (f"{kind}-{imat.stem}.gguf" if imat else f"{kind}.gguf")
    if reuse(out):
        return out, 0.0
    cmd = [str(tools.bin("llama-quantize"))] + (["--imatrix", str(imat)] if imat else []) + \
        [str(f32), str(out), kind, str(threads)]
    return out, timed(f"llama-quantize {kind}{' --imatrix' if imat else ''}", cmd, out)


def gguf_bits(path: Path) -> tuple[float, int, str]:
    """Bits per weight over the whole model (every tensor's stored bytes over every tensor's elements),
    the element count, and the tensor types with their counts."""
    from mistral_edge.model.loaders.gguf_header import read_header

    tensors = read_header(path).tensors.values()
    elements = sum(math.prod(t.shape) for t in tensors)
    types = Counter(t.ggml_type.name for t in tensors)
    return 8 * sum(t.n_bytes for t in tensors) / elements, elements, \
        ", ".join(f"{k} x{v}" for k, v in types.most_common())


# ---------------------------------------------------------------- scoring a GGUF by compare's protocol


class LlamaWindows:
    """A llama.cpp model behind the two calls compare's `quality.evaluate` makes of a session:
    reset() gives a fresh llama_context (an empty KV cache), step(tokens, all_logits=True) decodes
    the tokens in one batch and returns every position's logits [1, n, V]."""

    def __init__(self, path: Path, ctx: int, threads: int, repack: bool):
        import logging

        from llama_cpp import _internals, llama_cpp

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's log: errors only
        self._internals = _internals
        mp = llama_cpp.llama_model_default_params()
        mp.use_extra_bufts = repack  # weight repacking and the CPU's extra buffer types
        self.model = _internals.LlamaModel(path_model=str(path), params=mp, verbose=False)
        self.params = llama_cpp.llama_context_default_params()
        self.params.n_ctx = self.params.n_batch = self.params.n_ubatch = ctx
        self.params.n_threads = self.params.n_threads_batch = threads
        self.batch = _internals.LlamaBatch(n_tokens=ctx, embd=0, n_seq_max=1, verbose=False)
        self.vocab = self.model.n_vocab()
        self.window = ctx  # full attention over the window: every prediction is "within W"
        self.context = None
        self.n_past = 0

    def reset(self) -> None:
        if self.context is not None:
            self.context.close()
        self.context = self._internals.LlamaContext(model=self.model, params=self.params, verbose=False)
        self.n_past = 0

    def step(self, tokens, all_logits: bool = True):
        import numpy as np

        ids = [int(t) for t in tokens[0]]
        self.batch.set_batch(ids, n_past=self.n_past, logits_all=True)
        self.context.decode(self.batch)
        self.n_past += len(ids)
        return np.ctypeslib.as_array(self.context.get_logits(), shape=(1, len(ids), self.vocab)).copy()


def score_gguf(path: str, windows, reference, record: bool, threads: int, repack: bool, conn) -> None:
    """Child process: score one GGUF; send back (perplexity, kl, top1) and, when recording, the
    reference's per-window grid parameters (its codes go to the shared scratch file)."""
    os.environ.update(OMP_WAIT)  # before llama.cpp's libraries load
    from mistral_edge.compare.quality import evaluate

    session = LlamaWindows(Path(path), windows.shape[1], threads, repack)
    q = evaluate(session, windows, windows.shape[1], reference, record)
    stored = (reference.low, reference.step, reference.top1) if record else None
    conn.send((q.perplexity, q.kl_vs_fp32, q.top1_vs_fp32, stored))
    conn.close()


def score_in_child(path: Path, windows, reference, record: bool, threads: int, repack: bool):
    """(perplexity, kl, top1) or a string saying how the child ended (a signal is named)."""
    import signal

    mp = multiprocessing.get_context("spawn")  # llama.cpp's and torch's OpenMP runtimes are not fork-safe
    recv, send = mp.Pipe(duplex=False)
    child = mp.Process(target=score_gguf, args=(str(path), windows, reference, record, threads, repack, send))
    child.start()
    send.close()
    try:
        result = recv.recv()
    except EOFError:
        result = None
    child.join()
    if result is None:
        code = child.exitcode
        return f"crashed ({signal.Signals(-code).name})" if code and code < 0 else f"failed (exit {code})"
    ppl, kl, top1, stored = result
    if stored is not None:
        reference.low[:], reference.step[:], reference.top1[:] = stored
    return ppl, kl, top1


# ---------------------------------------------------------------- the run


def our_rows(args, calib_path: Path, work: Path) -> list[Line]:
    from mistral_edge.compare.run import CompareRequest, run_compare

    quants = f"fp32,int8,int4,{args.calibrated}"
    req = CompareRequest(model=str(args.model), quants=quants, text=args.text, calib=calib_path, ctx=args.ctx,
                         n_windows=args.n_windows, threads=args.threads, runs=1, out=work / "compare",
                         torch_rows=False, prompt_tokens=16, decode_tokens=8)  # speed is not this table's
    clock = PhaseClock()
    rows = run_compare(req, progress=clock, log=lambda line: log("  " + line))
    return [Line(f"ours {r.quant}", r.model_bits_per_weight, r.size_bytes, r.perplexity, r.kl_vs_fp32,
                 r.top1_vs_fp32, clock.seconds[r.quant], r.note) for r in rows]


def llama_rows(args, tools: Tools, calib_path: Path, calib_sha: str, work: Path, windows, vocab: int) -> list[Line]:
    from mistral_edge.compare.quality import ReferenceStore

    f32, seconds = f32_gguf(tools, args.model, work)
    jobs: list[tuple[str, Path, float]] = [("f32", f32, seconds)]
    imat = None
    for kind in args.llama_types.split(","):
        base, _, extra = kind.partition("+")
        if extra and imat is None:
            imat, seconds = imatrix(tools, f32, calib_path, work, args.imatrix_chunks, args.ctx, args.threads,
                                    calib_sha)
            jobs[0] = (jobs[0][0], jobs[0][1], jobs[0][2] + seconds)  # counted once, with the f32 row
        path, seconds = quantized(tools, f32, base, imat if extra else None, work, args.threads)
        jobs.append((kind, path, seconds))
    reference = ReferenceStore(work / "llama-f32-reference.u16", len(windows), windows.shape[1] - 1, vocab)
    lines = []
    try:
        for i, (kind, path, seconds) in enumerate(jobs):
            bits, _, types = gguf_bits(path)
            start = time.perf_counter()
            result = score_in_child(path, windows, reference, i == 0, args.threads, args.repack)
            seconds += time.perf_counter() - start
            log(f"  scored llama.cpp {kind}: {time.perf_counter() - start:.1f} s")
            line = Line(f"llama.cpp {kind}", bits, path.stat().st_size, seconds=seconds, note=types)
            if isinstance(result, str):
                line.note = f"{result}; {types}"
                if i == 0:
                    raise SystemExit(f"error: llama.cpp's f32 GGUF {result} while scoring; no reference for KL")
            else:
                line.perplexity, line.kl, line.top1 = result
            lines.append(line)
    finally:
        reference.path.unlink(missing_ok=True)
    return lines


def table(lines: list[Line], fp32_ppl: float) -> str:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    out = ["| system | bits/weight (whole model) | size MiB | PPL | ΔPPL vs fp32 | KL vs own fp32 | top-1 | s |",
           "|---|---|---|---|---|---|---|---|"]
    for ln in lines:
        delta = None if ln.perplexity is None else 100 * (ln.perplexity / fp32_ppl - 1)
        out.append(f"| {ln.system} | {num(ln.bits, '.2f')} | "
                   f"{num(None if ln.size_bytes is None else ln.size_bytes / 2**20, '.1f')} | "
                   f"{num(ln.perplexity, '.3f')} | {'-' if delta is None else f'{delta:+.2f}%'} | "
                   f"{num(ln.kl, '.4f')} | {num(None if ln.top1 is None else 100 * ln.top1, '.1f')}% | "
                   f"{ln.seconds:.0f} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a Hugging Face checkpoint directory (what convert_hf_to_gguf.py reads)")
    ap.add_argument("--text", type=Path, default=WIKITEXT / "wiki.test.tokens", help="evaluation text (UTF-8)")
    ap.add_argument("--calib", type=Path, default=WIKITEXT / "wiki.valid.tokens",
                    help="calibration text for our calibrated int4 and llama.cpp's imatrix")
    ap.add_argument("--n-windows", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calibrated", default=DEFAULT_CALIBRATED, help="our calibrated int4 (any compare spec)")
    ap.add_argument("--llama-types", default=LLAMA_TYPES, help="llama.cpp rows after f32; +imatrix: with the imatrix")
    ap.add_argument("--imatrix-chunks", type=int, default=8, help="chunks of --ctx tokens of --calib for the imatrix")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repack", action="store_true",
                    help="let llama.cpp repack weights (extra buffer types); off by default: it crashed here")
    ap.add_argument("--llama-cpp", type=Path, default=LLAMA_BUILD, help="llama.cpp's cmake build directory")
    ap.add_argument("--cache", type=Path, default=CACHE, help="where intermediate files are kept and reused")
    ap.add_argument("--skip-ours", action="store_true", help="llama.cpp's rows only (no ΔPPL base: our fp32)")
    args = ap.parse_args()

    from mistral_edge.compare.text import read_text, token_windows
    from mistral_edge.compare.variants import parse_quants
    from mistral_edge.errors import EdgeError
    from mistral_edge.targets.bundle import source_hash
    from mistral_edge.tokenizer import Tokenizer

    try:
        parse_quants(args.calibrated)  # any spec compare takes (-gptq, -awq, -awq-gptq)
        if not (args.model / "config.json").is_file():
            raise EdgeError(f"{args.model}: not a Hugging Face checkpoint directory (no config.json)")
        tools = Tools.find(args.llama_cpp)
        text, calib = read_text(args.text), read_text(args.calib)
        if text.sha256 == calib.sha256:
            raise EdgeError("--calib is the evaluation text")
        windows = token_windows(Tokenizer.from_files(args.model).encode(text.text, add_bos=False),
                                args.ctx, args.n_windows)
        vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    work = args.cache / f"{args.model.resolve().name}-{source_hash(str(args.model))[:12]}"
    work.mkdir(parents=True, exist_ok=True)
    log(f"cache: {work}; llama.cpp: {tools.build} (source {tools.source}); "
        f"{len(windows)} windows of {args.ctx} tokens of {text.name}; calibration: {calib.name}")
    started = time.perf_counter()
    lines = []
    if not args.skip_ours:
        log("our rows (mistral_edge.compare.run_compare, ONNX Runtime):")
        lines += our_rows(args, args.calib, work)
    log("llama.cpp rows:")
    lines += llama_rows(args, tools, args.calib, calib.sha256, work, windows, vocab)
    base = next((ln.perplexity for ln in lines if ln.system in ("ours fp32", "llama.cpp f32")), None)

    import llama_cpp

    print(f"\n{args.model}: {text.name}, {len(windows)} windows of {args.ctx} tokens "
          f"({len(windows) * (args.ctx - 1)} scored), {args.threads} threads, {time.perf_counter() - started:.0f} s")
    print(table(lines, base))
    print(f"\nllama.cpp: tools from {tools.source}, built in {tools.build}; scored by llama-cpp-python "
          f"{llama_cpp.__version__} (its own libllama), weight repacking {'on' if args.repack else 'off'} "
          f"(use_extra_bufts={args.repack}); imatrix: {args.imatrix_chunks} chunks of {args.ctx} tokens of "
          f"{calib.name}. Tensor types:")
    for ln in lines:
        if ln.system.startswith("llama.cpp"):
            print(f"- {ln.system}: {ln.note}")
    print(f"machine: {platform.processor() or platform.machine()}, load: {os.getloadavg()[0]:.1f} (1 min) at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
