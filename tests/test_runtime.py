"""The on-device runtime: generation loop, stops, streaming, batches, chat past W, memory, no torch."""

import subprocess
import sys

import numpy as np
import psutil
import pytest
import torch

from mistral_edge.errors import EdgeError
from mistral_edge.model.reference import ReferenceModel
from mistral_edge.runtime.bundle import Bundle
from mistral_edge.runtime.chat import ChatEngine
from mistral_edge.runtime.generate import GenerationConfig, Generator, generate_batch
from mistral_edge.runtime.sampling import SamplingParams
from helpers import W, write_tiny_bundle



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    ck = write_tiny_bundle(out)
    return ck, out


def greedy_reference(ck, prompt, n):
    """Greedy continuation by the PyTorch reference, token by token after the prompt."""
    ref = ReferenceModel(ck.config, ck.weights)
    cache = ref.new_cache()
    logits = ref.prefill(torch.tensor([prompt]), cache, 5)[0, -1]
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = ref.forward(torch.tensor([[out[-1]]]), cache)[0, -1]
    return out


def test_greedy_generation_matches_reference_past_the_window(tiny):
    ck, out = tiny
    b = Bundle.open(out)
    gen = Generator(b.session(), b.tokenizer())
    prompt = list(range(100, 123))  # 23 tokens: prefill crosses W
    got = list(gen.stream_ids(prompt, GenerationConfig(max_new_tokens=3 * W, stop_tokens=())))
    expected = greedy_reference(ck, prompt, len(got))
    assert got == expected[:len(got)] and len(got) > W  # stopped only by EOS, if at all


