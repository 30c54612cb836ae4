"""Options shared by several commands, declared once."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ModelArg = Annotated[Optional[str], typer.Argument(
    help="HF directory, mistral-inference directory, .gguf file or Hub id (default: embedded SmolLM2-135M-Instruct)")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="model to load (default: the embedded demo model)")]
WindowOpt = Annotated[Optional[int], typer.Option(help="W, the number of rolling KV-cache slots (overrides the model's)")]
ChunkOpt = Annotated[Optional[int], typer.Option(help="prefill chunk size C (1 <= C <= W)")]
TrustPickleOpt = Annotated[bool, typer.Option("--trust-pickle", help="allow torch pickle checkpoints (.bin/.pth/.pt)")]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="ONNX Runtime intra-op threads (0: all cores)")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="torch backend: cpu (default) or cuda")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="torch backend compute dtype: bf16, fp16 or fp32 (default: bf16 on "
                                                      "cuda, fp32 on cpu)")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch backend: torch.compile the decode and prefill steps "
                                                            "before they are captured (minutes for a 7B)")]
KvCacheOpt = Annotated[Optional[str], typer.Option(
    help="torch backend only: KV cache storage fp32, fp16 or int8 (int8: a scale per token and head), as a bundle "
         "exported with --kv-cache stores it (default: the compute dtype)")]
QuantOpt = Annotated[Optional[str], typer.Option(
    "--quant", help="torch backend only: none (default), the layer linears in bitsandbytes int8 (LLM.int8) or "
                    "nf4, or weight-only int8-wo / int4-wo on PyTorch's own kernels")]
