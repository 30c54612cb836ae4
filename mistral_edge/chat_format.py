"""Conversations to prompts: the model's own chat template, Mistral's [INST] format, or a plain fallback.

Torch-free (the on-device runtime uses it). Chat templates come with downloaded models, so they are
untrusted code: they run in Jinja's immutable sandbox, and touching an unsafe attribute is an error
rather than the silent empty string Jinja would give. The sandbox stops code execution, not
exhaustion, so a render also runs in a budget of time and size (RENDER_SECONDS, RENDER_*_CHARS).
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import EdgeError, first_line
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .manifest import Manifest

GUARDRAIL_PROMPT = (
    "You are a helpful assistant. Answer truthfully, carefully and respectfully, and be as useful as you "
    "can while staying safe. Do not produce harmful, unethical, prejudiced or hostile content, and keep "
    "your replies fair and constructive."
)
"""System prompt for `guardrail=True`, in the spirit of the Mistral 7B paper's section 5.1."""

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""For models with neither a chat template nor a Mistral tokenizer (base models): turns written as
'System: ...', 'User: ...', 'Assistant: ...' separated by blank lines, ending in 'Assistant:'.
Nothing marks the end of a reply, so pass a stop string such as '\\nUser:'."""


@dataclass(frozen=True)
class ChatFormat:
    """`template` (Jinja, as in tokenizer_config.json / GGUF metadata) wins; else `mistral` encodes
    with mistral-common's instruct tokenizer; else PLAIN_TEMPLATE."""

    template: str | None = None
    mistral: bool = False

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, chat_template: str | None) -> ChatFormat:
        """A SentencePiece tokenizer without a template is taken for a Mistral one (mistral-inference layout)."""
        return cls(chat_template, chat_template is None and tokenizer.kind == "sentencepiece")

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ChatFormat:
        """The same choice from a bundle manifest's tokenizer entry."""
        tok = manifest.tokenizer
        return cls(tok.chat_template, tok.chat_template is None and tok.file.startswith("tokenizer.model"))

    def render(self, messages: list[dict], tokenizer: Tokenizer | None = None, *, guardrail: bool = False,
               add_generation_prompt: bool = True) -> str:
        """The prompt as text. Templates see `bos_token`/`eos_token` from `tokenizer` ('' without one);
        the Mistral format needs the tokenizer and gives mistral-common's text (SentencePiece pieces)."""
        if self.mistral:
            if tokenizer is None:
                raise EdgeError("the Mistral chat format needs its tokenizer to render")
            from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

            return _mistral_tokenizer(Path(tokenizer.path)).decode(
                _mistral_encode(messages, tokenizer, guardrail), special_token_policy=SpecialTokenPolicy.KEEP)
        if guardrail:  # a template that never mentions 'system' has no system role
            messages = _with_system(messages, GUARDRAIL_PROMPT, fold="system" not in (self.template or "system"))
        return _render(self.template or PLAIN_TEMPLATE, messages, add_generation_prompt=add_generation_prompt,
                       bos_token=tokenizer.bos_token if tokenizer else "",
                       eos_token=tokenizer.eos_token if tokenizer else "")

    def encode(self, messages: list[dict], tokenizer: Tokenizer, guardrail: bool = False) -> list[int]:
        """Prompt token ids, ending where the assistant's reply begins. A template writes its own
        special tokens (as transformers' apply_chat_template: no BOS added on top)."""
        if self.mistral:
            return _mistral_encode(messages, tokenizer, guardrail)
        return tokenizer.encode(self.render(messages, tokenizer, guardrail=guardrail), add_bos=False)


def _with_system(messages: list[dict], prompt: str, fold: bool) -> list[dict]:
    """`prompt` ahead of the system message (or as one); `fold` puts it into the first user message
    instead, for templates with no system role (as mistral-common does for [INST])."""
    messages = [dict(m) for m in messages]
    if fold:
        target = next((m for m in messages if m.get("role") == "user"), None)
    else:
        target = messages[0] if messages and messages[0].get("role") == "system" else None
    if target is None:
        return [{"role": "system", "content": prompt}, *messages]
    target["content"] = f"{prompt}\n\n{target['content']}"
    return messages


def _raise(message: str):
    import jinja2

    raise jinja2.TemplateError(message)


RENDER_SECONDS = 2.0
"""Wall-clock limit of one template render (a real chat template takes milliseconds)."""
RENDER_BASE_CHARS = 1 << 20
RENDER_CHARS_PER_INPUT_CHAR = 16
"""A render, and every string or list it builds, may hold RENDER_BASE_CHARS plus this many
characters per character of the messages: room for any real template's markup around the
conversation, but a bound on what `'x' * 300000000` would take."""
RENDER_SPEND = 16
"""All the strings and lists a render creates, together, may hold this many times that bound
(a loop that builds a large string on every pass is stopped even when it keeps none)."""


