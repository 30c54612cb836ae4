"""Conversations to prompts: the model's own chat template, Mistral's [INST] format, or a plain fallback.

Torch-free (the on-device runtime uses it). Chat templates come with downloaded models, so they are
untrusted code: they run in Jinja's immutable sandbox, and touching an unsafe attribute is an error
rather than the silent empty string Jinja would give.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .errors import EdgeError, first_line
from .tokenizer import Tokenizer

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
    def from_manifest(cls, manifest: dict) -> ChatFormat:
        """The same choice from a bundle manifest's 'tokenizer' entry."""
        tok = manifest.get("tokenizer") or {}
        template = tok.get("chat_template")
        return cls(template, template is None and str(tok.get("file", "")).startswith("tokenizer.model"))

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


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj, attribute):
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")

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
    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _render(template: str, messages: list[dict], **context) -> str:
    try:
        return _compile(template).render(messages=messages, **context)
    except Exception as e:  # untrusted code: syntax, sandbox, raise_exception and type errors alike
        raise EdgeError(f"chat template failed: {type(e).__name__}: {e}") from None


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
