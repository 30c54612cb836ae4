"""The OpenAI-compatible server, live on loopback, driven by the real `openai` client."""

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import uvicorn

from mistral_edge.chat_format import ChatFormat
from mistral_edge.runtime.bundle import Bundle
from mistral_edge.runtime.generate import GenerationConfig, Generator
from mistral_edge.serve.app import MAX_BODY, create_app
from mistral_edge.runtime.sampling import SamplingParams
from mistral_edge.runtime.moderate import LABELS, Guard, Moderator, Verdict
from mistral_edge.serve.engine import Engine, EngineConfig, Job
from mistral_edge.serve.moderation import Moderation
from mistral_edge.serve.source import bundle_source, reference_source
from helpers import SPM_V1, W, tiny_hf_mistral, write_tiny_bundle

MAX_PROMPT = 96
REFUSAL = "Not on this server."
TIMEOUT = 60  # seconds: the bound on any one request in these tests
SUBPROCESS_TIMEOUT = 300
"""Seconds: the bound on a `mistral-edge serve` process's start and on each of its requests. It
imports, verifies and loads in a fresh interpreter, which on a loaded machine takes many times
its idle few seconds; the wait polls, so an idle run ends as soon as the server answers."""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    write_tiny_bundle(out)
    return Bundle.open(out)


class Live:
    """A server in a thread on 127.0.0.1, an ephemeral port."""

    def __init__(self, source, config: EngineConfig, eos: bool = True, moderate: str | None = None, fmt=None,
                 stream_interval: float = 0.0):
        """`source`: a Bundle, or a serve.source.OneModel (then give its chat format `fmt`)."""
        self.engine = Engine(source, config)
        if not eos:  # the tiny model's greedy text may hit EOS early; some tests need long replies
            self.engine.stops = set()
        fmt = fmt or ChatFormat.from_manifest(source.manifest)
        self.moderation = None
        if moderate:  # a moderator on a session of its own, as `serve --moderate` builds it
            guard = Guard(Moderator(Generator(source.session(), source.tokenizer()), fmt), moderate, REFUSAL)
            self.moderation = Moderation(guard, limit=8)
        app = create_app(self.engine, "tiny", fmt, moderation=self.moderation, stream_interval=stream_interval)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=TIMEOUT).json()

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()
        if self.moderation:
            self.moderation.close()
        self.sock.close()


