"""The native WindowedGroupQueryAttention kernel against the function body and the PyTorch reference.

Every test that needs the library builds it if it is missing and is skipped, with the build's
reason, where it cannot be built; the function-body path is forced with kernel="off", the native
one with kernel="on" (which fails rather than falling back), so both paths run here.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from mistral_edge import kernels
from mistral_edge.errors import EdgeError
from mistral_edge.export.pipeline import export_onnx
from mistral_edge.kernels.build import BuildError, build
from mistral_edge.model.reference import ReferenceModel
from mistral_edge.quantize.spec import parse_quant
from mistral_edge.runtime.session import DecoderSession, SessionConfig
from helpers import FP16_TOL, assert_close, checkpoint_of, tiny_hf_mistral


@pytest.fixture(scope="module")
def library():
    if kernels.library_path() is None:
        try:
            build()
        except BuildError as e:
            pytest.skip(f"native kernel cannot be built here: {e}")
    return kernels.library_path()


def schedule(w: int) -> list[tuple[int, list[int]]]:
    """(chunk, valid lengths of the 2 rows): padding, decode, an odd chunk, C = W (the ring's
    slots, W - sinks) after the first W tokens (so it wraps), decode after the wrap, and a row
    with no valid token."""
    return [(5, [5, 3]), (1, [1, 1]), (1, [1, 1]), (7, [7, 2]), (w, [w, w]),
            (1, [1, 1]), (1, [1, 1]), (1, [1, 1]), (3, [3, 0]), (1, [1, 1])]


def run(session, tokens_of, steps):
    """Logits [2, C, V] of every step, and the cache once done."""
    out = []
    for i, (chunk, valid) in enumerate(steps):
        out.append(session.step(tokens_of(i, chunk), np.array(valid), all_logits=True).copy())
    return out, {k: a.copy() for k, a in session._arrays.items()}


def reference(ck, w, tokens_of, steps, sinks=0):
    ref = ReferenceModel(ck.config, ck.weights)
    cache = ref.new_cache(batch=2, window=w, sinks=sinks)
    return [ref.forward(torch.tensor(tokens_of(i, c)), cache, torch.tensor(v)).numpy()
            for i, (c, v) in enumerate(steps)]


@pytest.mark.parametrize("w", [16, 80])  # 80 > GROW: the cache has S = 64 < W slots for a while
@pytest.mark.parametrize("act", ["fp32", "fp16"])
@pytest.mark.parametrize("sinks", [0, 3])
def test_kernel_equals_function_body_and_reference(library, tmp_path, w, act, sinks):
    dim = 64 if w > 64 else 32  # head_dim 16 (full vectors) and 8
    ck = checkpoint_of(tiny_hf_mistral(window=w, vocab=128, dim=dim, seed=w))
    path = tmp_path / "m.onnx"
    export_onnx(ck, parse_quant("fp32"), path, chunk=5, activations=act, sinks=sinks)
    rng = np.random.default_rng(w)
    table = rng.integers(0, 128, (len(schedule(w)), 2, w))

    def tokens_of(i, c):
        return table[i, :, :c]
    steps = schedule(w - sinks)

    native = DecoderSession(path, batch=2, config=SessionConfig(threads=2, kernel="on"))
    before = kernels.calls()
    got, got_cache = run(native, tokens_of, steps)
    assert native.attention_path.startswith("native kernel")
    assert kernels.calls() - before == len(steps) * ck.config.n_layers  # every node ran natively
    body = DecoderSession(path, batch=2, config=SessionConfig(threads=1, kernel="off"))
    before = kernels.calls()
    want, want_cache = run(body, tokens_of, steps)
    assert body.attention_path.startswith("function body") and kernels.calls() == before
    expected = reference(ck, w, tokens_of, steps, sinks)

    assert native.slots == body.slots == w - sinks
    assert len(want_cache) == 2 * ck.config.n_layers * (2 if sinks else 1)
    for name, cache in want_cache.items():  # the kernel wrote the bound buffers in place
        assert abs(cache).max() > 0
        np.testing.assert_allclose(got_cache[name], cache, atol=1e-5 if act == "fp32" else 2e-3)
    for (chunk, valid), g, f, r in zip(steps, got, want, expected):
        for row, n in enumerate(valid):  # padding positions have no defined logits
            tol = 1e-5 if act == "fp32" else FP16_TOL * abs(f).max()
            assert abs(g[row, :n] - f[row, :n]).max(initial=0) <= tol
            if n:
                assert_close(g[row, :n], r[row, :n], act)


VARIANT_CHECK = """
import sys
import numpy as np
sys.path.insert(0, "tests")
from mistral_edge import kernels
from mistral_edge.runtime.session import DecoderSession, SessionConfig
path, w = sys.argv[1], int(sys.argv[2])
outs = []
for mode in ("on", "off"):
    s = DecoderSession(path, batch=2, config=SessionConfig(threads=1, kernel=mode))
    rng = np.random.default_rng(1)
    outs.append([s.step(rng.integers(0, 128, (2, c)), np.array(v), all_logits=True).copy()
                 for c, v in ((5, [5, 3]), (w, [w, w - 1]), (1, [1, 1]))])
