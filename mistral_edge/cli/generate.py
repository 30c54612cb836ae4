"""`mistral-edge generate` and `mistral-edge chat`: talk to a bundle (ONNX Runtime) or a checkpoint (PyTorch)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import EdgeError
from ..runtime.chat import ChatEngine
from ..runtime.generate import GenerationConfig, Generator
from ..runtime.sampling import SamplingParams
from .commands import COMMANDS
from .options import ChunkOpt, ModelOpt, ThreadsOpt, TrustPickleOpt, WindowOpt

BundleOpt = Annotated[Optional[Path], typer.Option("--bundle", "-b", help="bundle directory from `mistral-edge export`")]
BackendOpt = Annotated[Optional[str], typer.Option(
    help="onnx (runs --bundle) or torch (the PyTorch reference on --model); default: onnx with --bundle, else torch")]
TorchQuantOpt = Annotated[Optional[str], typer.Option(
    "--quant", help="torch backend only: fp32 (default), or the layer linears in bitsandbytes int8 (LLM.int8) or nf4")]
TORCH_QUANTS = ("fp32", "int8", "nf4")


def _open(bundle: Path | None, model: str | None, backend: str, threads: int, chunk: int | None,
          window: int | None, trust_pickle: bool, verify: bool, quant: str | None):
    """(Generator, chat format, generation defaults) for a bundle or a checkpoint."""
    from ..chat import ChatFormat

    backend = backend or ("onnx" if bundle is not None else "torch")
    if backend == "onnx":
        if bundle is None:
            raise EdgeError("give --bundle DIR (made by `mistral-edge export`), or use --backend torch")
        if quant is not None:
            raise EdgeError("--quant applies to --backend torch; a bundle's quantization is chosen at export")
        from ..runtime.bundle import Bundle

        b = Bundle.open(bundle, check=verify)
        session = b.session(threads=threads, chunk=chunk)
        tokenizer, fmt = b.tokenizer(), ChatFormat.from_manifest(b.manifest.to_json())
        defaults = dataclasses.asdict(b.manifest.generation)
    elif backend == "torch":
        if bundle is not None:
            raise EdgeError("--bundle runs on the onnx backend; the torch backend takes --model")
        from ..export.pipeline import resolve_window
        from ..model.bnb import check_bnb, quantize_linears
        from ..model.loaders import load_checkpoint
        from ..model.reference import ReferenceModel
        from ..model.torch_session import TorchSession
        from ..tokenizer import Tokenizer

        quant = quant or "fp32"
        if quant not in TORCH_QUANTS:
            raise EdgeError(f"unknown --quant {quant!r} for the torch backend; expected {', '.join(TORCH_QUANTS)}")
        if quant != "fp32":
            check_bnb(quant)  # before the checkpoint loads
        ck = load_checkpoint(model, trust_pickle=trust_pickle)
        w, c = resolve_window(ck, window, chunk)
        reference = ReferenceModel(ck.config, ck.weights)
        ck.weights.clear()  # the model holds them: quantize_linears can free each float linear it replaces
        if quant != "fp32":
            quantize_linears(reference, quant)
        session = TorchSession(reference, w, c)
        tokenizer = Tokenizer.from_files(ck.tokenizer_files, bos_id=ck.config.bos_id, eos_ids=ck.config.eos_ids)
        fmt = ChatFormat.for_tokenizer(tokenizer, ck.chat_template)
        defaults = {}
    else:
        raise EdgeError(f"unknown backend {backend!r}; expected onnx or torch")
    return Generator(session, tokenizer), fmt, defaults


def _config(defaults: dict, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop) -> GenerationConfig:
    pick = lambda value, key, fallback: value if value is not None else defaults.get(key, fallback)  # noqa: E731
    return GenerationConfig(
        max_new_tokens=pick(max_new_tokens, "max_new_tokens", 256),
        sampling=SamplingParams(pick(temperature, "temperature", 0.0), pick(top_k, "top_k", 0),
                                pick(top_p, "top_p", 1.0), pick(repetition_penalty, "repetition_penalty", 1.0), seed),
        stop_strings=tuple(stop or ()),
    )


MaxTokOpt = Annotated[Optional[int], typer.Option(help="tokens to generate at most (default 256)")]
TempOpt = Annotated[Optional[float], typer.Option(help="0 = greedy (default)")]
TopKOpt = Annotated[Optional[int], typer.Option(help="sample among the k most likely tokens")]
TopPOpt = Annotated[Optional[float], typer.Option(help="nucleus sampling mass")]
RepOpt = Annotated[Optional[float], typer.Option(help="repetition penalty (1 = none)")]
SeedOpt = Annotated[Optional[int], typer.Option(help="sampling seed")]
StopOpt = Annotated[Optional[list[str]], typer.Option(help="stop string (repeatable)")]
GuardOpt = Annotated[bool, typer.Option("--guardrail", help="prepend the guardrail system prompt")]
VerifyOpt = Annotated[bool, typer.Option("--verify/--no-verify", help="check the bundle's checksums first")]


def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt")],
    bundle: BundleOpt = None, model: ModelOpt = None, backend: BackendOpt = None, quant: TorchQuantOpt = None,
    max_new_tokens: MaxTokOpt = None, temperature: TempOpt = None, top_k: TopKOpt = None, top_p: TopPOpt = None,
    repetition_penalty: RepOpt = None, seed: SeedOpt = None, stop: StopOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="send the prompt as is, without the chat template")] = False,
    guardrail: GuardOpt = False, threads: ThreadsOpt = 0, chunk: ChunkOpt = None, window: WindowOpt = None,
    trust_pickle: TrustPickleOpt = False, verify: VerifyOpt = True,
) -> None:
    """Generate a reply to PROMPT, streaming tokens as they come (greedy by default)."""
    gen, fmt, defaults = _open(bundle, model, backend, threads, chunk, window, trust_pickle, verify, quant)
    cfg = _config(defaults, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)
    messages = [{"role": "user", "content": prompt}]
    ids = gen.tokenizer.encode(prompt) if raw else fmt.encode(messages, gen.tokenizer, guardrail=guardrail)
    for piece in gen.stream(ids, cfg):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def chat(
    bundle: BundleOpt = None, model: ModelOpt = None, backend: BackendOpt = None, quant: TorchQuantOpt = None,
    max_new_tokens: MaxTokOpt = None, temperature: TempOpt = None, top_k: TopKOpt = None, top_p: TopPOpt = None,
    repetition_penalty: RepOpt = None, seed: SeedOpt = None, stop: StopOpt = None,
    guardrail: GuardOpt = False, threads: ThreadsOpt = 0, chunk: ChunkOpt = None, window: WindowOpt = None,
    trust_pickle: TrustPickleOpt = False, verify: VerifyOpt = True,
) -> None:
    """Interactive multi-turn chat; an empty line or end of input quits."""
    gen, fmt, defaults = _open(bundle, model, backend, threads, chunk, window, trust_pickle, verify, quant)
    cfg = _config(defaults, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop)
    engine = ChatEngine(gen, lambda messages: fmt.encode(messages, gen.tokenizer, guardrail=guardrail))
    while True:
        try:
            text = input("you> ")
        except EOFError:
            break
        if not text.strip():
            break
        sys.stdout.write("assistant> ")
        for piece in engine.reply(text, cfg):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


COMMANDS["generate"] = generate
COMMANDS["chat"] = chat