@contextlib.contextmanager
def _cli_server(*args):
    """`mistral-edge serve ARGS` on a free loopback port: (an openai client on it, the line it starts with)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "from mistral_edge.cli.main import main; main()", "serve",
                             "--port", str(port), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, f"serve did not answer /health within {SUBPROCESS_TIMEOUT} s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=SUBPROCESS_TIMEOUT).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        banner = next(line for line in proc.stderr if line.startswith("serving "))  # written before it listens
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                            timeout=SUBPROCESS_TIMEOUT), banner
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=SUBPROCESS_TIMEOUT)
        finally:
            proc.kill()


@pytest.fixture(scope="module")
def live(bundle):
    server = Live(bundle, EngineConfig(batch=2, queue=8, max_prompt=MAX_PROMPT, max_tokens=64))
    yield server
    server.close()


# Far more than the tiny model decodes while the server notices a client that left (a non-streaming
# request's watcher polls every 0.5 s): at 4096 it sometimes finished first.
ENDLESS = 1 << 20


@pytest.fixture(scope="module")
def endless(bundle):
    """No EOS, one request at a time, one waiting: replies of ENDLESS tokens keep it busy."""
    server = Live(bundle, EngineConfig(batch=1, queue=1, max_tokens=ENDLESS), eos=False)
    yield server
    server.close()


def direct(bundle, ids, max_tokens):
    """What `generate` gives: the ids and text of a greedy reply, on a fresh batch-1 session."""
    gen = Generator(bundle.session(), bundle.tokenizer())
    out = list(gen.stream_ids(ids, GenerationConfig(max_new_tokens=max_tokens)))
    return out, bundle.tokenizer().decode(out)


def chat_ids(bundle, messages):
    return ChatFormat.from_manifest(bundle.manifest).encode(messages, bundle.tokenizer())


def test_chat_completion_equals_direct_generation(bundle, live):
    messages = [{"role": "user", "content": "Tell me about the sea"}]
    r = live.client.chat.completions.create(model="tiny", messages=messages, max_tokens=10)
    ids = chat_ids(bundle, messages)
    out, text = direct(bundle, ids, 10)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if len(out) == 10 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(out))
    assert r.usage.total_tokens == len(ids) + len(out) and r.model == "tiny"


def test_streamed_chat_equals_unstreamed(live):
    messages = [{"role": "user", "content": "Count to five"}]
    plain = live.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    chunks = list(live.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_streamed_and_not(bundle, live):
    r = live.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8)
    out, text = direct(bundle, bundle.tokenizer().encode("Once upon a time"), 8)
    assert r.choices[0].text == text and r.usage.completion_tokens == len(out)
    stream = live.client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in stream) == text


def test_seeded_sampling_matches_direct_sampling(bundle, live):
    ids = bundle.tokenizer().encode("Pick a word")
    runs = [live.client.completions.create(model="tiny", prompt="Pick a word", max_tokens=10, temperature=1.0,
                                           top_p=0.9, seed=5).choices[0].text for _ in range(2)]
    gen = Generator(bundle.session(), bundle.tokenizer())
    cfg = GenerationConfig(max_new_tokens=10, sampling=SamplingParams(1.0, top_p=0.9, seed=5))
    assert runs[0] == runs[1] == bundle.tokenizer().decode(list(gen.stream_ids(ids, cfg)))
    assert runs[0] != direct(bundle, ids, 10)[1]  # it did sample


def test_stop_string_cuts_the_reply(live):
    messages = [{"role": "user", "content": "Say something long"}]
    full = live.client.chat.completions.create(model="tiny", messages=messages, max_tokens=30)
    full = full.choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    r = live.client.chat.completions.create(model="tiny", messages=messages, max_tokens=30, stop=[stop])
    assert r.choices[0].message.content == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "ok"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_always_parses(live, stream):
    """A random-weight model at temperature 1 still answers JSON valid under the schema, streamed or not."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in range(3):
        args = dict(model="tiny", messages=[{"role": "user", "content": "Who are you?"}], max_tokens=64,
                    temperature=1.0, seed=seed, response_format=fmt)
        if stream:
            chunks = list(live.client.chat.completions.create(stream=True, **args))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = live.client.chat.completions.create(**args)
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_bad_response_format_is_a_400(live):
    r = httpx.post(live.url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}})
    assert r.status_code == 400 and "response_format: unknown response_format type 'xml'" in r.json()["error"]["message"]


def test_models_and_health(live):
    assert [m.id for m in live.client.models.list()] == ["tiny"]
    assert live.health()["status"] == "ok"


def ask_at_once(server, prompts: list[str], max_tokens: int = 12) -> list[str]:
    """Each prompt's completion text, every prompt from a client thread of its own, all at once."""
    def ask(p):
        return server.client.completions.create(model="tiny", prompt=p, max_tokens=max_tokens).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(ask, prompts, timeout=TIMEOUT))


def test_concurrent_clients_get_what_each_would_alone(bundle, live):
    """Six clients on a batch-2 engine: batched decode gives each the tokens it gets alone."""
    prompts = [f"Question number {i}: " + "why " * i for i in range(6)]
    before = live.health()["batched_steps"]
    got = ask_at_once(live, prompts)
    assert got == [direct(bundle, bundle.tokenizer().encode(p), 12)[1] for p in prompts]
    assert live.health()["batched_steps"] > before  # some steps decoded two requests at once


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(bundle, live, monkeypatch):
    real = live.engine.single.step

    def broken(*args, **kw):
        monkeypatch.setattr(live.engine.single, "step", real)  # fails once
        raise RuntimeError("device lost\nsecond line")

    monkeypatch.setattr(live.engine.single, "step", broken)
    r = _post(live, "/v1/completions", {"prompt": "hello", "max_tokens": 3})
    assert r.status_code == 500 and r.json()["error"]["message"] == "device lost"
    ok = live.client.completions.create(model="tiny", prompt="hello", max_tokens=3)
    assert ok.choices[0].text == direct(bundle, bundle.tokenizer().encode("hello"), 3)[1]


