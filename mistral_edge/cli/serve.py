"""`mistral-edge serve`: an OpenAI-compatible HTTP server on a bundle (ONNX Runtime) or a
checkpoint (`--model`, the PyTorch reference)."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import EdgeError
from ..runtime.moderate import DEFAULT_REFUSAL
from .generate import RunOptions, open_checkpoint
from .options import ChunkOpt, KvCacheOpt, ModelOpt, QuantOpt, ThreadsOpt, TrustPickleOpt, WindowOpt


def serve(
    bundle: Annotated[Optional[Path], typer.Option("--bundle", "-b", help="bundle directory from `mistral-edge export`")] = None,
    model: ModelOpt = None,
    quant: QuantOpt = None,
    kv_cache: KvCacheOpt = None,
    host: Annotated[str, typer.Option(help="address to listen on (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8080,
    batch: Annotated[int, typer.Option(help="requests decoded together")] = 4,
    queue: Annotated[int, typer.Option(help="requests waiting beyond those running; more get 503")] = 16,
    max_prompt: Annotated[int, typer.Option(help="longest prompt accepted, in tokens")] = 8192,
    max_tokens: Annotated[int, typer.Option(help="largest max_tokens accepted")] = 4096,
    cache_mib: Annotated[int, typer.Option(help="memory for cached conversations (multi-turn reuse), MiB")] = 512,
    stream_interval: Annotated[int, typer.Option(
        help="a streamed reply sends its text at most once per this many milliseconds (0: every piece at once)")] = 20,
    moderate: Annotated[Optional[str], typer.Option(
        help="have the model judge each request (input), its reply (output) or both, and answer what it finds "
             "unacceptable with --refusal (finish_reason content_filter); output and both stream a reply "
             "only once it is judged")] = None,
    refusal: Annotated[Optional[str], typer.Option(
        help=f"what --moderate answers instead (default: {DEFAULT_REFUSAL!r})")] = None,
    threads: ThreadsOpt = None,
    window: WindowOpt = None,
    chunk: ChunkOpt = None,
    trust_pickle: TrustPickleOpt = False,
    verify: Annotated[Optional[bool], typer.Option(
        "--verify/--no-verify", help="check the bundle's checksums first (default: on)")] = None,
) -> None:
    """Serve a bundle, or a checkpoint with --model, over HTTP with OpenAI's chat and completions API (Ctrl-C stops)."""
    try:
        import uvicorn
    except ImportError:
        raise EdgeError("serve needs starlette and uvicorn: pip install 'mistral-edge[serve]'") from None
    if not 0 < port < 65536:
        raise EdgeError(f"port must be between 1 and 65535, got {port}")
    if not 0 <= stream_interval <= 10_000:
        raise EdgeError(f"stream-interval must be between 0 and 10000 ms, got {stream_interval}")
    opts = RunOptions(bundle=bundle, model=model, quant=quant, kv_cache=kv_cache, moderate=moderate, refusal=refusal,
                      threads=threads, window=window, chunk=chunk, trust_pickle=trust_pickle, verify=verify)
    from ..serve.app import create_app
    from ..serve.engine import Engine, EngineConfig

    config = EngineConfig(batch, queue, max_prompt, max_tokens, cache_mib << 20, threads or 0)
    source, fmt, defaults, model_id = _open(opts)
    sock = _listen(host, port)
    engine = Engine(source, config)
    moderation = _moderation(opts, source, fmt, config)
    app = create_app(engine, model_id, fmt, defaults, moderation, stream_interval / 1000)
    guarded = f", moderating {opts.moderate}" if moderation else ""
    quantized = "".join(f" {part}" for part in (quant, kv_cache and f"kv {kv_cache}") if part)
    typer.echo(f"serving {model_id} on http://{host}:{port}/v1 ({opts.backend}{quantized} backend, batch {batch}, "
               f"queue {queue}{guarded})", err=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        engine.close()
        if moderation:
            moderation.close()
        sock.close()


def _open(opts: RunOptions):
    """(engine source, chat format, generation defaults, the served model's name). The source
    loads its model once, for the engine's sessions and the moderator's alike (serve/source.py)."""
    from ..serve.source import bundle_source, reference_source

    if opts.backend == "torch":
        gen, fmt, defaults = open_checkpoint(opts)
        name = Path(opts.model).name if opts.model else "SmolLM2-135M-Instruct"
        return reference_source(gen.session, gen.tokenizer), fmt, defaults, name
    from ..chat_format import ChatFormat
    from ..runtime.bundle import Bundle

    if opts.chunk is not None:
        raise EdgeError("--chunk applies to --model; a bundle serves with its export's chunk")
    b = Bundle.open(opts.bundle, check=opts.verify is not False)
    return (bundle_source(b, opts.threads or 0), ChatFormat.from_manifest(b.manifest),
            dataclasses.asdict(b.manifest.generation), b.path.resolve().name)


def _moderation(opts: RunOptions, source, fmt, config):
    """serve --moderate: a Guard on a batch-1 session of its own, on the engine's model (its checks run beside the engine's)."""
    if opts.moderate is None:
        return None
    from ..runtime.generate import Generator
    from ..runtime.moderate import Guard, Moderator
    from ..serve.moderation import Moderation

    gen = Generator(source.session(threads=config.threads), source.tokenizer())
    return Moderation(Guard(Moderator(gen, fmt), opts.moderate, opts.refusal), config.batch + config.queue)


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is one line, not uvicorn's log and exit 3."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise EdgeError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock
