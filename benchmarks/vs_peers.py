"""Speed and memory of mistral-edge against llama.cpp, ONNX Runtime GenAI and Optimum, side by side.

Same model (the demo SmolLM2-135M-Instruct), same threads, same prompt token ids for every
system. Speed: prefill tokens/s for 128- and 1024-token prompts, greedy decode tokens/s over
256 tokens after the 128-token prompt, and decode tokens/s after 4096 and 8192 tokens of
context (--long-contexts; ours with its W = 1024 rolling cache, the peers with a cache as big as
the context), medians of --runs rounds that alternate the systems. Memory: peak resident set of
a fresh process that generates --memory-tokens tokens (our cache stays at W slots; the peers
allocate or grow theirs to the whole context). Install the peers first with
benchmarks/setup_peers.sh; a missing peer stops the run with a non-zero exit.

llama.cpp runs in its fastest configuration that works here, found by short probes and printed:
weight repacking on unless a probe with it crashes, and the faster OMP_WAIT_POLICY. A worker that
dies is reported as crashed, with its signal, in every figure it did not give: never as slow or zero.

    python benchmarks/vs_peers.py            # about 30 minutes on 2 quiet cores, most of it the memory runs

The last line is `decode_ratio=X prefill_ratio=Y decode4096_ratio=.. decode8192_ratio=.. rss_ratio=Z`:
our int4 bundle over the faster peer (speed; prefill is the worse of the two prompt lengths) and
over the smaller peer (memory), leaving out (and naming) a peer that crashed.
The line before it gives the same ratios for our int8 bundle in the `integer` weight format
(MatMulInteger, per-token uint8 activations: the fast prefill; docs/kernel.md), and the line
before that the CPU and which u8s8 GEMM MLAS runs there (AMX, AVX512-VNNI, AVX-VNNI or AVX2).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
OPTIMUM_PYTHON = HERE / ".venv-optimum" / "bin" / "python"
WIKITEXT = Path("/work/shared/data/wikitext-2/wiki.test.tokens")
PEERS = ("llama.cpp", "ort-genai")  # the speed peers; optimum is measured for memory only
SETUP = "run benchmarks/setup_peers.sh"
OUR_BUNDLES = (("int4", None), ("int8", None), ("int8", "integer"))
"""(quant, weight format; None: the cpu target's) of our rows: the integer format's int8 runs MatMulInteger."""


@dataclass(frozen=True)
class System:
    name: str  # as printed
    kind: str  # a key of peers.SYSTEMS
    model: Path
    python: str = sys.executable
    chunk: int | None = None
    flags: tuple[str, ...] = ()  # extra peers.py options (llama.cpp: --no-repack)


@dataclass
class Speed:
    """Raw seconds per run; the figures are medians over runs."""

    system: str
    prefill: dict[int, list[float]] = field(default_factory=dict)  # prompt length -> seconds per run
    decode: list[float] = field(default_factory=list)
    long: dict[int, list[float]] = field(default_factory=dict)  # context length -> seconds per run of steps
    crashed: str = ""  # how its worker ended, when it did: its figures are missing, never slow or zero

    def prefill_tps(self, n: int) -> float:
        return n / statistics.median(self.prefill[n])

    def decode_tps(self, n: int) -> float:
        return n / statistics.median(self.decode)

    def long_tps(self, context: int, n: int) -> float:
        return n / statistics.median(self.long[context])


@dataclass(frozen=True)
class Memory:
    system: str
    peak_rss: int  # bytes
    loaded_rss: int  # resident after loading, before the first token
    seconds: float  # to generate the tokens
    crashed: str = ""  # how the worker ended, when it did


class PeerMissing(Exception):
    pass


class WorkerDied(Exception):
    """A system's worker process ended mid-run; str() says how (a signal by name)."""


# ---------------------------------------------------------------- models, built once into --work


def demo_gguf() -> Path:
    from mistral_edge.model.loaders.default import default_model_path

    return default_model_path()


def our_bundle(work: Path, quant: str, chunk: int | None, fmt: str | None = None) -> Path:
    """Our cpu bundle of the demo model in weight format `fmt` (None: the target's); re-exported
    when the exporter's code or the contract changed."""
    from mistral_edge.compare.variants import prepare_bundle
    from mistral_edge.export.pipeline import resolve_window
    from mistral_edge.model.loaders import load_checkpoint
    from mistral_edge.quantize.spec import parse_quant
    from mistral_edge.targets.bundle import source_hash

    ck = load_checkpoint(None)
    window, chunk = resolve_window(ck, None, chunk)
    out = work / ("-".join(("ours", quant, fmt)) if fmt else f"ours-{quant}")
    print(f"our {quant} cpu bundle -> {out} (exported unless up to date)", file=sys.stderr)
    prepare_bundle(ck, parse_quant(quant), window, chunk, out, source_hash(ck.source), log=lambda line: None, fmt=fmt)
    return out


def hf_dir(work: Path, max_position: int) -> Path:
    """The demo checkpoint as a Hugging Face Llama directory (fp32 safetensors), the input of the
    ORT GenAI model builder and of Optimum's export. The weights are the GGUF's, dequantized by our
    loader; canonical wq/wk rows are already in HF order. max_position_embeddings is raised so the
    peers' RoPE tables cover the memory run's context (RoPE itself is unchanged)."""
    import torch
    from safetensors.torch import save_file

    from mistral_edge.model.loaders import hf, load_checkpoint

    out = work / "hf"
    if (out / "config.json").is_file() and json.loads((out / "config.json").read_text())[
            "max_position_embeddings"] >= max_position:
        return out
    shutil.rmtree(out, ignore_errors=True)
    print(f"writing the demo model as a Hugging Face directory -> {out}", file=sys.stderr)
    ck = load_checkpoint(None)
    c = ck.config
    to_hf = {canon: name for name, canon in hf._TOP_MAP.items()}
    to_hf.update({f"layers.{i}.{canon}": f"model.layers.{i}.{name}"
                  for i in range(c.n_layers) for name, canon in hf._LAYER_MAP.items()})
    tmp = work / "hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({to_hf[k]: v.to(torch.float32).contiguous() for k, v in ck.weights.items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    eos = list(c.eos_ids)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": c.dim, "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tied_embeddings, "bos_token_id": c.bos_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos, "max_position_embeddings": max(c.max_position, max_position),
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok_json = ck.tokenizer_files["tokenizer.json"]
    shutil.copyfile(tok_json, tmp / "tokenizer.json")
    vocab = {t["id"]: t["content"] for t in json.loads(Path(tok_json).read_text())["added_tokens"]}
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": ck.chat_template,
        "bos_token": vocab.get(c.bos_id), "eos_token": vocab.get(eos[0]) if eos else None,
    }, indent=2))
    tmp.rename(out)
    return out