def _fed(prompt, out, max_tokens):
    """What a finished request left in its cache: the last token of a reply cut by length is not fed."""
    return prompt + (out[:-1] if len(out) == max_tokens else out)


def _common(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_multi_turn_prefills_only_the_new_tokens(bundle, live):
    """The second turn extends the first's tokens: the cached conversation is reused."""
    turn = [{"role": "user", "content": "Hi"}]
    first = live.client.chat.completions.create(model="tiny", messages=turn, max_tokens=4)
    second = turn + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
    r = live.client.chat.completions.create(model="tiny", messages=second, max_tokens=6)
    first_ids, ids = chat_ids(bundle, turn), chat_ids(bundle, second)
    fed = _fed(first_ids, direct(bundle, first_ids, 4)[0], 4)
    assert r.usage.prompt_tokens_details.cached_tokens == _common(fed, ids) >= len(first_ids)
    assert r.choices[0].message.content == direct(bundle, ids, 6)[1]


def _run(engine, ids, max_tokens):
    """Submit a reusing job straight to the engine; (text, finish reason, usage)."""
    done, pieces, end = threading.Event(), [], []

    def on_event(kind, *rest):
        (pieces if kind == "text" else end).append(rest[0] if kind == "text" else (kind, *rest))
        if kind != "text":
            done.set()

    engine.submit(Job(ids, max_tokens, SamplingParams(), on_event, reuse=True))
    assert done.wait(TIMEOUT)
    return "".join(pieces), *end[0][1:]


def test_conversation_past_the_window_is_reused_through_the_hash_chain(bundle, live):
    """A history longer than the kept tail (max(W, 64) tokens) is matched by its hash chain."""
    prompt = [100 + i % 300 for i in range(70)]
    _run(live.engine, prompt, 5)
    fed = _fed(prompt, direct(bundle, prompt, 5)[0], 5)
    assert len(fed) > 64
    follow = fed + [7, 8, 9, 10]
    text, reason, usage = _run(live.engine, follow, 6)
    assert usage["prompt_tokens_details"]["cached_tokens"] == len(fed)
    assert text == direct(bundle, follow, 6)[1]
    changed = list(follow)
    changed[2] += 1  # not an extension any more: prefilled in full
    assert _run(live.engine, changed, 2)[2]["prompt_tokens_details"]["cached_tokens"] == 0


def _post(live, path, body, timeout=TIMEOUT):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(live.url + path, content=data, headers={"content-type": "application/json"},
                      timeout=timeout)


GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
BAD = [
    ("malformed JSON", '{"messages": [', "malformed JSON"),
    ("not an object", "[1, 2]", "Input should be an object"),
    ("max_tokens a string", {**GOOD, "max_tokens": "5"}, "max_tokens: Input should be a valid integer"),
    ("messages a string", {**GOOD, "messages": "hi"}, "messages: Input should be a valid array"),
    ("content a number", {**GOOD, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("unknown role", {**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("no messages", {**GOOD, "messages": []}, "messages: List should have at least 1 item"),
    ("stream a string", {**GOOD, "stream": "yes"}, "stream: Input should be a valid boolean"),
    ("unknown model", {**GOOD, "model": "gpt-9"}, "unknown model 'gpt-9'"),
    ("max_tokens 0", {**GOOD, "max_tokens": 0}, "max_tokens must be between 1 and 64, got 0"),
    ("max_tokens negative", {**GOOD, "max_tokens": -3}, "max_tokens must be between 1 and 64, got -3"),
    ("max_tokens absurd", {**GOOD, "max_tokens": 10**12}, "max_tokens must be between 1 and 64"),
    ("max_completion_tokens 0", {**GOOD, "max_completion_tokens": 0}, "max_tokens must be between 1 and 64, got 0"),
    ("temperature negative", {**GOOD, "temperature": -0.5}, "temperature must be 0 (greedy) or a finite number >= 0.001, got -0.5"),
    ("temperature NaN", '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     "temperature: Input should be a finite number"),
    ("top_p zero", {**GOOD, "top_p": 0}, "top-p must be in (0, 1]"),
    ("n > 1", {**GOOD, "n": 2}, "only n=1"),
    ("prompt too long", {**GOOD, "messages": [{"role": "user", "content": "word " * MAX_PROMPT}]},
     f"over this server's limit of {MAX_PROMPT}"),
    ("body too large", {**GOOD, "messages": [{"role": "user", "content": "x" * MAX_BODY}]}, "request body over"),
]


@pytest.mark.parametrize("body, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_gets_400_with_one_line_and_the_server_keeps_serving(live, body, message):
    r = _post(live, "/v1/chat/completions", body)
    assert r.status_code == 400
    error = r.json()["error"]["message"]
    assert message in error and "\n" not in error
    ok = _post(live, "/v1/chat/completions", GOOD)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 0


def test_bad_completion_prompt_and_openai_client_error(live):
    r = _post(live, "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2})
    assert r.status_code == 400 and "one string" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        live.client.completions.create(model="other", prompt="x", max_tokens=2)
    assert httpx.get(live.url + "/v1/nothing", timeout=TIMEOUT).status_code == 404


def _generated_after(server, seconds):
    time.sleep(seconds)
    return server.health()["generated_tokens"]


def test_disconnecting_client_cancels_its_generation(endless):
    before = endless.health()["generated_tokens"]
    with httpx.stream("POST", endless.url + "/v1/completions", json={"prompt": "go", "max_tokens": ENDLESS,
                      "stream": True}, timeout=TIMEOUT) as r:
        lines = r.iter_lines()
        assert sum(1 for _, line in zip(range(3), lines) if line.startswith("data:")) >= 1
    deadline = time.monotonic() + TIMEOUT
    while endless.health()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stopped = endless.health()["generated_tokens"]
    assert stopped - before < ENDLESS  # it did not run to max_tokens
    assert _generated_after(endless, 0.5) == stopped  # and nothing runs on


def test_non_streaming_client_that_gives_up_cancels_too(endless):
    before = endless.health()["generated_tokens"]
    with pytest.raises(httpx.ReadTimeout):
        _post(endless, "/v1/completions", {"prompt": "go", "max_tokens": ENDLESS}, timeout=0.5)
    deadline = time.monotonic() + TIMEOUT
    while endless.health()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert endless.health()["generated_tokens"] - before < ENDLESS


def test_full_queue_gets_503_and_never_hangs(endless):
    """batch 1, queue 1: one running, one waiting, the third is refused at once."""
    streams = []
    try:
        for _ in range(2):
            cm = httpx.stream("POST", endless.url + "/v1/completions", timeout=TIMEOUT,
                              json={"prompt": "go", "max_tokens": ENDLESS, "stream": True})
            streams.append((cm, cm.__enter__()))
        deadline = time.monotonic() + TIMEOUT
        while endless.health()["queued"] + endless.health()["running"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        r = _post(endless, "/v1/completions", {"prompt": "me too", "max_tokens": 2})
        assert r.status_code == 503 and "server busy" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 5
        with pytest.raises(openai.InternalServerError):
            endless.client.completions.create(model="tiny", prompt="x", max_tokens=2)
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
    deadline = time.monotonic() + TIMEOUT
    while endless.health()["running"] or endless.health()["queued"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert endless.client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_cli_serve_starts_and_refuses_bad_arguments(bundle):
    r = subprocess.run(["mistral-edge", "serve", "--bundle", "/nonexistent"], capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 1 and r.stderr.strip() == "error: /nonexistent: no such bundle directory"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.listen()
        r = subprocess.run(["mistral-edge", "serve", "--bundle", str(bundle.path), "--port", str(port)],
                           capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        taken = f"error: cannot listen on 127.0.0.1:{port} (Address already in use)"
        assert r.returncode == 1 and r.stderr.strip() == taken
    with _cli_server("--bundle", str(bundle.path), "--batch", "1") as (client, _):
        r = client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert r.object == "text_completion" and r.usage.completion_tokens >= 1


# --- serve --moderate ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded(bundle):
    """A moderating server per mode, started on first use."""
    servers = {}

    def get(mode: str) -> Live:
        if mode not in servers:
            servers[mode] = Live(bundle_source(bundle), EngineConfig(batch=2, queue=4, max_tokens=64), moderate=mode,
                                 fmt=ChatFormat.from_manifest(bundle.manifest))
        return servers[mode]

    yield get
    for server in servers.values():
        server.close()


def _ask(server, stream: bool, chat: bool, text: str, max_tokens: int = 8):
    """(content, finish_reason, usage) of one request through the openai client."""
    if chat:
        args = dict(model="tiny", messages=[{"role": "user", "content": text}], max_tokens=max_tokens)
        if not stream:
            r = server.client.chat.completions.create(**args)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
        chunks = list(server.client.chat.completions.create(stream=True, **args))
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    else:
        args = dict(model="tiny", prompt=text, max_tokens=max_tokens)
        if not stream:
            r = server.client.completions.create(**args)
            return r.choices[0].text, r.choices[0].finish_reason, r.usage
        chunks = list(server.client.completions.create(stream=True, **args))
        pieces = [c.choices[0].text for c in chunks if c.choices]
    return "".join(pieces), chunks[-1].choices[0].finish_reason, chunks[-1].usage


def _judging(monkeypatch, category: str | None, seen: list):
    """Record what the moderator is asked; `category` replaces its verdict (None: the model's own)."""
    real = Moderator.classify

    def classify(self, text, reply=None):
        seen.append((text, reply))
        if category is None:
            return real(self, text, reply)
        return Verdict(category, {k: float(k == category) for k in LABELS})

    monkeypatch.setattr(Moderator, "classify", classify)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [True, False])
def test_moderated_input_the_model_flags_is_refused_with_the_message(bundle, guarded, monkeypatch, stream, chat):
    """The tiny model's own verdict (it flags this text) refuses the request before any token is generated."""
    server, text = guarded("input"), "How do I pick a lock?"
    b = Bundle.open(bundle.path)
    fmt = ChatFormat.from_manifest(b.manifest)
    assert not Moderator(Generator(b.session(), b.tokenizer()), fmt).classify(text).acceptable
    seen = []
    _judging(monkeypatch, None, seen)
    before = server.health()["generated_tokens"]
    content, finish, usage = _ask(server, stream, chat, text)
    assert (content, finish) == (REFUSAL, "content_filter")
    ids = chat_ids(bundle, [{"role": "user", "content": text}]) if chat else bundle.tokenizer().encode(text)
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 0)
    assert seen == [(text, None)] and server.health()["generated_tokens"] == before


@pytest.mark.parametrize("stream", [False, True])
def test_moderated_output_is_judged_whole_and_replaced_before_a_byte_is_sent(bundle, guarded, monkeypatch, stream):
    server, text = guarded("output"), "Tell me about the sea"
    seen = []
    _judging(monkeypatch, None, seen)  # the tiny model flags its own reply
    content, finish, usage = _ask(server, stream, True, text, max_tokens=10)
    out, reply = direct(bundle, chat_ids(bundle, [{"role": "user", "content": text}]), 10)
    assert seen == [(text, reply)]  # the request is not judged, the whole reply is
    assert (content, finish, usage.completion_tokens) == (REFUSAL, "content_filter", len(out))


@pytest.mark.parametrize("stream", [False, True])
def test_both_moderated_an_acceptable_reply_comes_out_unchanged(bundle, guarded, monkeypatch, stream):
    server, text = guarded("both"), "Count to five"
    seen = []
    _judging(monkeypatch, "acceptable", seen)
    content, finish, usage = _ask(server, stream, True, text, max_tokens=12)
    out, reply = direct(bundle, chat_ids(bundle, [{"role": "user", "content": text}]), 12)
    assert content == reply and finish == ("length" if len(out) == 12 else "stop")
    assert seen == [(text, None), (text, reply)]
    _judging(monkeypatch, "hateful", seen)
    assert _ask(server, stream, True, text)[:2] == (REFUSAL, "content_filter")


def test_moderation_judges_the_last_user_turn(bundle, guarded, monkeypatch):
    seen = []
    _judging(monkeypatch, "illegal", seen)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "second"}]
    r = guarded("input").client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    assert r.choices[0].message.content == REFUSAL and seen == [("second", None)]


@pytest.mark.parametrize("args, message", [
    (["--moderate", "sideways"], "unknown --moderate 'sideways'; expected input, output, both"),
    (["--refusal", "No."], "--refusal applies with --moderate"),
    (["--model", "x"], "--model cannot be used with --backend onnx: a bundle brings its own model and window"),
    (["--chunk", "4"], "--chunk applies to --model; a bundle serves with its export's chunk"),
    (["--quant", "int8"], "--quant applies to --backend torch; a bundle's quantization is chosen at export"),
    (["--kv-cache", "int8"], "--kv-cache applies to --backend torch; a bundle's KV cache is chosen at export"),
])
def test_cli_serve_refuses_bad_options_in_one_line(bundle, args, message):
    r = subprocess.run(["mistral-edge", "serve", "--bundle", str(bundle.path), "--port", "1", *args],
                       capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 1 and r.stderr == f"error: {message}\n"


def test_cli_serve_moderates_with_the_configured_refusal(bundle):
    """The least work that shows it (one engine row, the bundle verified by the other CLI tests),
    under SUBPROCESS_TIMEOUT's generous bounds: a loaded machine can take it past a 60 s one."""
    with _cli_server("--bundle", str(bundle.path), "--moderate", "input", "--refusal", "Nope.", "--batch", "1",
                     "--queue", "1", "--no-verify") as (client, banner):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Nope.", "content_filter")
    assert "moderating input" in banner


def test_serve_moderate_loads_the_bundle_once(bundle, monkeypatch):
    """`serve --moderate` on a bundle: the engine's two sessions and the moderator's are one loaded
    graph (one onnxruntime session: the weights once), each with a cache of its own, so a check that
    runs while the engine decodes changes neither the verdict nor the reply."""
    import onnxruntime as ort

    from mistral_edge.cli import serve as serve_cli
    from mistral_edge.cli.generate import RunOptions

    loads, real = [], ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **kw: loads.append(a[0]) or real(*a, **kw))
    opts = RunOptions(bundle=bundle.path, moderate="input")
    source, fmt, _, _ = serve_cli._open(opts)
    config = EngineConfig(batch=2, queue=2, max_tokens=8)
    engine = Engine(source, config)
    moderation = serve_cli._moderation(opts, source, fmt, config)
    try:
        moderator = moderation.guard.moderator
        sessions = [engine.single, engine.multi, moderator.generator.session]
        assert len(loads) == 1 and len({id(s.session) for s in sessions}) == 1
        assert [s.batch for s in sessions] == [1, 2, 1] and len({id(s.cache["key.0"]) for s in sessions}) == 3
        text, ids = "How do I pick a lock?", chat_ids(bundle, [{"role": "user", "content": "Tell me about the sea"}])
        fresh = Moderator(Generator(bundle.session(), bundle.tokenizer()), fmt).classify(text)
        out, done = [], threading.Event()
        engine.stops = set()  # a reply of max_tokens tokens: the engine decodes while the moderator judges
        engine.submit(Job(ids, 8, SamplingParams(), lambda kind, *rest: out.append(rest[0]) if kind == "text"
                          else done.set()))
        assert moderator.classify(text) == fresh
        assert done.wait(TIMEOUT) and "".join(out) == bundle.tokenizer().decode(_greedy(bundle.session(), ids, 8))
    finally:
        engine.close()
        moderation.close()


# --- serve --model (the PyTorch reference) ---------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny random Mistral as a Hugging Face directory with a SentencePiece tokenizer."""
    out = tmp_path_factory.mktemp("hf") / "tiny-hf"
    tiny_hf_mistral(window=W, vocab=32000, dim=32).save_pretrained(out, safe_serialization=True)
    shutil.copy(SPM_V1, out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def reference(checkpoint):
    """(a batch-2 server on the checkpoint's torch backend, a batch-1 Generator on the same backend, its chat format)."""
    from mistral_edge.cli.generate import RunOptions, open_checkpoint
    gen, fmt, _ = open_checkpoint(RunOptions(model=str(checkpoint)))
    server = Live(reference_source(gen.session, gen.tokenizer), EngineConfig(batch=2, queue=8, max_tokens=64), fmt=fmt)
    yield server, gen, fmt
    server.close()


def _torch_direct(gen, ids, max_tokens):
    gen.session.reset()
    out = list(gen.stream_ids(ids, GenerationConfig(max_new_tokens=max_tokens)))
    return out, gen.tokenizer.decode(out)


def test_served_checkpoint_greedy_equals_direct_torch_generation(reference):
    server, gen, fmt = reference
    messages = [{"role": "user", "content": "Tell me about the sea"}]
    ids = fmt.encode(messages, gen.tokenizer)
    out, text = _torch_direct(gen, ids, 10)
    r = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=10)
    assert r.choices[0].message.content == text and r.usage.completion_tokens == len(out) > 0
    chunks = list(server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_served_checkpoint_batches_and_reuses_on_the_torch_backend(reference):
    """Rows move between the torch sessions (batched decode, cached conversations) without changing a token."""
    server, gen, fmt = reference
    prompts = [f"Question {i}: " + "why " * i for i in range(4)]
    before = server.health()["batched_steps"]
    got = ask_at_once(server, prompts)
    assert got == [_torch_direct(gen, gen.tokenizer.encode(p), 12)[1] for p in prompts]
    assert server.health()["batched_steps"] > before
    turn = [{"role": "user", "content": "Hi"}]
    first = server.client.chat.completions.create(model="tiny", messages=turn, max_tokens=4)
    second = turn + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
    r = server.client.chat.completions.create(model="tiny", messages=second, max_tokens=6)
    assert r.usage.prompt_tokens_details.cached_tokens >= len(fmt.encode(turn, gen.tokenizer))
    assert r.choices[0].message.content == _torch_direct(gen, fmt.encode(second, gen.tokenizer), 6)[1]


@pytest.mark.parametrize("options, shown", [({}, ""), ({"quant": "int8"}, " int8"), ({"kv_cache": "int8"}, " kv int8")])
def test_cli_serve_model_answers_a_chat_completion(checkpoint, reference, options, shown):
    """`serve --model` answers as direct torch generation does; with `--quant` or `--kv-cache` (generate's
    options), as direct generation on the model quantized or its cache stored the same way."""
    from mistral_edge.cli.generate import RunOptions, open_checkpoint

    gen, fmt = reference[1:] if not options else open_checkpoint(RunOptions(model=str(checkpoint), **options))[:2]
    messages = [{"role": "user", "content": "hi"}]
    args = [arg for key, value in options.items() for arg in (f"--{key.replace('_', '-')}", value)]
    with _cli_server("--model", str(checkpoint), "--batch", "1", *args) as (client, banner):
        assert [m.id for m in client.models.list()] == ["tiny-hf"]
        r = client.chat.completions.create(model="tiny-hf", messages=messages, max_tokens=6)
    assert r.choices[0].message.content == _torch_direct(gen, fmt.encode(messages, gen.tokenizer), 6)[1]
    assert f"(torch{shown} backend, batch 1," in banner


def _spy(engine) -> list[tuple[str, list[list[int]]]]:
    """Record the steps of an engine's sessions: (which session, the tokens each row fed: [] for none)."""
    calls = []
    for name in ("single", "multi"):
        session = getattr(engine, name)

        def step(tokens, valid_lens=None, all_logits=False, real=session.step, name=name):
            calls.append((name, [[int(t) for t in row[:n]] for row, n in zip(tokens, valid_lens)]))
            return real(tokens, valid_lens, all_logits)

        session.step = step
    return calls


def test_requests_arriving_together_prefill_together(bundle):
    """Two requests queued at once on a batch-2 engine: one batch step prefills both prompts (padded
    to the longer), and the first decode step serves both rows."""
    engine = Engine(bundle, EngineConfig(batch=2, queue=4, max_tokens=8))
    calls = _spy(engine)
    prompts = [bundle.tokenizer().encode(p) for p in ("first prompt", "a second one")]
    assert len(prompts[0]) != len(prompts[1]) and max(map(len, prompts)) <= engine.single.chunk
    try:
        done = [threading.Event(), threading.Event()]
        with engine._lock:  # the worker sees both at once
            for i, ids in enumerate(prompts):
                engine.submit(Job(ids, 4, SamplingParams(), lambda kind, *rest, i=i: kind != "text" and done[i].set()))
        assert all(d.wait(TIMEOUT) for d in done)
    finally:
        engine.close()
    assert calls[0] == ("multi", prompts), calls
    assert [len(row) for row in calls[1][1]] == [1, 1] and calls[1][0] == "multi", calls
    assert engine.batched_prefills == 1


class _Recorder:
    """A logits processor that changes nothing: it records the tokens its request samples and, at
    its `hold`-th token, holds the engine's worker (which calls it) until `go` is set."""

    def __init__(self, hold: int = 0):
        self.ids, self.hold = [], hold
        self.held, self.go = threading.Event(), threading.Event()

    def __call__(self, logits):
        return logits

    def accept(self, token: int) -> bool:
        self.ids.append(token)
        if len(self.ids) == self.hold:
            self.held.set()
            self.go.wait(TIMEOUT)
        return True


def _greedy(session, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids` on a fresh batch-1 session, EOS or not: what the request gets alone."""
    session.reset()
    gen = Generator(session, None)
    logits, out = gen.prefill(ids), []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = session.step(np.asarray([[out[-1]]], np.int64))[0, -1]
    return out


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_batched_prefill_gives_each_request_the_tokens_it_gets_alone(bundle, reference, backend):
    """On a batch-4 engine A (3 tokens) runs alone; B, C and D (12, 7 and 1 tokens) arrive while it
    decodes, and one batch step prefills them while A takes a token in it; E waits for a free row and
    prefills alone, in the batch-1 session, while the others decode (so do B's and C's later chunks,
    once fewer than half the rows prefill). Every request's greedy tokens equal its tokens alone."""
    source = bundle_source(bundle) if backend == "onnx" else reference_source(reference[1].session, reference[1].tokenizer)
    engine = Engine(source, EngineConfig(batch=4, queue=4, max_tokens=64))
    engine.stops = set()  # every request runs to its max_tokens
    calls = _spy(engine)
    lengths, budgets = {"A": 3, "B": 12, "C": 7, "D": 1, "E": 9}, {"A": 24, "B": 20, "C": 4, "D": 8, "E": 6}
    prompts = {k: [200 + 17 * i + 5 * n for i in range(n)] for k, n in lengths.items()}
    record = {k: _Recorder(hold=3 if k == "A" else 0) for k in prompts}
    done = {k: threading.Event() for k in prompts}

    def submit(*names):
        with engine._lock:  # the worker takes them in one turn
            for k in names:
                engine.submit(Job(prompts[k], budgets[k], SamplingParams(),
                                  lambda kind, *rest, k=k: kind != "text" and done[k].set(), processor=record[k]))

    try:
        submit("A")
        assert record["A"].held.wait(TIMEOUT)  # the worker is held inside A's third token
        submit("B", "C", "D", "E")
        record["A"].go.set()
        assert all(d.wait(TIMEOUT) for d in done.values())
        alone = source.session()
        assert {k: r.ids for k, r in record.items()} == {k: _greedy(alone, prompts[k], budgets[k]) for k in prompts}
    finally:
        record["A"].go.set()
        engine.close()
    first = {k: p[:engine.single.chunk] for k, p in prompts.items()}
    together = [rows for name, rows in calls if name == "multi" and first["B"] in rows]
    assert together and sorted(together[0]) == sorted([first["B"], first["C"], first["D"], [record["A"].ids[2]]])
    assert ("single", [first["E"]]) in calls, calls
    assert engine.batched_prefills >= 1


def test_stream_interval_joins_pieces_and_loses_nothing(bundle):
    """With a 0.3 s interval a fast reply streams in a few events, sent 0.3 s or more apart (so the
    last arrives at least 0.3 s x (events - 1) after the request, however late the client reads
    them); the text is the same."""
    server = Live(bundle, EngineConfig(batch=1, queue=2, max_tokens=64), eos=False, stream_interval=0.3)
    try:
        args = dict(model="tiny", prompt="Once upon a time", max_tokens=40)
        plain = server.client.completions.create(**args)
        t0, stamps, pieces = time.monotonic(), [], []
        for chunk in server.client.completions.create(stream=True, **args):
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.monotonic() - t0)
                pieces.append(chunk.choices[0].text)
    finally:
        server.close()
    assert "".join(pieces) == plain.choices[0].text and plain.usage.completion_tokens == 40
    assert len(pieces) < 20 and stamps[-1] > 0.29 * (len(pieces) - 1), stamps