class TemplateLimit(Exception):
    """A chat template exceeded its time or size budget."""


@dataclass
class _Budget:
    chars: int
    deadline: float
    spent: int = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"took longer than {RENDER_SECONDS:g} s")

    def check(self, n: int, what: str = "a value") -> None:
        if n > self.chars:
            raise TemplateLimit(f"{what} of {n:,} characters or items is over its limit of {self.chars:,}")


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("chat_template_budget")


def _size(value, limit: int) -> int:
    """Characters and items in `value`, nested lists and dicts included; stops counting past `limit`."""
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple, dict)):
            total += len(v)
            stack.extend(v.items() if isinstance(v, dict) else v)
    return total


def _bounded(value, what: str = "a value", created: bool = True):
    """`value`, if it and (when `created`) everything created so far are within the budget."""
    budget = _BUDGET.get()
    budget.check(_size(value, budget.chars), what)
    if isinstance(value, int) and value.bit_length() > 4096:
        raise TemplateLimit("an integer of more than 4096 bits")
    if created and isinstance(value, (str, list, tuple, dict)):
        budget.spent += len(value)  # a new container holds references: its items were counted where made
        if budget.spent > RENDER_SPEND * budget.chars:
            raise TemplateLimit(f"created more than {RENDER_SPEND * budget.chars:,} characters or items in all")
    return value


def _check_call(value, args: tuple, kwargs: dict, what: str, fmt: bool = False) -> None:
    """Refuse a call whose result could outgrow the budget, before it runs. A filter or str method
    grows its input at most by its string arguments per character (replace, wordwrap, join) and by
    its integer arguments per line or tab (center, indent, expandtabs); a format string (`fmt`)
    also by the widths it writes (%9999999d, {:>9999999})."""
    budget = _BUDGET.get()
    ints = [abs(a) for a in (*args, *kwargs.values()) if isinstance(a, int) and not isinstance(a, bool)]
    if fmt and isinstance(value, str):
        ints += [int(n) for field in _FORMAT_WIDTH.findall(value) for n in field if n]
    for n in ints:
        budget.check(n, f"an argument of {what}")
    grow = 1 + max((_size(a, budget.chars) for a in (*args, *kwargs.values()) if isinstance(a, (str, list, tuple, dict))),
                   default=0)
    lines = 1 + (value.count("\n") + value.count("\t") if isinstance(value, str) else 0)
    budget.check((_size(value, budget.chars) + 1) * grow + max(ints, default=0) * lines, f"the result of {what}")


_FORMAT_WIDTH = re.compile(r"%[-+ #0]*(\d*)(?:\.(\d*))?|\{[^{}]*:[^{}]*?(\d+)(?:\.(\d+))?")
"""Width and precision numbers of %-style and str.format fields."""


def _bounded_filter(name: str, f):
    @functools.wraps(f)  # keeps jinja's pass_context / pass_eval_ctx marks
    def bounded(*args, **kwargs):
        values = [a for a in args if not _is_jinja_state(a)]
        if values:
            _check_call(values[0], tuple(values[1:]), kwargs, f"the {name} filter", fmt=name == "format")
        return _bounded(f(*args, **kwargs), f"the {name} filter's result")
    return bounded


