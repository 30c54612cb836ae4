"""`mistral-edge serve`: an OpenAI-compatible HTTP server on a bundle."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Annotated

import typer

from ..errors import EdgeError
from .options import ThreadsOpt


def serve(
    bundle: Annotated[Path, typer.Option("--bundle", "-b", help="bundle directory from `mistral-edge export`")],
    host: Annotated[str, typer.Option(help="address to listen on (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8080,
    batch: Annotated[int, typer.Option(help="requests decoded together")] = 4,
    queue: Annotated[int, typer.Option(help="requests waiting beyond those running; more get 503")] = 16,
    max_prompt: Annotated[int, typer.Option(help="longest prompt accepted, in tokens")] = 8192,
    max_tokens: Annotated[int, typer.Option(help="largest max_tokens accepted")] = 4096,
    cache_mib: Annotated[int, typer.Option(help="memory for cached conversations (multi-turn reuse), MiB")] = 512,
    threads: ThreadsOpt = 0,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="check the bundle's checksums first")] = True,
) -> None:
    """Serve a bundle over HTTP with OpenAI's chat and completions API (Ctrl-C stops)."""
    try:
        import uvicorn
    except ImportError:
        raise EdgeError("serve needs starlette and uvicorn: pip install 'mistral-edge[serve]'") from None
    if not 0 < port < 65536:
        raise EdgeError(f"port must be between 1 and 65535, got {port}")
    from ..chat_format import ChatFormat
    from ..runtime.bundle import Bundle
    from ..serve.app import create_app
    from ..serve.engine import Engine, EngineConfig

    b = Bundle.open(bundle, check=verify)
    config = EngineConfig(batch, queue, max_prompt, max_tokens, cache_mib << 20, threads)
    sock = _listen(host, port)
    engine = Engine(b, config)
    model_id = b.path.resolve().name
    app = create_app(engine, model_id, ChatFormat.from_manifest(b.manifest),
                     dataclasses.asdict(b.manifest.generation))
    typer.echo(f"serving {model_id} on http://{host}:{port}/v1 (batch {batch}, queue {queue})", err=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()


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