def genai_model(work: Path, hf: Path) -> Path:
    """ORT GenAI's model builder, int4 for the CPU EP, with its defaults (RTN, symmetric, blocks of 32,
    accuracy_level 4) plus prune_lm_head, which only drops unused prompt logits: the peer at its best."""
    out = work / "ort-genai-int4"
    config = out / "genai_config.json"
    context = json.loads((hf / "config.json").read_text())["max_position_embeddings"]
    if not config.is_file() or json.loads(config.read_text())["model"]["context_length"] < context:
        shutil.rmtree(out, ignore_errors=True)
        print(f"building the ORT GenAI int4 CPU model -> {out}", file=sys.stderr)
        _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
              "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache"), "--extra_options", "prune_lm_head=true"])
    return out


def optimum_model(work: Path, hf: Path) -> Path:
    """Optimum's standard ONNX export (fp32, text-generation-with-past), built in its own venv."""
    out = work / "optimum"
    if not (out / "model.onnx").is_file():
        print(f"exporting with Optimum -> {out}", file=sys.stderr)
        _run([str(OPTIMUM_PYTHON), "-m", "optimum.exporters.onnx", "--model", str(hf),
              "--task", "text-generation-with-past", str(out)])
    return out


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode:
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... failed:\n{r.stdout[-3000:]}")


def check_peers(memory: bool) -> None:
    """Every peer importable (Optimum only for the memory runs, the one place it is measured), or exit
    non-zero naming what is missing: a benchmark never skips one."""
    checks = {"llama.cpp (llama-cpp-python)": [sys.executable, "-c", "import llama_cpp"],
              "ONNX Runtime GenAI (onnxruntime-genai)": [sys.executable, "-c", "import onnxruntime_genai"]}
    if memory:
        checks["Optimum (optimum-onnx in benchmarks/.venv-optimum)"] = [str(OPTIMUM_PYTHON), "-c",
                                                                         "import optimum.onnxruntime"]
    missing = [name for name, cmd in checks.items()
               if not Path(cmd[0]).exists() or subprocess.run(cmd, capture_output=True).returncode]
    try:
        demo_gguf()
    except Exception as e:  # EdgeError with its own install hint
        missing.append(f"the demo model ({e})")
    if missing:
        raise PeerMissing("not installed: " + "; ".join(missing) + f": {SETUP}")