err = max(float(abs(a[:, :3] - b[:, :3]).max()) for a, b in zip(*outs))
print(kernels.isa(), err)
"""


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_every_compute_variant(library, tmp_path, isa):
    """The lesser variants (the library picks the best one the CPU has) on head_dim 16 and 8."""
    for dim, w in ((64, 16), (32, 20)):  # 4 heads: head_dim 16 (vector loops), 8 (narrower lanes)
        ck = checkpoint_of(tiny_hf_mistral(window=w, vocab=128, dim=dim))
        path = tmp_path / f"m{dim}.onnx"
        export_onnx(ck, parse_quant("fp32"), path, chunk=5)
        env = {**os.environ, "MISTRAL_EDGE_KERNEL_ISA": isa, "PYTHONPATH": os.pathsep.join(sys.path)}
        done = subprocess.run([sys.executable, "-c", VARIANT_CHECK, str(path), str(w)], check=False, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        got_isa, err = done.stdout.split()
        assert got_isa == isa and float(err) < 1e-5


def test_environment_and_required_kernel(library, tmp_path, monkeypatch):
    ck = checkpoint_of(tiny_hf_mistral(window=16, vocab=128, dim=32))
    path = tmp_path / "m.onnx"
    export_onnx(ck, parse_quant("fp32"), path, chunk=5)
    monkeypatch.setenv("MISTRAL_EDGE_KERNEL", "off")
    assert DecoderSession(path).attention_path == "function body (native kernel turned off)"
    monkeypatch.setenv("MISTRAL_EDGE_KERNEL", "fast")
    with pytest.raises(EdgeError, match="must be one of auto, on, off"):
        DecoderSession(path)
    monkeypatch.delenv("MISTRAL_EDGE_KERNEL")
    assert DecoderSession(path).attention_path == f"native kernel ({kernels.isa()})"
    other_first = SessionConfig(providers=("AzureExecutionProvider", "CPUExecutionProvider"))
    assert DecoderSession(path, config=other_first).attention_path == (
        "function body (the native kernel is for the CPU provider, not AzureExecutionProvider)")
    monkeypatch.setattr(kernels, "unavailable_reason", lambda: "native attention kernel not built (test)")
    assert DecoderSession(path).attention_path == "function body (native attention kernel not built (test))"
    with pytest.raises(EdgeError, match="not built"):
        DecoderSession(path, config=SessionConfig(kernel="on"))


def test_missing_or_stale_library_is_not_used(tmp_path, monkeypatch):
    lib = tmp_path / "lib.so"
    monkeypatch.setattr(kernels, "OUT", lib)
    assert "not built" in kernels.unavailable_reason() and kernels.library_path() is None
    lib.write_bytes(b"")
    os.utime(lib, (0, 0))  # older than any source
    assert "older than its sources" in kernels.unavailable_reason() and kernels.library_path() is None


def test_library_that_does_not_load(tmp_path, monkeypatch):
    ck = checkpoint_of(tiny_hf_mistral(window=16, vocab=128, dim=32))
    path = tmp_path / "m.onnx"
    export_onnx(ck, parse_quant("fp32"), path, chunk=5)
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"not a shared library")  # newer than the sources: it looks usable
    monkeypatch.setattr(kernels, "OUT", lib)
    session = DecoderSession(path)
    assert session.attention_path.startswith("function body (native kernel failed to load: ")
    assert session.step(np.array([[1, 2, 3]])).shape == (1, 1, 128)
    with pytest.raises(EdgeError, match="failed to load"):
        DecoderSession(path, config=SessionConfig(kernel="on"))
