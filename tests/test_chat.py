"""Chat formats against their references: transformers' apply_chat_template for Jinja templates (the
demo model's ChatML), mistral-common for Mistral's [INST] format; plus the sandbox and the fallback."""

from __future__ import annotations

import re
import shutil
import time
from types import SimpleNamespace

import pytest
from helpers import SPM_V1
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from test_tokenizer import smol  # noqa: F401  (session fixture, shared)

from mistral_edge.chat_format import GUARDRAIL_PROMPT, ChatFormat
from mistral_edge.errors import EdgeError
from mistral_edge.manifest import TokenizerInfo
from mistral_edge.tokenizer import Tokenizer

ONE = [{"role": "user", "content": "What is 2+2?"}]
MULTI = [{"role": "user", "content": "Hi! Ça va?"}, {"role": "assistant", "content": "Très bien 🤖"},
         {"role": "user", "content": "Name a prime."}]
SYSTEM = [{"role": "system", "content": "Be brief."}, *MULTI]

# Mistral-7B-Instruct-v0.1's Hugging Face template: no system role, multi-line with block tags.
NO_SYSTEM_TEMPLATE = """{{ bos_token }}{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}
    {%- else %}{{ message['content'] + eos_token }}{% endif %}
{% endfor %}"""


@pytest.fixture(scope="session")
def chatml(smol):  # noqa: F811
    ref, tok = smol
    return ref, tok, ChatFormat.for_tokenizer(tok, ref.chat_template)  # the GGUF's tokenizer.chat_template


def test_smollm2_template_renders_chatml(chatml):
    _, tok, fmt = chatml
    assert fmt.template and not fmt.mistral
    assert fmt.render(ONE, tok) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("messages", [ONE, MULTI, SYSTEM], ids=["one", "multi", "system"])
def test_template_matches_transformers(chatml, messages):
    ref, tok, fmt = chatml
    assert fmt.render(messages, tok) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert fmt.render(messages, tok, add_generation_prompt=False) == ref.apply_chat_template(messages, tokenize=False)
    assert fmt.encode(messages, tok) == ref.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def test_multi_turn_prompt_extends_the_previous_one(chatml):
    """What lets the chat engine feed only each turn's new tokens to the cache."""
    _, tok, fmt = chatml
    first = fmt.encode(MULTI[:1], tok)
    assert fmt.encode(MULTI, tok)[:len(first)] == first


def test_guardrail_is_a_system_message(chatml):
    ref, tok, fmt = chatml
    expected = ref.apply_chat_template([{"role": "system", "content": GUARDRAIL_PROMPT}, *MULTI], tokenize=False,
                                       add_generation_prompt=True)
    assert fmt.render(MULTI, tok, guardrail=True) == expected
    assert f"<|im_start|>system\n{GUARDRAIL_PROMPT}<|im_end|>" in expected
    # A conversation's own system prompt is kept, after the guardrail.
    merged = [{"role": "system", "content": f"{GUARDRAIL_PROMPT}\n\nBe brief."}, *MULTI]
    assert fmt.render(SYSTEM, tok, guardrail=True) == ref.apply_chat_template(merged, tokenize=False,
                                                                              add_generation_prompt=True)
    assert "Always assist with care, respect, and truth" not in GUARDRAIL_PROMPT  # our words, not the paper's


def test_template_environment_matches_transformers(chatml):
    """trim_blocks/lstrip_blocks, bos/eos tokens, raise_exception, tojson, loop controls, namespace."""
    ref, tok, _ = chatml
    template = NO_SYSTEM_TEMPLATE + """
{% set ns = namespace(n=0) %}
{% for m in messages %}{% if m.role == 'assistant' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}
{{ ns.n }} {{ messages[0] | tojson }}"""
    ours = ChatFormat(template).render(MULTI, tok)
    assert ours == ref.apply_chat_template(MULTI, chat_template=template, tokenize=False)
    assert ours.startswith("<|im_start|>[INST] Hi! Ça va? [/INST]Très bien 🤖<|im_end|>[INST] Name a prime. [/INST]")
    assert ours.endswith('2 {"role": "user", "content": "Hi! Ça va?"}')


def test_guardrail_folds_into_first_user_message_without_system_role(chatml):
    _, tok, _ = chatml
    fmt = ChatFormat(NO_SYSTEM_TEMPLATE)
    assert fmt.render(MULTI, tok, guardrail=True).startswith(
        f"<|im_start|>[INST] {GUARDRAIL_PROMPT}\n\nHi! Ça va? [/INST]Très bien 🤖<|im_end|>")
    with pytest.raises(EdgeError, match="roles must alternate"):  # the template's raise_exception
        fmt.render(MULTI[:1] * 2, tok)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ messages[0].__class__ }}",
])
def test_unsafe_templates_are_refused(tmp_path, template):
    marker = tmp_path / "pwned"
    with pytest.raises(EdgeError, match="not allowed"):
        ChatFormat(template.replace("{marker}", str(marker))).render(ONE)
    assert not marker.exists()


def test_broken_template_is_an_edge_error():
    with pytest.raises(EdgeError, match="chat template failed: TemplateSyntaxError"):
        ChatFormat("{% for m in messages %}").render(ONE)


def _manifest(tokenizer_file: str) -> SimpleNamespace:
    """What ChatFormat.from_manifest reads of a bundle's manifest: its tokenizer entry."""
    return SimpleNamespace(tokenizer=TokenizerInfo(tokenizer_file, None, (), None))