def prompts(tokenizer_json: Path, lengths: tuple[int, ...]) -> dict[int, list[int]]:
    """Token ids of WikiText-2 test text, cut to each length (the same ids go to every system)."""
    from tokenizers import Tokenizer

    if not WIKITEXT.is_file():
        raise SystemExit(f"error: {WIKITEXT} not found (the prompts are WikiText-2 test text)")
    ids = Tokenizer.from_file(str(tokenizer_json)).encode(WIKITEXT.read_text()[:200_000]).ids
    return {n: ids[:n] for n in lengths}


# ---------------------------------------------------------------- measuring


class Worker:
    """One system in its own process (see peers.py), answering timing commands."""

    def __init__(self, system: System, threads: int, n_ctx: int, memory: int = 0):
        cmd = [system.python, str(HERE / "peers.py"), system.kind, str(system.model),
               "--threads", str(threads), "--n-ctx", str(n_ctx)]
        cmd += ["--chunk", str(system.chunk)] if system.chunk else []
        cmd += list(system.flags)
        cmd += ["--memory", str(memory)] if memory else []
        self.system = system
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if not memory:
            self._reply()  # {"ready": true} once loaded
            self.pause()

    def pause(self) -> None:
        """Stop the process between its turns: an idle llama.cpp with OMP_WAIT_POLICY=active keeps
        its threads spinning, which would slow every other system it shares the cores with."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def ask(self, cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise WorkerDied(f"crashed ({signal.Signals(-code).name})" if code < 0 else f"exited ({code})")
        return json.loads(line)

    def close(self) -> None:
        self.resume()
        try:
            self.proc.stdin.close()
        except BrokenPipeError:  # it died first
            pass
        self.proc.wait()


def llama_system(gguf: Path, repack: str, wait: str, threads: int, prompt: dict[int, list[int]]) -> System:
    """llama.cpp in its fastest configuration that runs. Weight repacking: on (its default) unless
    `repack` is "off" or, for "auto", a probe worker with it dies on the benchmark's own commands.
    OMP_WAIT_POLICY (its OpenMP threads spinning or sleeping between ops): for "auto", whichever
    decodes faster in a short probe of each (on a shared machine spinning threads can lose 10x)."""
    flags: tuple[str, ...] = () if repack == "on" else ("--no-repack",)
    if repack == "auto":
        print("llama.cpp: probing weight repacking (its default) on this model", file=sys.stderr)
        try:
            probe_decode(System("llama.cpp", "llama.cpp", gguf, flags=("--omp-wait", "passive")), threads, prompt,
                         prefill=True)
            flags = ()
        except WorkerDied as e:
            print(f"llama.cpp with weight repacking {e}: measuring it with repacking off (use_extra_bufts=False)",
                  file=sys.stderr)
    if wait != "auto":
        return System("llama.cpp", "llama.cpp", gguf, flags=flags + ("--omp-wait", wait))
    tps = {w: probe_decode(System("llama.cpp", "llama.cpp", gguf, flags=flags + ("--omp-wait", w)), threads, prompt)
           for w in ("active", "passive")}
    best = max(tps, key=tps.get)
    print("llama.cpp OMP_WAIT_POLICY probe, decode tok/s: " + ", ".join(f"{w} {v:.1f}" for w, v in tps.items())
          + f": {best}", file=sys.stderr)
    return System("llama.cpp", "llama.cpp", gguf, flags=flags + ("--omp-wait", best))


def probe_decode(system: System, threads: int, prompt: dict[int, list[int]], n: int = 16,
                 prefill: bool = False) -> float:
    """Decode tokens/s of a fresh worker after a warm-up (with `prefill`, the benchmark's first
    commands: a decode after the short prompt and the long prefill)."""
    w = Worker(system, threads, n_ctx=max(prompt) + 64)
    w.resume()
    try:
        w.ask({"decode": prompt[min(prompt)], "n": 8})
        if prefill:
            w.ask({"prefill": prompt[max(prompt)]})
        return n / w.ask({"decode": prompt[min(prompt)], "n": n})["seconds"]
    finally:
        w.close()


def llama_note(system: System) -> str:
    f = system.flags
    wait = f[f.index("--omp-wait") + 1] if "--omp-wait" in f else "default"
    return (f"weight repacking {'off (use_extra_bufts=False)' if '--no-repack' in f else 'on'}, "
            f"OMP_WAIT_POLICY={wait}")


def measure_speed(systems: list[System], prompt: dict[int, list[int]], decode_n: int, runs: int,
                  threads: int) -> list[Speed]:
    """Median-ready timings; each round visits the systems in a rotated order, one figure at a time."""
    results = {s.name: Speed(s.name) for s in systems}
    decode_prompt = prompt[min(prompt)]
    workers = start(systems, threads, max(prompt) + decode_n + 8, results)

    def warm(w: Worker) -> None:  # first-run allocations and prepacking are not timed
        w.ask({"decode": decode_prompt, "n": 8})
        w.ask({"prefill": prompt[max(prompt)]})

    try:
        workers = each(workers, warm, results)
        for r in range(runs):
            order = workers[r % len(workers):] + workers[:r % len(workers)] if workers else []
            for n in prompt:
                order = each(order, lambda w, n=n: results[w.system.name].prefill.setdefault(n, []).append(
                    w.ask({"prefill": prompt[n]})["seconds"]), results)
            order = each(order, lambda w: results[w.system.name].decode.append(
                w.ask({"decode": decode_prompt, "n": decode_n})["seconds"]), results)
            workers = [w for w in workers if w in order]
            print(f"  round {r + 1}/{runs} done", file=sys.stderr)
    finally:
        for w in workers:
            w.close()
    return [results[s.name] for s in systems]


def start(systems: list[System], threads: int, n_ctx: int, results: dict[str, Speed]) -> list[Worker]:
    """A loaded worker per system; one that dies while loading is marked crashed."""
    workers = []
    for s in systems:
        try:
            workers.append(Worker(s, threads, n_ctx=n_ctx))
        except WorkerDied as e:
            results[s.name].crashed = str(e)
    return workers


def each(workers: list[Worker], ask, results: dict[str, Speed]) -> list[Worker]:
    """ask(w) for every worker in turn, the others stopped (Worker.pause); returns the workers
    still alive (a dead one's system is marked crashed)."""
    alive = []
    for w in workers:
        w.resume()
        try:
            ask(w)
            w.pause()
            alive.append(w)
        except WorkerDied as e:
            print(f"  {w.system.name} {e}", file=sys.stderr)
            results[w.system.name].crashed = str(e)
            w.close()
    return alive


def measure_long(systems: list[System], ids: list[int], contexts: tuple[int, ...], n: int, runs: int,
                 threads: int, results: list[Speed]) -> None:
    """Decode tokens/s after each context length: every worker is fed the first `context` ids (not
    timed), then rounds alternating the systems time `n` greedy steps each, continuing from where the
    last round stopped (so round r starts after context + r * n tokens)."""
    by_name = {s.system: s for s in results}
    live = [s for s in systems if not by_name[s.name].crashed]
    workers = start(live, threads, max(contexts) + runs * n + 16, by_name)
    try:
        for context in contexts:
            workers = each(workers, lambda w, context=context: print(
                f"  {w.system.name}: {context}-token context fed in "
                f"{w.ask({'context': ids[:context], 'reserve': runs * n + 8})['seconds']:.1f} s", file=sys.stderr),
                by_name)
            for r in range(runs):
                order = workers[r % len(workers):] + workers[:r % len(workers)] if workers else []
                order = each(order, lambda w, context=context: by_name[w.system.name].long.setdefault(context, []).append(
                    w.ask({"steps": n})["seconds"]), by_name)
                workers = [w for w in workers if w in order]
            print(f"  decode after {context} tokens: {runs} rounds done", file=sys.stderr)
    finally:
        for w in workers:
            w.close()


def measure_memory(system: System, prompt: list[int], n: int, threads: int) -> Memory:
    """A fresh process generates n tokens after the prompt and reports its peak RSS."""
    w = Worker(system, threads, n_ctx=len(prompt) + n + 8, memory=n)
    try:
        w.proc.stdin.write(json.dumps(prompt) + "\n")
        w.proc.stdin.flush()
        reply = w._reply()
    except (WorkerDied, BrokenPipeError) as e:
        w.close()
        return Memory(system.name, 0, 0, 0.0, crashed=str(e) if isinstance(e, WorkerDied) else "died")
    w.close()
    return Memory(system.name, reply["peak_rss"], reply["loaded_rss"], reply["seconds"])


# ---------------------------------------------------------------- report


@dataclass(frozen=True)
class Layout:
    """What was measured, for the table's headings and the ratios."""

    lengths: tuple[int, ...]
    decode_n: int
    contexts: tuple[int, ...]
    long_n: int
    mem_n: int


def table(speeds: list[Speed], memory: list[Memory], lay: Layout) -> str:
    mem = {m.system: m for m in memory}
    head = ([f"prefill {n} tok/s" for n in lay.lengths] + [f"decode {lay.decode_n} tok/s"]
            + [f"decode @{c} tok/s" for c in lay.contexts]
            + ([f"peak RSS @{lay.mem_n} MiB", "RSS loaded MiB", f"{lay.mem_n} tok s"] if lay.mem_n else []))
    n_speed = len(lay.lengths) + 1 + len(lay.contexts)
    rows = []
    names = [s.system for s in speeds] + [m.system for m in memory if m.system not in {s.system for s in speeds}]
    by_name = {s.system: s for s in speeds}
    for name in names:
        s, m = by_name.get(name), mem.get(name)
        if s is None:
            cells = ["-"] * n_speed
        else:
            cells = ([f"{s.prefill_tps(n):.0f}" if s.prefill.get(n) else s.crashed for n in lay.lengths]
                     + [f"{s.decode_tps(lay.decode_n):.1f}" if s.decode else s.crashed]
                     + [f"{s.long_tps(c, lay.long_n):.1f}" if s.long.get(c) else (s.crashed or "-")
                        for c in lay.contexts])
        if not lay.mem_n:
            pass
        elif m is None:
            cells += ["-"] * 3
        elif m.crashed:
            cells += [m.crashed] * 3
        else:
            cells += [f"{m.peak_rss / 2**20:.0f}", f"{m.loaded_rss / 2**20:.0f}", f"{m.seconds:.0f}"]
        rows.append([name] + cells)
    widths = [max(len(r[i]) for r in rows + [["system"] + head]) for i in range(len(head) + 1)]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(["system"] + head)] + [fmt(r) for r in rows])


