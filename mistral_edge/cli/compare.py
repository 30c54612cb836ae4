"""`mistral-edge compare`: memory, quality and speed of several quant levels, as a table, JSON, CSV and PNG."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..compare.report import table, write_all
from ..errors import EdgeError
from ..quantize.spec import parse_calib
from .options import DeviceOpt, ModelArg, ThreadsOpt, TrustPickleOpt, WindowOpt


OutOpt = Annotated[Path, typer.Option("--out", "-o", help="output directory (bundles are kept in OUT/bundles)")]
TorchRowsOpt = Annotated[bool, typer.Option("--torch-rows/--no-torch-rows",
                                            help="add PyTorch reference rows: fp32, bf16, bitsandbytes int8/nf4")]


def _window_list(text: str | None, window: int | None) -> tuple[int, ...]:
    if text is not None and window is not None:
        raise EdgeError("give --window or --windows, not both")
    if text is None:
        return () if window is None else (window,)
    try:
        return tuple(int(w) for w in text.split(","))  # int() allows the spaces around each
    except ValueError:
        raise EdgeError(f"--windows takes comma-separated integers, e.g. 256,1024,4096; got {text!r}") from None


def _int_list(text: str | None, flag: str, example: str) -> tuple[int, ...]:
    if text is None:
        return ()
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise EdgeError(f"{flag} takes comma-separated integers, e.g. {example}; got {text!r}") from None


def compare(
    model: ModelArg = None,
    quants: Annotated[str, typer.Option(help="comma-separated quant levels; an int4 level with -awq, -gptq or "
                                             "-awq-gptq is calibrated on --calib text (e.g. int4-g32-gptq); "
                                             "+kv8 or +kv16: with an int8 or fp16 KV cache (e.g. int4+kv8); "
                                             "+qdq or +integer: in that weight format (e.g. int8+integer)")] = "fp32,fp16,int8,int4-g32,int4-g128",
    text: Annotated[Optional[Path], typer.Option(help="evaluation text, any UTF-8 file")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="evaluation text from the `datasets` library "
                                                        "(wikitext-2, test split; needs the network)")] = None,
    window: WindowOpt = None,
    windows: Annotated[Optional[str], typer.Option(help="sweep W, e.g. 256,1024,4096: each quant at each W")] = None,
    sinks: Annotated[Optional[str], typer.Option(help="sweep attention sinks, e.g. 0,4: each quant at each W with "
                                                      "each (default: the export's)")] = None,
    pool: Annotated[Optional[str], typer.Option(help="sweep the pool of most-attended tokens, e.g. 0,512: each quant "
                                                     "at each W with each (default: the export's)")] = None,
    ctx: Annotated[int, typer.Option(help="tokens per perplexity window; above W, PPL is also split into "
                                          "predictions within W and beyond it")] = 512,
    n_windows: Annotated[int, typer.Option(help="how many windows (the first N of the text)")] = 32,
    calib: Annotated[Optional[str], typer.Option(
        metavar="FILE|self|random", help="calibration text for -awq/-gptq quants (e.g. wiki.valid.tokens, never "
                                         "the evaluation text), 'self': the model's own samples, or 'random': "
                                         "seeded random tokens")] = None,
    threads: ThreadsOpt = 0,
    runs: Annotated[int, typer.Option(help="speed runs per variant (the median is reported)")] = 5,
    out: OutOpt = Path("compare"),
    torch_rows: TorchRowsOpt = True,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Compare quant levels on the same text: perplexity, KL and top-1 vs fp32, sizes, memory, speed."""
    from ..compare.run import CompareRequest, run_compare  # torch: only when comparing

    req = CompareRequest(model=model, quants=quants, text=text, dataset=dataset,
                         windows=_window_list(windows, window), sinks=_int_list(sinks, "--sinks", "0,4"),
                         pools=_int_list(pool, "--pool", "0,512"), ctx=ctx, n_windows=n_windows,
                         calib=parse_calib(calib), threads=threads, runs=runs, out=out, torch_rows=torch_rows,
                         trust_pickle=trust_pickle, device=device or "cpu")
    console = Console(stderr=True)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        rows = run_compare(req, progress, log=lambda line: console.print(line, highlight=False))
    first = next(r for r in rows if r.perplexity is not None)
    # A table redirected to a file would be squeezed to 80 columns.
    Console(width=None if sys.stdout.isatty() else 260).print(table(rows, title=f"{first.text}: {first.n_windows} windows of {first.ctx} tokens, "
                                      f"{first.scored_tokens} scored; KL and top-1 against ONNX fp32"))
    for path in write_all(rows, out):
        console.print(f"[green]wrote[/] {path}", highlight=False)