def test_stream_equals_decode_and_stop_strings(tiny):
    ck, out = tiny
    b = Bundle.open(out)
    tok = b.tokenizer()
    gen = Generator(b.session(), tok)
    prompt = tok.encode("Hello there")
    cfg = GenerationConfig(max_new_tokens=20)
    ids = list(gen.stream_ids(prompt, cfg))
    gen.session.reset()
    text = "".join(gen.stream(prompt, cfg))
    assert text == tok.decode(ids)
    # a stop string from the reply's second half that is not blank (a blank one would test nothing)
    start = next(i for i in range(len(text) // 2, len(text) - 2) if text[i:i + 3].strip())
    stop = text[start:start + 3]
    gen.session.reset()
    cut = "".join(gen.stream(prompt, GenerationConfig(max_new_tokens=20, stop_strings=(stop,))))
    assert cut == text[:text.find(stop)] and len(cut) < len(text)


def test_stop_token_and_seeded_sampling(tiny):
    _, out = tiny
    b = Bundle.open(out)
    gen = Generator(b.session(), b.tokenizer())
    prompt = list(range(50, 60))
    greedy = list(gen.stream_ids(prompt, GenerationConfig(max_new_tokens=8)))
    gen.session.reset()
    stopped = list(gen.stream_ids(prompt, GenerationConfig(max_new_tokens=8, stop_tokens=(greedy[2],))))
    assert stopped == greedy[:greedy.index(greedy[2])]
    def sample(seed: int) -> list[int]:
        gen.session.reset()
        cfg = GenerationConfig(max_new_tokens=10, sampling=SamplingParams(1.0, 50, 0.9, 1.1, seed=seed))
        return list(gen.stream_ids(prompt, cfg))
    assert sample(7) == sample(7)  # seeded: reproducible
    assert any(sample(seed) != sample(7) for seed in (8, 9, 10))  # and really sampled, not greedy


def test_batch_of_prompts_of_different_lengths(tiny):
    _, out = tiny
    b = Bundle.open(out)
    prompts = [list(range(10, 33)), list(range(200, 207))]
    cfg = GenerationConfig(max_new_tokens=12)
    batched = generate_batch(b.session(batch=2), prompts, cfg, eos_ids=(2,))
    for prompt, got in zip(prompts, batched):
        alone = Generator(b.session(), b.tokenizer())
        assert got == list(alone.stream_ids(prompt, cfg))


def test_chat_longer_than_window_keeps_working(tiny):
    _, out = tiny
    b = Bundle.open(out)
    from mistral_edge.chat_format import ChatFormat

    tok = b.tokenizer()
    fmt = ChatFormat.from_manifest(b.manifest)
    gen = Generator(b.session(), tok)
    engine = ChatEngine(gen, lambda m: fmt.encode(m, tok))
    for turn in range(4):
        "".join(engine.reply(f"turn {turn}: tell me something", GenerationConfig(max_new_tokens=6)))
    assert gen.session.positions[0] > 3 * W
    assert len(engine.messages) == 8
    assert gen.session.positions[0] == len(engine.fed)  # each turn fed only the new tokens


def test_both_backends_are_sessions(tiny):
    """DecoderSession and TorchSession satisfy the Session protocol and agree on a step."""
    from mistral_edge.model.torch_session import TorchSession
    from mistral_edge.runtime.session import Session

    ck, out = tiny
    onnx_session = Bundle.open(out).session()
    torch_session = TorchSession(ReferenceModel(ck.config, ck.weights), W, 5)
    tokens = np.arange(100, 105)[None]
    for session in (onnx_session, torch_session):
        assert isinstance(session, Session)
        assert (session.batch, session.window, session.chunk, session.vocab_size) == (1, W, 5, 32000)
    np.testing.assert_allclose(onnx_session.step(tokens), torch_session.step(tokens), atol=1e-4)
    for session in (onnx_session, torch_session):
        assert session.positions[0] == 5
        session.reset()
        assert session.positions[0] == 0


def test_memory_stays_flat_after_many_windows(tiny):
    """Cache bytes stop at W slots, and RSS after 10*W generated tokens is within a few MB of after W."""
    _, out = tiny
    b = Bundle.open(out)
    session = b.session()
    cfg = b.manifest.config
    proc = psutil.Process()
    tok = np.array([[5]])
    for _ in range(W):
        session.step(tok)
    assert session.cache_bytes == cfg.n_layers * 2 * cfg.n_kv_heads * W * cfg.head_dim * 4
    after_w = proc.memory_info().rss
    for _ in range(9 * W):
        session.step(tok)
    assert session.positions[0] == 10 * W
    assert proc.memory_info().rss - after_w < 4 * 2**20


RUNTIME_ONLY = """
import sys
BLOCKED = {blocked!r}

class Blocker:  # the packages requirements-runtime.txt does not install are absent
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {{name!r}} (blocked: not in requirements-runtime.txt)")
        return None

sys.meta_path.insert(0, Blocker())
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{{name}} was imported: the blocker does not block")
from mistral_edge.cli.main import main
sys.argv = ["mistral-edge", *sys.argv[1:]]
main()
"""
BLOCKED = ("torch", "transformers", "onnx", "gguf", "safetensors", "ml_dtypes")


def test_runtime_runs_with_requirements_runtime_only(tiny):
    """A phone has only requirements-runtime.txt: with torch, transformers, onnx, gguf, safetensors and
    ml_dtypes unimportable, `verify`, `inspect` and `generate --bundle` run the bundle."""
    _, out = tiny
    code = RUNTIME_ONLY.format(blocked=BLOCKED)
    for args in (["verify", out], ["inspect", out], ["generate", "--bundle", out, "Hello", "--max-new-tokens", "5"]):
        r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    assert r.stdout.strip()  # generate wrote a reply
    r = subprocess.run([sys.executable, "-c", code, "export", "--out", str(out.parent / "x")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "blocked" in r.stderr  # export needs torch: the blocker really blocks


def test_cli_generate_needs_bundle_or_torch(tiny):
    r = subprocess.run(["mistral-edge", "generate", "--backend", "onnx", "hi"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: give --bundle DIR")
    r = subprocess.run(["mistral-edge", "generate", "--bundle", "/nonexistent", "hi"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip() == "error: /nonexistent: no such bundle directory"


def test_bundle_missing_files_refused(tiny, tmp_path):
    import shutil

    _, out = tiny
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "tokenizer.model").unlink()
    with pytest.raises(EdgeError, match="missing file tokenizer.model"):
        Bundle.open(broken)


def test_bad_sampling_params():
    with pytest.raises(EdgeError, match="top-p"):
        SamplingParams(top_p=0)
    with pytest.raises(EdgeError, match="temperature"):
        SamplingParams(temperature=-1)
