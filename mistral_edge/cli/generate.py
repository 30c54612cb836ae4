"""`mistral-edge generate` and `mistral-edge chat`: talk to a bundle (ONNX Runtime) or a checkpoint (PyTorch).

Both commands take the same options, declared once as `RunOptions` and checked whole before
anything is opened: a flag that does not apply to the chosen backend is refused, not ignored.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import inspect
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Optional, get_type_hints

import typer

from ..errors import EdgeError
from ..runtime.chat import ChatEngine
from ..runtime.generate import GenerationConfig, Generator
from ..runtime.moderate import DEFAULT_REFUSAL, MODES, Guard, Moderator
from ..runtime.sampling import SamplingParams
from .options import (ChunkOpt, CompileOpt, DeviceOpt, DtypeOpt, KvCacheOpt, ModelOpt, QuantOpt, ThreadsOpt,
                      TrustPickleOpt, WindowOpt)

BACKENDS = ("onnx", "torch")
REFUSED = 3
"""Exit status of a refusal (`--moderate`) and of an unacceptable verdict (`mistral-edge moderate`)."""


@dataclass(frozen=True)
class RunOptions:
    """What `generate` and `chat` were asked for; the field annotations are their command-line options."""

    bundle: Annotated[Optional[Path], typer.Option("--bundle", "-b", help="bundle directory from `mistral-edge export`")] = None
    model: ModelOpt = None
    backend: Annotated[Optional[str], typer.Option(
        help="onnx (runs --bundle) or torch (the PyTorch reference on --model); default: onnx with --bundle, else torch")] = None
    quant: QuantOpt = None
    device: DeviceOpt = None
    dtype: DtypeOpt = None
    compile: CompileOpt = False
    kv_cache: KvCacheOpt = None
    max_new_tokens: Annotated[Optional[int], typer.Option(help="tokens to generate at most (default 256)")] = None
    temperature: Annotated[Optional[float], typer.Option(help="0 = greedy (default)")] = None
    top_k: Annotated[Optional[int], typer.Option(help="sample among the k most likely tokens")] = None
    top_p: Annotated[Optional[float], typer.Option(help="nucleus sampling mass")] = None
    repetition_penalty: Annotated[Optional[float], typer.Option(help="repetition penalty (1 = none)")] = None
    seed: Annotated[Optional[int], typer.Option(help="sampling seed (>= 0)")] = None
    stop: Annotated[Optional[list[str]], typer.Option(help="stop string (repeatable)")] = None
    guardrail: Annotated[bool, typer.Option("--guardrail", help="prepend the guardrail system prompt")] = False
    moderate: Annotated[Optional[str], typer.Option(
        help="have the model judge the request (input), its reply (output) or both, and refuse what it finds "
             "unacceptable (exit 3 for generate); output and both print the reply only once it is judged")] = None
    refusal: Annotated[Optional[str], typer.Option(
        help=f"what --moderate answers instead (default: {DEFAULT_REFUSAL!r})")] = None
    threads: ThreadsOpt = None
    chunk: ChunkOpt = None
    window: WindowOpt = None
    trust_pickle: TrustPickleOpt = False
    verify: Annotated[Optional[bool], typer.Option(
        "--verify/--no-verify", help="check the bundle's checksums first (default: on)")] = None

    def __post_init__(self) -> None:
        backend = self.backend or ("onnx" if self.bundle is not None else "torch")
        if backend not in BACKENDS:
            raise EdgeError(f"unknown backend {backend!r}; expected {' or '.join(BACKENDS)}")
        object.__setattr__(self, "backend", backend)
        if backend == "onnx":
            if self.bundle is None:
                raise EdgeError("give --bundle DIR (made by `mistral-edge export`), or use --backend torch")
            if self.quant is not None:
                raise EdgeError("--quant applies to --backend torch; a bundle's quantization is chosen at export")
            if self.kv_cache is not None:
                raise EdgeError("--kv-cache applies to --backend torch; a bundle's KV cache is chosen at export")
            _refuse(self, "a bundle brings its own model and window", {
                "--model": self.model is not None, "--window": self.window is not None,
                "--trust-pickle": self.trust_pickle})
            _refuse(self, "they apply to --backend torch", {
                "--device": self.device is not None, "--dtype": self.dtype is not None, "--compile": self.compile})
        else:
            if self.bundle is not None:
                raise EdgeError("--bundle runs on the onnx backend; the torch backend takes --model")
            _refuse(self, "they apply to --bundle (the onnx backend)", {
                "--threads": self.threads is not None, "--verify/--no-verify": self.verify is not None})
            from ..model.torch_session import check_kv_cache, check_quant, resolve_device, resolve_dtype  # torch only

            device = resolve_device(self.device or "cpu")
            dtype = resolve_dtype(self.dtype, device)
            check_quant(self.torch_quant, device, dtype)
            check_kv_cache(self.kv_cache, dtype)
        if self.moderate is not None and self.moderate not in MODES:
            raise EdgeError(f"unknown --moderate {self.moderate!r}; expected {', '.join(MODES)}")
        if self.refusal is not None and self.moderate is None:
            raise EdgeError("--refusal applies with --moderate")
        if self.threads is not None and self.threads < 0:
            raise EdgeError(f"--threads must be >= 0 (0: all cores), got {self.threads}")
        if self.window is not None or self.chunk is not None:
            from ..targets.request import check_window  # torch-free bounds, shared with export

            check_window(self.window, self.chunk)
        # the sampling and stop options alone (no defaults yet): bad values fail before a model opens
        self.config({})

    @property
    def torch_quant(self) -> str:
        return self.quant or "none"

    def config(self, defaults: dict) -> GenerationConfig:
        """The generation settings: each option given wins over `defaults` (a bundle's), then the built-in ones."""
        def pick(value, key: str, builtin):
            return value if value is not None else defaults.get(key, getattr(builtin, key))

        cfg, sampling = GenerationConfig(), SamplingParams()
        return GenerationConfig(
            max_new_tokens=pick(self.max_new_tokens, "max_new_tokens", cfg),
            sampling=SamplingParams(*(pick(getattr(self, key), key, sampling) for key in SAMPLING_KEYS), self.seed),
            stop_strings=tuple(self.stop or ()),
        )


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "repetition_penalty")
"""SamplingParams' fields a bundle's generation defaults may set, in order (the seed is the user's alone)."""