def test_plain_fallback(smol):  # noqa: F811
    _, tok = smol
    fmt = ChatFormat.for_tokenizer(tok, None)
    assert fmt == ChatFormat() and ChatFormat.from_manifest(_manifest("tokenizer.json")) == fmt
    assert fmt.render(MULTI, tok, guardrail=True) == (
        f"System: {GUARDRAIL_PROMPT}\n\nUser: Hi! Ça va?\n\nAssistant: Très bien 🤖\n\nUser: Name a prime.\n\nAssistant:")
    assert fmt.encode(ONE, tok) == tok.encode("User: What is 2+2?\n\nAssistant:")


def _mistral_common(path, messages, system=None):
    kinds = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    msgs = ([SystemMessage(content=system)] if system else []) + [kinds[m["role"]](content=m["content"]) for m in messages]
    return MistralTokenizer.from_file(str(path)).encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens


def test_mistral_format_matches_mistral_common():
    tok = Tokenizer.from_files({"tokenizer.model": SPM_V1})
    fmt = ChatFormat.for_tokenizer(tok, None)
    assert fmt.mistral and ChatFormat.from_manifest(_manifest("tokenizer.model")) == fmt
    assert fmt.encode(MULTI, tok) == _mistral_common(SPM_V1, MULTI)
    ids = fmt.encode(MULTI, tok, guardrail=True)
    assert ids == _mistral_common(SPM_V1, MULTI, system=GUARDRAIL_PROMPT)
    # v1 has no system role: the guardrail leads the first [INST].
    assert tok.decode(ids).startswith(f"[INST] {GUARDRAIL_PROMPT}\n\nHi! Ça va? [/INST]")
    assert fmt.render(ONE, tok) == "<s>▁[INST]▁What▁is▁2+2?▁[/INST]"
    with pytest.raises(EdgeError, match="unsupported chat role 'tool'"):
        fmt.encode([{"role": "tool", "content": "x"}], tok)
    with pytest.raises(EdgeError, match="Mistral format"):
        fmt.encode(MULTI[:2], tok)  # ends with the assistant: nothing to answer


def test_bare_tokenizer_model_gets_its_version(tmp_path):
    """Bundles ship tokenizer.model without the .v3 suffix mistral-common reads the format off."""
    v3 = SPM_V1.parent / "mistral_instruct_tokenizer_240323.model.v3"
    shutil.copy(v3, tmp_path / "tokenizer.model")
    tok = Tokenizer.from_files(tmp_path)
    ids = ChatFormat(mistral=True).encode(SYSTEM, tok)
    assert ids == _mistral_common(v3, SYSTEM)
    assert tok.id_to_token(ids[1]) == "[INST]"  # a control token in v3, spelled out in v1


@pytest.mark.parametrize("template, message", [
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "took longer than 2 s"),
    ("{{ 'x' * 300000000 }}", "a repetition of 300,000,000"),
    ("{{ 300000000 * ['x'] }}", "a repetition of 600,000,000"),
    ("{% set s = 'x' * 1000000 %}{{ ([s] * 100000)|join }}", "a repetition of 100,000,100,000"),
    ("{{ (['x'] * 1000)|join('y' * 100000) }}", "the result of the join filter"),
    ("{% set s = 'x' * 1000000 %}{% set s = s ~ s %}{{ s }}", "a ~ concatenation"),
    ("{% set s = 'x' * 1000000 %}{% set a = [s, s, s, s] %}{% set a = [a, a, a, a] %}{{ a|string }}", "string filter"),
    ("{% set s %}{% for i in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}{% endset %}", "in all"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "the rendered prompt"),
    ("{{ 'x'|center(1000000000) }}", "an argument of the center filter"),
    ("{{ ('\n' * 100000)|indent(100000) }}", "the result of the indent filter"),
    ("{{ ('x' * 100000)|replace('x', 'y' * 100000) }}", "the result of the replace filter"),
    ("{{ ('x' * 100000).replace('x', 'y' * 100000) }}", "the result of str.replace"),
    ("{{ '%999999999d' % 1 }}", "an argument of a % format"),
    ("{{ '{:>999999999}'.format(1) }}", "an argument of str.format"),
    ("{{ (10 ** 1000) ** 1000 }}", "an integer of more than 4096 bits"),
])
def test_exhausting_templates_stop_fast(template, message):
    start = time.monotonic()
    with pytest.raises(EdgeError, match=re.escape("chat template stopped: ") + ".*" + re.escape(message)) as e:
        ChatFormat(template).render(ONE)
    assert time.monotonic() - start < 10 and "\n" not in str(e.value)


def test_bounded_templates_still_render_what_templates_do():
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{{ (m['role'] ~ ': ')|upper }}{{ m['content']|replace('\\n', ' ')|trim|truncate(255) }}"
                "{{ '%03d|{:>4}'.format(ns.n) % () if false else ' %03d' % ns.n }}{% endfor %}"
                "{% set block %}{% for i in range(3) %}[{{ i }}]{% endfor %}{% endset %}{{ block }}"
                "{{ '-' * 3 }}{{ 2 ** 10 }}{{ 'a'.center(5) }}{{ messages|map(attribute='role')|join(',') }}")
    assert ChatFormat(template).render(MULTI) == (
        "USER: Hi! Ça va? 001ASSISTANT: Très bien 🤖 002USER: Name a prime. 003[0][1][2]---1024  a  user,assistant,user")


def test_the_budget_grows_with_the_conversation():
    """A long conversation is not refused: the size bound scales with the messages."""
    long = [{"role": "user", "content": "word " * 400_000}]  # 2 MB, beyond the base bound
    assert len(ChatFormat().render(long)) > 2_000_000