def ratios(speeds: list[Speed], memory: list[Memory], ours: str, lay: Layout) -> str:
    """Our figures over the best peer that ran (a crashed peer is left out, and named)."""
    by = {s.system: s for s in speeds}
    peers = [s for s in speeds if s.system in PEERS and not s.crashed]
    out = []
    if peers and not by[ours].crashed:
        out.append(f"decode_ratio={by[ours].decode_tps(lay.decode_n) / max(p.decode_tps(lay.decode_n) for p in peers):.2f}")
        out.append("prefill_ratio=" + format(min(by[ours].prefill_tps(n) / max(p.prefill_tps(n) for p in peers)
                                                 for n in lay.lengths), ".2f"))
        for c in lay.contexts:
            long = [p for p in peers if p.long.get(c)]
            if long and by[ours].long.get(c):
                best = max(p.long_tps(c, lay.long_n) for p in long)
                out.append(f"decode{c}_ratio={by[ours].long_tps(c, lay.long_n) / best:.2f}")
    mem = {m.system: m.peak_rss for m in memory if not m.crashed}
    others = [v for k, v in mem.items() if k in PEERS + ("optimum",)]
    if ours in mem and others:
        out.append(f"rss_ratio={mem[ours] / min(others):.2f}")
    crashed = [s.system for s in speeds if s.crashed] + [m.system for m in memory if m.crashed]
    if crashed:
        out.append("crashed=" + ",".join(dict.fromkeys(crashed)))
    return " ".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5, help="rounds; figures are medians (at least 5)")
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 1024], help="prefill prompt lengths")
    ap.add_argument("--long-contexts", type=int, nargs="*", default=[4096, 8192],
                    help="decode tok/s after this many tokens of context (none: skip)")
    ap.add_argument("--long-decode-tokens", type=int, default=64, help="timed steps per round at long context")
    ap.add_argument("--memory-tokens", type=int, default=8192, help="tokens generated in the memory runs (0: skip)")
    ap.add_argument("--llama-repack", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp weight repacking; auto: on unless a probe run with it crashes")
    ap.add_argument("--llama-omp-wait", choices=("auto", "active", "passive"), default="auto",
                    help="llama.cpp's OMP_WAIT_POLICY; auto: the faster in a short decode probe")
    ap.add_argument("--chunk", type=int, default=None, help="our prefill chunk (default: the bundle's)")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=BUNDLE",
                    help="also measure this bundle directory (e.g. a candidate export), repeatable")
    ap.add_argument("--work", type=Path, default=HERE / ".work", help="where the models are built, once")
    args = ap.parse_args()
    try:
        check_peers(args.memory_tokens > 0)
    except PeerMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    lay = Layout(tuple(args.prompts), args.decode_tokens, tuple(args.long_contexts), args.long_decode_tokens,
                 args.memory_tokens)
    context = max(lay.lengths + lay.contexts) + max(args.memory_tokens, args.runs * lay.long_n) + 16
    hf = hf_dir(args.work, max_position=context)
    ours = [System("-".join(("ours", q, *([fmt] if fmt else []))), "ours", our_bundle(args.work, q, None, fmt),
                   chunk=args.chunk) for q, fmt in OUR_BUNDLES]
    ours += [System(name, "ours", Path(path), chunk=args.chunk) for name, path in (e.split("=", 1) for e in args.extra)]
    prompt = prompts(hf / "tokenizer.json", lay.lengths + lay.contexts)
    short = {n: prompt[n] for n in lay.lengths}
    llama = llama_system(demo_gguf(), args.llama_repack, args.llama_omp_wait, args.threads, short)
    peers = [llama, System("ort-genai", "ort-genai", genai_model(args.work, hf))]
    print(uptime(), file=sys.stderr)
    print(cpu_facts(), file=sys.stderr)

    print(f"speed: {args.runs} rounds, {args.threads} threads, prompts {lay.lengths}, decode {lay.decode_n}",
          file=sys.stderr)
    speeds = measure_speed(ours + peers, short, lay.decode_n, args.runs, args.threads)
    print(table(speeds, [], Layout(lay.lengths, lay.decode_n, (), lay.long_n, lay.mem_n)), file=sys.stderr)
    if lay.contexts:
        print(f"decode at long context: after {lay.contexts} tokens, {lay.long_n} steps a round", file=sys.stderr)
        measure_long(ours + peers, prompt[max(lay.contexts)], lay.contexts, lay.long_n, args.runs, args.threads,
                     speeds)
    print(table(speeds, [], lay), file=sys.stderr)  # kept if memory runs stop
    memory = []
    if args.memory_tokens:
        for s in ours + peers + [System("optimum", "optimum", optimum_model(args.work, hf), python=str(OPTIMUM_PYTHON))]:
            print(f"memory: {s.name} generating {args.memory_tokens} tokens", file=sys.stderr)
            memory.append(measure_memory(s, prompt[min(lay.lengths)], args.memory_tokens, args.threads))
    print(table(speeds, memory, lay))
    print(f"llama.cpp: llama-cpp-python {llama_version()}, {llama_note(llama)}; ours: W = 1024 (rolling cache); "
          f"decode @N: {lay.long_n} steps a round after N tokens of context, round r after N + r x {lay.long_n}")
    print(uptime())
    print(cpu_facts())
    print("ours-int8-integer: " + ratios(speeds, memory, "ours-int8-integer", lay))
    print(ratios(speeds, memory, "ours-int4", lay))
    return 0


def cpu_facts() -> str:
    """The CPU and the u8s8 GEMM MLAS dispatches on it at run time (what the integer format's
    MatMulInteger runs, read from /proc/cpuinfo's flags; MatMulNBits' int8 compute never takes AMX)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"cpu: {platform.machine()} (no /proc/cpuinfo)"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    path = next((name for flag, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX512-VNNI"), ("avx_vnni", "AVX-VNNI"),
                                         ("avx2", "AVX2")) if flag in flags), "SSE/NEON")
    return f"cpu: {model}, {os.cpu_count()} logical CPUs; MLAS u8s8 GEMM (MatMulInteger): {path}"


def uptime() -> str:
    return "uptime: " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def llama_version() -> str:
    return subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                          capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