def _refuse(opts: RunOptions, why: str, given: dict[str, bool]) -> None:
    flags = [flag for flag, on in given.items() if on]
    if flags:
        raise EdgeError(f"{', '.join(flags)} cannot be used with --backend {opts.backend}: {why}")


def with_run_options(command):
    """Typer reads a command's options off its signature: add RunOptions' fields to `command`'s
    own parameters, and call it with them gathered into one `opts: RunOptions`."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "opts"]
    hints = get_type_hints(RunOptions, include_extras=True)
    shared = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
              for f in fields(RunOptions)]

    @functools.wraps(command)
    def wrapper(**kwargs):
        opts = RunOptions(**{f.name: kwargs.pop(f.name) for f in fields(RunOptions)})
        return command(opts, **kwargs)

    wrapper.__signature__ = inspect.Signature(own + shared)
    return wrapper


def open_bundle(opts: RunOptions):
    """(Generator, chat format, generation defaults) for --bundle on ONNX Runtime; torch-free."""
    from ..chat_format import ChatFormat
    from ..runtime.bundle import Bundle

    b = Bundle.open(opts.bundle, check=opts.verify is not False)
    session = b.session(threads=opts.threads or 0, chunk=opts.chunk)
    return (Generator(session, b.tokenizer()), ChatFormat.from_manifest(b.manifest),
            dataclasses.asdict(b.manifest.generation))


def open_checkpoint(opts: RunOptions):
    """(Generator, chat format, no defaults) for --model on the PyTorch reference."""
    from ..chat_format import ChatFormat
    from ..export.pipeline import resolve_window
    from ..model.loaders import load_checkpoint
    from ..model.reference import ReferenceModel
    from ..model.captured import open_session
    from ..model.torch_session import quantize, resolve_device, resolve_dtype
    from ..tokenizer import Tokenizer

    device = resolve_device(opts.device or "cpu")  # the device and the quant were checked by RunOptions
    ck = load_checkpoint(opts.model, trust_pickle=opts.trust_pickle)
    w, c = resolve_window(ck, opts.window, opts.chunk)
    reference = ReferenceModel(ck.config, ck.weights, resolve_dtype(opts.dtype, device), device)
    ck.weights.clear()  # the model holds them: quantize can free each float linear it replaces
    quantize(reference, opts.torch_quant)
    tokenizer = Tokenizer.from_files(ck.tokenizer_files, bos_id=ck.config.bos_id, eos_ids=ck.config.eos_ids)
    session = open_session(reference, w, c, opts.torch_quant, opts.compile, opts.kv_cache)
    return Generator(session, tokenizer), ChatFormat.for_tokenizer(tokenizer, ck.chat_template), {}


def open_run(opts: RunOptions):
    """open_bundle or open_checkpoint, as --backend says."""
    return open_bundle(opts) if opts.backend == "onnx" else open_checkpoint(opts)


def _text(text: str, what: str) -> str:
    """`text` as the user typed it; undecodable bytes (kept by Python as surrogates) are refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise EdgeError(f"{what} is not valid UTF-8") from None
    return text


