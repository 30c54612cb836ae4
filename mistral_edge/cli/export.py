"""`mistral-edge export`: checkpoint -> quantized target bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from ..contract import KV_CACHES
from ..quantize.spec import EMBEDDING_PRECISIONS, GROUP_SIZES, PRECISIONS, VALID_FORMS, export_calibration, parse_quant
from ..targets.profiles import TARGETS, get_target
from ..targets.request import BundleRequest
from .options import ChunkOpt, ModelArg, TrustPickleOpt, WindowOpt


def export(
    model: ModelArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="bundle directory to write (replaced atomically)")] = Path("bundle"),
    target: Annotated[str, typer.Option(help=f"one of {', '.join(TARGETS)}")] = "cpu",
    quant: Annotated[Optional[str], typer.Option(help=f"{VALID_FORMS} (default: the target's)")] = None,
    group_size: Annotated[Optional[int], typer.Option(help=f"int4 group size ({', '.join(map(str, GROUP_SIZES))})")] = None,
    head: Annotated[Optional[str], typer.Option(help=f"output head precision ({', '.join(PRECISIONS)})")] = None,
    embedding: Annotated[Optional[str], typer.Option(help=f"embedding precision ({', '.join(EMBEDDING_PRECISIONS)})")] = None,
    weight_format: Annotated[Optional[str], typer.Option("--format", help="nbits (MatMulNBits, fast decode), qdq (DequantizeLinear, portable) or integer (int8 via MatMulInteger, fast prefill, fp32)")] = None,
    activations: Annotated[Optional[str], typer.Option(help="fp32 or fp16 hidden states (default: the target's: fp16 for gpu and jetson)")] = None,
    window: WindowOpt = None,
    chunk: ChunkOpt = None,
    sinks: Annotated[Optional[int], typer.Option(help="of the W cache slots, how many keep the first tokens for ever "
                                                      "(default: W/16 within 4..64 for a model trained without a window, else 0)")] = None,
    pool: Annotated[Optional[int], typer.Option(help="of the W cache slots, how many keep the most-attended tokens "
                                                     "that left the window, per layer and kv head (default: W/2 for "
                                                     "a model trained without a window, else 0; docs/cache.md)")] = None,
    kv_cache: Annotated[Optional[str], typer.Option(help=f"KV cache storage: {', '.join(KV_CACHES)} (int8: a scale per "
                                                         "token and head; default: the activation type)")] = None,
    device_memory: Annotated[Optional[str], typer.Option(help="device memory to fit, e.g. 8GB or phone-4gb, orin-nano-8gb")] = None,
    calib: Annotated[Optional[str], typer.Option(
        metavar="FILE|self|random|none", help="calibration text (UTF-8; its first 8 windows of 512 tokens), 'self' "
                                              "for the model's own samples, 'random' for seeded random tokens (no text, "
                                              "no sampling; the default for the default int4), or 'none': GPTQ codes for "
                                              "the int4 tensors (docs/quantization.md)")] = None,
    trust_pickle: TrustPickleOpt = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="print each quantized tensor's error")] = False,
) -> None:
    """Export a model, quantized, as a self-contained bundle for a target device."""
    # the whole request is checked before the (slow) checkpoint load
    profile = get_target(target)
    spec = parse_quant(profile.quant if quant is None else quant, group_size=group_size, head=head, embedding=embedding)
    req = BundleRequest(profile, spec, window, chunk, device_memory, weight_format, activations, sinks,
                        kv_cache=kv_cache, calib=export_calibration(calib, spec, profile.name), pool=pool)

    from ..model.loaders import load_checkpoint  # torch: imported only by the commands that need it
    from ..targets.bundle import write_bundle

    console = Console(stderr=True)
    with console.status(f"loading {model or 'the embedded demo model'}"):
        ck = load_checkpoint(model, trust_pickle=trust_pickle)
    say = lambda line: console.print(line, highlight=False)  # noqa: E731
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(f"exporting {spec.name}, {req.activation_dtype} activations, {req.kv_cache_type} KV cache, "
                            f"for {target}", total=None)
        manifest = write_bundle(ck, req, out, log=say, tensor_log=say if verbose else None,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
    b = manifest.memory_budget
    console.print(f"[green]wrote[/] {out}: {len(manifest.files)} files, W={manifest.window}, sinks={manifest.sinks}, "
                  f"{f'pool={manifest.pool}, ' if manifest.pool else ''}"
                  f"chunk={manifest.chunk}, {manifest.activation_dtype} activations, {manifest.kv_cache} KV cache, "
                  f"weights {b.weight_bytes / 2**20:.1f} MiB, KV cache {b.kv_cache_bytes / 2**20:.1f} MiB, "
                  f"total {b.total_bytes / 2**20:.1f} MiB")

