"""Session snapshots: resume continues exactly, the size stops at W, and foreign or damaged files are refused
(for bundles, and for checkpoints on the torch backend)."""

import hashlib
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from mistral_edge.chat_format import PLAIN_TEMPLATE, ChatFormat
from mistral_edge.cli.generate import RunOptions, open_checkpoint
from mistral_edge.errors import EdgeError
from mistral_edge.model.torch_session import TorchSession, model_identity
from mistral_edge.runtime.chat import ChatEngine
from mistral_edge.runtime.bundle import Bundle
from mistral_edge.runtime.generate import GenerationConfig, Generator
from mistral_edge.runtime.sampling import Sampler, SamplingParams
from mistral_edge.serve import snapshot
from mistral_edge.serve.snapshot import (BLOCK, TokenHistory, bundle_identity, capture, load, restore,
                                         restore_sampler, resume_chat, resume_session, sampler_state, save, save_chat,
                                         save_session)
from helpers import SPM_V1, W, tiny_hf_mistral, write_tiny_bundle, write_tiny_hf_dir

CFG = GenerationConfig(max_new_tokens=12)
CLI = [sys.executable, "-c", "from mistral_edge.cli.main import main; main()"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    write_tiny_bundle(out)
    return Bundle.open(out)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_hf_dir(tmp_path_factory.mktemp("hf") / "tiny-hf", window=W)


def _torch(checkpoint, **options) -> Generator:
    """A batch-1 Generator on the checkpoint's torch backend, as `chat --model` opens it."""
    return open_checkpoint(RunOptions(model=str(checkpoint), **options))[0]


TORCH_SOURCES = {"model": {}, "model-bf16": {"dtype": "bf16"}, "model-kv8": {"kv_cache": "int8"},
                 "model-kv16": {"kv_cache": "fp16"}, "model-kv8-sinks": {"kv_cache": "int8"}}
"""The checkpoint on the torch backend as RunOptions open it: fp32; bf16 (its cache travels as bit
patterns); an int8 cache (codes and their fp16 scales), with and without 2 sinks; an fp16 cache."""


@pytest.fixture(params=["bundle", *TORCH_SOURCES])
def source(request):
    """What a snapshot belongs to: (its identity, a maker of fresh batch-1 sessions, the tokenizer), for the
    bundle, or the checkpoint on the torch backend (TORCH_SOURCES)."""
    if request.param == "bundle":
        b = request.getfixturevalue("bundle")
        return bundle_identity(b), b.session, b.tokenizer()
    gen = _torch(request.getfixturevalue("checkpoint"), **TORCH_SOURCES[request.param])
    s, sinks = gen.session, 2 if request.param.endswith("sinks") else 0
    return (model_identity(s.model),
            lambda: TorchSession(s.model, s.window, min(s.chunk, s.window - sinks), sinks=sinks, kv_cache=s.kv_cache),
            gen.tokenizer)


def _turn(gen: Generator, ids: list[int], fed: list[int]) -> list[int]:
    """One turn: feed `ids`, generate greedily; `fed` collects every token the cache took."""
    out = list(gen.stream_ids(ids, CFG, history=fed + ids))
    fed += ids + out
    return out


@pytest.mark.parametrize("first_turn", [7, 23])  # the history stays inside W, or passes it
def test_resumed_session_continues_like_an_uninterrupted_one(source, tmp_path, first_turn):
    identity, session, tok = source
    gen, fed = Generator(session(), tok), []
    _turn(gen, list(range(100, 100 + first_turn)), fed)
    path = tmp_path / "chat.snap"
    save_session(path, identity, gen.session, fed)
    saved = capture(gen.session, 0, TokenHistory.of(fed, W)).cache
    second = list(range(300, 309))
    expected = _turn(gen, second, list(fed))

    resumed = Generator(session(), tok)
    state = resume_session(path, identity, resumed.session)
    restored = capture(resumed.session, 0, state.history).cache
    assert state.history.count == len(fed) == resumed.session.positions[0]
    assert state.history.tail == tuple(fed[-state.history.keep:])
    for name, a in saved.items():  # the resumed cache is the saved one, bit for bit (an int8 cache's scales too)
        b = restored[name]
        assert a.shape[1] == min(len(fed), W) and a.dtype == b.dtype and np.array_equal(a, b), name
    assert _turn(resumed, second, list(fed)) == expected and expected


def test_snapshot_size_stops_growing_at_the_window(bundle, tmp_path):
    session = bundle.session()
    sizes = {}
    for n in (W // 2, 5 * W, 6 * W + 7, 40 * W):  # the tail keeps max(W, BLOCK) = 4W tokens
        session.reset()
        ids = [5 + i % 50 for i in range(n)]
        for i in ids:
            session.step(np.asarray([[i]]))
        sizes[n] = save_session(tmp_path / f"{n}.snap", bundle_identity(bundle), session, ids)
    assert sizes[5 * W] == sizes[6 * W + 7] == sizes[40 * W] > sizes[W // 2]


def test_sampler_state_round_trip():
    sampler = Sampler(SamplingParams(0.8, top_p=0.9, seed=3))
    logits = np.random.default_rng(0).normal(size=200).astype(np.float32)
    for _ in range(5):
        sampler(logits)
    again = restore_sampler(sampler_state(sampler))
    assert [again(logits) for _ in range(20)] == [sampler(logits) for _ in range(20)]
    assert again.params == sampler.params
    with pytest.raises(EdgeError, match="sampler state is malformed"):
        restore_sampler({"params": {"temperature": 1.0}, "rng": {"bit_generator": "nope"}})


def test_sampler_state_travels_in_the_file(bundle, tmp_path):
    session = bundle.session()
    session.step(np.asarray([[7, 8, 9]]))
    sampler = Sampler(SamplingParams(1.0, seed=11))
    sampler(np.zeros(50, np.float32))
    ident = bundle_identity(bundle)
    save(tmp_path / "s.snap", capture(session, 0, TokenHistory.of([7, 8, 9], W), sampler), session, ident)
    state = load(tmp_path / "s.snap", bundle.session(), ident)
    assert state.sampler == sampler_state(sampler)


@pytest.fixture()
def saved(bundle, tmp_path):
    session = bundle.session()
    ids = list(range(40, 40 + 2 * W))
    for s in range(0, len(ids), 5):
        session.step(np.asarray([ids[s:s + 5]]))
    path = tmp_path / "s.snap"
    save_session(path, bundle_identity(bundle), session, ids)
    return path


def _damage(path, offset, value=None):
    data = bytearray(path.read_bytes())
    data[offset] = (data[offset] ^ 0xFF) if value is None else value
    path.write_bytes(bytes(data))


def test_tampered_snapshot_refused(bundle, saved):
    size = saved.stat().st_size
    _damage(saved, size - 100)  # one cache byte
    with pytest.raises(EdgeError, match=r"damaged snapshot \(checksum mismatch\)$"):
        resume_session(saved, bundle_identity(bundle), bundle.session())


@pytest.mark.parametrize("how, message", [
    ("truncate", r"damaged snapshot \(size"),
    ("magic", "not a mistral-edge session snapshot"),
    ("header", r"damaged snapshot \(unreadable header\)"),
    ("huge", r"damaged snapshot \(header of"),
    ("empty", "not a mistral-edge session snapshot"),
])
def test_damaged_snapshot_refused_in_one_line(bundle, saved, how, message):
    data = saved.read_bytes()
    if how == "truncate":
        saved.write_bytes(data[:-1])
    elif how == "magic":
        _damage(saved, 0)
    elif how == "header":
        _damage(saved, len(snapshot.MAGIC) + 8, ord("}"))
    elif how == "huge":
        _damage(saved, len(snapshot.MAGIC) + 6, 0x7F)
    else:
        saved.write_bytes(b"")
    with pytest.raises(EdgeError, match=message) as e:
        resume_session(saved, bundle_identity(bundle), bundle.session())
    assert "\n" not in str(e.value)


def test_forged_snapshot_with_a_valid_checksum_is_checked_too(bundle, saved):
    """The checksum catches damage, not forgery: token ids are range-checked before anyone indexes with them."""
    import hashlib

    data = bytearray(saved.read_bytes()[:-32])
    tail_at = len(snapshot.MAGIC) + 8 + int.from_bytes(data[len(snapshot.MAGIC):len(snapshot.MAGIC) + 8], "little")
    data[tail_at:tail_at + 8] = (10**9).to_bytes(8, "little")
    saved.write_bytes(bytes(data) + hashlib.sha256(data).digest())
    with pytest.raises(EdgeError, match="token ids outside the vocabulary"):
        resume_session(saved, bundle_identity(bundle), bundle.session())


def test_snapshot_of_another_bundle_refused(bundle, saved, tmp_path):
    with pytest.raises(EdgeError, match="snapshot belongs to another bundle"):
        load(saved, bundle.session(), "0" * 64)
    with pytest.raises(EdgeError, match="cannot read snapshot"):
        load(tmp_path / "absent.snap", bundle.session(), "0" * 64)


def test_torch_snapshot_of_another_model_or_tampered_is_refused(checkpoint, tmp_path):
    """The identity tells the checkpoint as loaded: the same one again matches; another checkpoint, or the
    same one quantized (its cache is another model's), is refused in one line; so is a damaged file."""
    session = _torch(checkpoint).session
    session.step(np.asarray([[5, 6, 7, 8]]))
    path = tmp_path / "t.snap"
    save_session(path, model_identity(session.model), session, [5, 6, 7, 8])
    again = _torch(checkpoint).session
    resume_session(path, model_identity(again.model), again)
    assert int(again.positions[0]) == 4
    other_dir = tmp_path / "other"
    tiny_hf_mistral(window=W, vocab=32000, dim=64, seed=1).save_pretrained(other_dir)
    (other_dir / "tokenizer.model").write_bytes(SPM_V1.read_bytes())
    for other in (_torch(other_dir).session, _torch(checkpoint, quant="int8-wo").session):
        with pytest.raises(EdgeError, match=r"t.snap: snapshot belongs to another model \(identity ") as e:
            resume_session(path, model_identity(other.model), other)
        assert "\n" not in str(e.value)
    _damage(path, path.stat().st_size - 100)
    with pytest.raises(EdgeError, match=r"damaged snapshot \(checksum mismatch\)$"):
        resume_session(path, model_identity(again.model), again)


def test_torch_snapshot_of_another_cache_type_is_refused(checkpoint, tmp_path):
    """A snapshot is only valid for the cache type that wrote it: an int8 cache's file (codes, then
    fp16 scales) resumes into an int8-cache session and is refused by the fp32 or fp16 ones, and
    theirs by it, in one line."""
    paths = {}
    for kv_cache in ("int8", "fp16", None):
        session = _torch(checkpoint, kv_cache=kv_cache).session
        session.step(np.asarray([[5, 6, 7, 8]]))
        paths[kv_cache] = tmp_path / f"{kv_cache}.snap"
        save_session(paths[kv_cache], model_identity(session.model), session, [5, 6, 7, 8])
    for kv_cache, path in paths.items():
        for other in set(paths) - {kv_cache}:
            session = _torch(checkpoint, kv_cache=other).session
            with pytest.raises(EdgeError, match=r"snapshot cache layout does not match this model's cache$"):
                resume_session(path, model_identity(session.model), session)


def test_forged_int8_torch_snapshot_with_a_valid_checksum_is_checked(checkpoint, tmp_path):
    """The header's counts are checked against the cache type's sizes before any array is read: a file
    whose header claims 3 of its 4 slots (consistent counts, checksum rewritten to match) is one error line."""
    session = _torch(checkpoint, kv_cache="int8").session
    session.step(np.asarray([[5, 6, 7, 8]]))
    path = tmp_path / "f.snap"
    save_session(path, model_identity(session.model), session, [5, 6, 7, 8])
    data = path.read_bytes()[:-32]
    (n_header,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[16:16 + n_header])
    header["slots"] = header["count"] = header["tail"] = 3
    blob = json.dumps(header).encode()
    blob += b" " * (n_header - len(blob))
    forged = data[:16] + blob + data[16 + n_header:]
    path.write_bytes(forged + hashlib.sha256(forged).digest())
    with pytest.raises(EdgeError, match=r"f.snap: damaged snapshot \(size \d+ bytes, header implies \d+\)$"):
        resume_session(path, model_identity(session.model), session)


def test_save_is_atomic(bundle, saved):
    before = saved.read_bytes()
    session = bundle.session()
    session.step(np.asarray([[1, 2]]))
    state = capture(session, 0, TokenHistory.of([1, 2], W))
    del state.cache["value.1"]  # fails halfway through writing
    with pytest.raises(KeyError):
        save(saved, state, session, bundle_identity(bundle))
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]


def test_token_history_prefix_checks():
    ids = [(i * 7) % 1000 for i in range(3 * BLOCK + 5)]
    h = TokenHistory.of(ids, 16)
    assert h == TokenHistory.of(ids[:100], 16).extend(ids[100:])  # the chain does not depend on the split
    assert not h.complete and len(h.tail) == BLOCK
    assert h.common_prefix(ids + [1, 2]) == len(ids)
    assert h.common_prefix(ids[:-1]) == 0  # shorter than the history
    changed = list(ids)
    changed[3] += 1  # before the tail: only the hash chain sees it
    assert h.common_prefix(changed) == 0
    short = TokenHistory.of(ids[:10], 16)
    assert short.complete and short.common_prefix(ids[:6] + [999, 999]) == 6


def test_truncated_state_equals_a_fresh_prefill(bundle):
    """A cached conversation inside W can be cut back to a shorter shared prefix."""
    a = bundle.session()
    a.step(np.asarray([[11, 12, 13, 14, 15, 16, 17]]))
    state = capture(a, 0, TokenHistory.of([11, 12, 13, 14, 15, 16, 17], W)).truncated(4, W)
    b = bundle.session()
    restore(b, 0, state)
    got = b.step(np.asarray([[20, 21]]))[0, -1].copy()
    fresh = bundle.session()
    fresh.step(np.asarray([[11, 12, 13, 14]]))
    assert np.allclose(got, fresh.step(np.asarray([[20, 21]]))[0, -1], atol=1e-5)
    long = bundle.session()
    ids = list(range(1, 2 * W))
    long.step(np.asarray([ids[:W]]))
    long.step(np.asarray([ids[W:]]))
    assert capture(long, 0, TokenHistory.of(ids, W)).truncated(4, W) is None  # the ring overwrote them


@pytest.mark.parametrize("fmt", [ChatFormat(mistral=True), ChatFormat(PLAIN_TEMPLATE)], ids=["mistral", "template"])
def test_continuation_is_what_the_full_encoding_adds_after_the_reply(bundle, fmt):
    tok = bundle.tokenizer()
    conv = [{"role": "user", "content": "Hi there"}]
    more = [{"role": "user", "content": "How are you?"}]
    full = fmt.encode([*conv, {"role": "assistant", "content": "Fine"}, *more], tok)
    cont = snapshot.continuation(fmt, tok, more)
    assert full == fmt.encode(conv, tok) + tok.encode("Fine", add_bos=False) + cont


def test_chat_resumed_from_a_file_answers_like_the_uninterrupted_chat(bundle, tmp_path):
    """Two turns, save; the third turn after resume equals the third turn of the chat that went on."""
    tok, fmt = bundle.tokenizer(), ChatFormat.from_manifest(bundle.manifest)
    cfg = GenerationConfig(max_new_tokens=6)
    chat = ChatEngine(Generator(bundle.session(), tok), lambda m: fmt.encode(m, tok))
    for text in ("Hello, who are you?", "What do you like?"):
        "".join(chat.reply(text, cfg))
    assert chat.generator.session.positions[0] == len(chat.fed) > W  # no turn was re-prefilled from scratch
    save_chat(tmp_path / "c.snap", bundle_identity(bundle), chat)
    expected = "".join(chat.reply("Tell me a story", cfg))

    resumed = ChatEngine(Generator(bundle.session(), tok), lambda m: fmt.encode(m, tok))
    history = resume_chat(tmp_path / "c.snap", bundle_identity(bundle), resumed, fmt)
    assert "".join(resumed.reply("Tell me a story", cfg)) == expected
    assert save_chat(tmp_path / "d.snap", bundle_identity(bundle), resumed, history) > 0  # saving again after a resume
    again = Generator(bundle.session(), tok)
    state = resume_session(tmp_path / "d.snap", bundle_identity(bundle), again.session)
    assert state.history.count == chat.generator.session.positions[0]


def _chat(source: list[str], stdin: str, *args, in_process: bool = False) -> subprocess.CompletedProcess:
    """`mistral-edge chat SOURCE ... ARGS` fed `stdin`: in a fresh interpreter, or `in_process`
    through the CLI's own entry (cli.main.run: its exit status and one-line errors), which spares a
    chat that runs several times an interpreter's start and imports (torch's, with --model) each time."""
    argv = ["chat", *source, "--max-new-tokens", "6", *map(str, args)]
    if not in_process:
        return subprocess.run([*CLI, *argv], input=stdin, capture_output=True, text=True, timeout=120)
    from typer.testing import CliRunner

    from mistral_edge.cli.main import run

    with CliRunner().isolation(input=stdin) as (out, err, _):
        code = run(argv)
        sys.stdout.flush(), sys.stderr.flush()
        return subprocess.CompletedProcess(argv, code, out.getvalue().decode(), err.getvalue().decode())


def _replies(r: subprocess.CompletedProcess) -> list[str]:
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.split("you> ") if line.startswith("assistant> ")]


@pytest.mark.parametrize("backend", ["bundle", "model"])
def test_chat_command_saves_and_resumes(bundle, checkpoint, tmp_path, backend):
    """`chat --save` then `chat --resume`, on a bundle or with --model (the torch backend): the resumed
    chat's turn is the uninterrupted chat's turn."""
    source = ["--bundle", str(bundle.path)] if backend == "bundle" else ["--model", str(checkpoint)]
    whole = _replies(_chat(source, "Hello, who are you?\nTell me a story\n"))  # a process of its own
    assert _replies(_chat(source, "Hello, who are you?\n", "--save", tmp_path / "c.snap", in_process=True)) == whole[:1]
    assert _replies(_chat(source, "Tell me a story\n", "--resume", tmp_path / "c.snap", in_process=True)) == whole[1:]
    if backend == "model":  # the same checkpoint quantized is another model
        r = _chat(source, "Tell me a story\n", "--quant", "int8-wo", "--resume", tmp_path / "c.snap", in_process=True)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
        assert "snapshot belongs to another model" in r.stderr and "assistant>" not in r.stdout


def test_chat_command_refuses_a_save_it_cannot_make(bundle, tmp_path):
    source = ["--bundle", str(bundle.path)]
    r = _chat(source, "", "--moderate", "input", "--save", tmp_path / "d.snap")
    assert r.returncode == 1 and r.stderr.startswith("error: --save/--resume take a conversation without --moderate")
    r = _chat(source, "hi\n", "--save", tmp_path / "no" / "dir" / "c.snap")
    assert r.returncode == 1 and r.stderr.startswith("error: --save") and "not a writable directory" in r.stderr
    assert "you>" not in r.stdout  # refused before the conversation, not after it