def _stdout():
    if sys.stdout is None:
        raise EdgeError("standard output is closed")
    return sys.stdout


def _write(out, pieces) -> None:
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
    except OSError as e:
        if e.errno == errno.EBADF:
            raise EdgeError("standard output is closed") from None
        raise


def _guard(opts: RunOptions, gen: Generator, fmt) -> Guard | None:
    return None if opts.moderate is None else Guard(Moderator(gen, fmt), opts.moderate, opts.refusal)


def _constraint(json_schema: Path | None, regex: str | None, choice: str | None):
    """The one output constraint asked for (checked before any model opens), or None."""
    given = [flag for flag, value in (("--json-schema", json_schema), ("--regex", regex), ("--choice", choice))
             if value is not None]
    if len(given) > 1:
        raise EdgeError(f"{' and '.join(given)} cannot be combined; give one constraint")
    if not given:
        return None
    from ..runtime.constrain import Constraint

    if json_schema is not None:
        return Constraint.schema_file(json_schema)
    if regex is not None:
        return Constraint.regex(_text(regex, "--regex"))
    return Constraint.choice([c.strip() for c in _text(choice, "--choice").split(",")])


@with_run_options
def generate(
    opts: RunOptions,
    prompt: Annotated[str, typer.Argument(help="the prompt")],
    raw: Annotated[bool, typer.Option("--raw", help="send the prompt as is, without the chat template")] = False,
    json_schema: Annotated[Optional[Path], typer.Option(
        "--json-schema", help="the reply is JSON valid under this schema file (needs the guard extra)")] = None,
    regex: Annotated[Optional[str], typer.Option(help="the reply matches this regular expression as a whole")] = None,
    choice: Annotated[Optional[str], typer.Option(help="the reply is one of these comma-separated strings")] = None,
) -> int:
    """Generate a reply to PROMPT, streaming tokens as they come (greedy by default)."""
    prompt, out = _text(prompt, "the prompt"), _stdout()
    constraint = _constraint(json_schema, regex, choice)
    gen, fmt, defaults = open_run(opts)
    cfg = opts.config(defaults)
    guard = _guard(opts, gen, fmt)
    if guard and guard.refuses_request(prompt):
        _write(out, [guard.refusal])
        return REFUSED
    messages = [{"role": "user", "content": prompt}]
    ids = gen.tokenizer.encode(prompt) if raw else fmt.encode(messages, gen.tokenizer, guardrail=opts.guardrail)
    processor = constraint and constraint.processor(gen.tokenizer, gen.session.vocab_size)
    pieces = gen.stream(ids, cfg, processor=processor)
    if guard and guard.checks_output:
        reply = "".join(pieces)
        if guard.refuses_reply(prompt, reply):
            _write(out, [guard.refusal])
            return REFUSED
        pieces = [reply]
    _write(out, pieces)
    if processor and not processor.complete:
        raise EdgeError(f"the reply reached --max-new-tokens before it completed {constraint.what}")
    return 0