def _is_jinja_state(arg) -> bool:
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context
    from jinja2 import Environment

    return isinstance(arg, (Context, EvalContext, Environment))


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedCode(CodeGenerator):
        """`a ~ b` joins through the environment, so a concatenation is bounded like any other value."""

        def visit_Concat(self, node, frame):
            self.write("environment.concat_values((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Sandbox(ImmutableSandboxedEnvironment):
        """Jinja's sandbox stops code execution, not exhaustion: here every operator that can
        multiply a value's size, every call and filter, and every output is held to the budget."""

        code_generator_class = BoundedCode
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def unsafe_undefined(self, obj, attribute):
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")

        def call_binop(self, context, operator, left, right):
            budget = _BUDGET.get()
            if operator == "*" and isinstance(right, (str, list, tuple)):
                left, right = right, left  # 3 * 'x'
            if operator == "*" and isinstance(left, (str, list, tuple)) and isinstance(right, int):
                budget.check(_size(left, budget.chars) * max(right, 0), "a repetition")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and \
                    abs(left) > 1 and right > 4096 // max(abs(left).bit_length() - 1, 1):
                raise TemplateLimit("an integer of more than 4096 bits")
            elif operator == "%" and isinstance(left, str):
                _check_call(left, right if isinstance(right, tuple) else (right,), {}, "a % format", fmt=True)
            return _bounded(super().call_binop(context, operator, left, right), f"the result of {operator!r}")

        def call(__self, __context, __obj, *args, **kwargs):  # jinja's own signature
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):
                _check_call(owner, args, kwargs, f"str.{getattr(__obj, '__name__', 'method')}")
            return _bounded(super().call(__context, __obj, *args, **kwargs), "a call's result")

        def wrap_str_format(self, value):  # 'fmt'.format / format_map, as the sandbox hands them out
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None

            def bounded(*args, **kwargs):
                _check_call(value.__self__, args, kwargs, f"str.{value.__name__}", fmt=True)
                return _bounded(wrapped(*args, **kwargs), f"str.{value.__name__}'s result")
            return bounded

        def concat_values(self, values):  # a ~ b
            budget = _BUDGET.get()
            budget.check(sum(_size(v, budget.chars) for v in values), "a ~ concatenation")
            return _bounded("".join(map(str, values)), "a ~ concatenation")

        def concat(self, pieces):  # how Jinja joins a block's output: {% set %} blocks, macros, caller()
            budget, out, size = _BUDGET.get(), [], 0
            for piece in pieces:
                size += len(piece)
                budget.check(size, "a block's output")
                out.append(piece)
            return _bounded("".join(out), "a block's output")

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag), rendered as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    # As transformers renders chat templates: same whitespace control, helpers and tojson.
    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols],
                  finalize=lambda value: _bounded(value, "an output value", created=False))
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _deadline_tracer(budget: _Budget):
    """A sys.settrace hook that checks the deadline on every line the template's own code runs,
    so loops that print nothing (nested ranges) are stopped too."""
    def line(frame, event, arg):
        if event == "line":
            budget.check_time()
        return line

    def call(frame, event, arg):
        return line if frame.f_code.co_filename == "<template>" else None
    return call


def _render(template: str, messages: list[dict], **context) -> str:
    """Render in a budget of RENDER_SECONDS and of characters scaled by the messages' size,
    streaming the output so its size is checked as it grows."""
    limit = RENDER_BASE_CHARS + RENDER_CHARS_PER_INPUT_CHAR * _size(messages, 1 << 62)
    budget = _Budget(limit, time.monotonic() + RENDER_SECONDS)
    token = _BUDGET.set(budget)
    tracer = sys.gettrace()
    try:
        compiled = _compile(template)
        sys.settrace(_deadline_tracer(budget))
        pieces, size = [], 0
        for piece in compiled.generate(messages=messages, **context):
            size += len(piece)
            budget.check(size, "the rendered prompt")
            budget.check_time()
            pieces.append(piece)
        return "".join(pieces)
    except TemplateLimit as e:
        raise EdgeError(f"chat template stopped: {e}") from None
    except Exception as e:  # untrusted code: syntax, sandbox, raise_exception and type errors alike
        raise EdgeError(f"chat template failed: {type(e).__name__}: {first_line(e)}") from None
    finally:
        sys.settrace(tracer)
        _BUDGET.reset(token)


_VERSION_MARKS = (("v7", "[SYSTEM_PROMPT]"), ("v3", "[IMG]"), ("v2", "[INST]"))
"""The first control token each SentencePiece tokenizer version added (newest first)."""


@functools.lru_cache(maxsize=4)
def _mistral_tokenizer(path: Path):
    """mistral-common's tokenizer for a SentencePiece file. It reads the version (which decides the
    prompt format) off the name, tokenizer.model.v3; a bare tokenizer.model (as bundles ship it)
    gets the version its control tokens show."""
    try:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    except ImportError:
        raise EdgeError("the Mistral chat format needs mistral-common: pip install mistral-common") from None
    if ".model.v" in path.name:
        return MistralTokenizer.from_file(str(path))
    import shutil
    import tempfile

    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    controls = {sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i)}
    version = next((v for v, mark in _VERSION_MARKS if mark in controls), "v1")
    with tempfile.TemporaryDirectory() as d:
        named = Path(d) / f"tokenizer.model.{version}"
        shutil.copyfile(path, named)
        return MistralTokenizer.from_file(str(named))


def _mistral_encode(messages: list[dict], tokenizer: Tokenizer, guardrail: bool) -> list[int]:
    """mistral-common's encoding; it places system prompts as each version wants."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    mt = _mistral_tokenizer(Path(tokenizer.path))
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    if guardrail:
        messages = [{"role": "system", "content": GUARDRAIL_PROMPT}, *messages]
    try:
        request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
        return mt.encode_chat_completion(request).tokens
    except KeyError as e:
        raise EdgeError(f"unsupported chat role {e}; the Mistral format takes system, user and assistant") from None
    except Exception as e:  # mistral-common's validation: alternation, empty or trailing assistant messages
        raise EdgeError(f"cannot encode this conversation in the Mistral format ({first_line(e)})") from None