@with_run_options
def chat(
    opts: RunOptions,
    save: Annotated[Optional[Path], typer.Option(
        help="on exit, save the conversation (cache, positions, history) to this file")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        help="continue a conversation saved with --save (same bundle, or same --model, --quant and --kv-cache)")] = None,
) -> None:
    """Interactive multi-turn chat; an empty line or end of input quits."""
    if sys.stdin is None:
        raise EdgeError("standard input is closed")
    if (save or resume) and opts.moderate is not None:
        raise EdgeError("--save/--resume take a conversation without --moderate "
                        "(moderation re-feeds every turn, so its cache is no conversation to save)")
    if save is not None and not (save.parent.is_dir() and os.access(save.parent, os.W_OK)):
        raise EdgeError(f"--save {save}: {save.parent} is not a writable directory")  # before the conversation
    out = _stdout()
    gen, fmt, defaults = open_run(opts)
    cfg = opts.config(defaults)
    guard = _guard(opts, gen, fmt)
    engine = ChatEngine(gen, lambda messages: fmt.encode(messages, gen.tokenizer, guardrail=opts.guardrail))
    identity = resumed = None
    if save or resume:
        from ..serve.snapshot import resume_chat

        identity = _snapshot_identity(opts, gen)
        resumed = resume_chat(resume, identity, engine, fmt) if resume else None
    _chat_loop(out, engine, guard, cfg)
    if save:  # only after a clean end of input: an interrupted turn leaves the cache ahead of the history
        from ..serve.snapshot import save_chat

        save_chat(save, identity, engine, resumed)


def _snapshot_identity(opts: RunOptions, gen: Generator) -> str:
    """What a chat snapshot belongs to: the bundle (its manifest), or the torch backend's model as loaded."""
    if opts.backend == "torch":
        from ..model.torch_session import model_identity

        return model_identity(gen.session.model)
    from ..runtime.bundle import Bundle
    from ..serve.snapshot import bundle_identity

    return bundle_identity(Bundle.open(opts.bundle, check=False))  # checked (or not) by open_run already


def _chat_loop(out, engine: ChatEngine, guard, cfg: GenerationConfig) -> None:
    while True:
        try:
            text = _text(input("you> "), "the input")
        except EOFError:
            break
        except UnicodeDecodeError:
            raise EdgeError("the input is not valid UTF-8") from None
        if not text.strip():
            break
        out.write("assistant> ")
        if guard is None:
            _write(out, engine.reply(text, cfg))
        else:
            _write(out, [_guarded_turn(engine, guard, text, cfg)])


def _guarded_turn(engine: ChatEngine, guard: Guard, text: str, cfg: GenerationConfig) -> str:
    """One chat turn under --moderate: a refused request never enters the conversation, a refused
    reply is replaced by the refusal. Moderation empties the cache, so the next turn re-feeds it all."""
    try:
        if guard.refuses_request(text):
            return guard.refusal
        reply = "".join(engine.reply(text, cfg))
        if guard.refuses_reply(text, reply):
            engine.messages[-1]["content"] = reply = guard.refusal
        return reply
    finally:
        engine.fed = []
