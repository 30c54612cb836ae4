"""The native WindowedGroupQueryAttention kernel against the function body and the PyTorch reference.

Every test that needs the library builds it if it is missing and is skipped, with the build's
reason, where it cannot be built; the function-body path is forced with kernel="off", the native
one with kernel="on" (which fails rather than falling back), so both paths run here.
"""

import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mistral_edge import kernels
from mistral_edge.contract import is_scale
from mistral_edge.errors import EdgeError
from mistral_edge.export.onnx_builder import ACTIVATIONS
from mistral_edge.export.pipeline import export_onnx
from mistral_edge.kernels.build import BuildError, build
from mistral_edge.kernels.layer_graph import Layer, bind
from mistral_edge.model.config import ModelConfig
from mistral_edge.model.reference import ReferenceModel
from mistral_edge.quantize.spec import parse_quant
from mistral_edge.runtime.session import DecoderSession, SessionConfig, _register_kernel
from helpers import FP16_TOL, assert_close, checkpoint_of, tiny_hf_mistral

CACHE_TYPES = [("fp32", "fp16"), ("fp32", "int8"), ("fp16", "int8")]
"""(activations, kv_cache) pairs beyond a cache of the activation type (docs/kernel.md)."""


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


def reference(ck, w, tokens_of, steps, sinks=0, kv_cache=None):
    ref = ReferenceModel(ck.config, ck.weights)
    cache = ref.new_cache(batch=2, window=w, sinks=sinks, kv_cache=kv_cache)
    return [ref.forward(torch.tensor(tokens_of(i, c)), cache, torch.tensor(v)).numpy()
            for i, (c, v) in enumerate(steps)]


def assert_same_store(name: str, got: np.ndarray, want: np.ndarray, act: str) -> None:
    """A whole model's cache tensor, kernel against function body. Layer 0 sees the same qkv on both
    paths, so it is equal bit for bit: fp32 and fp16 rows, int8 codes and scales (the op-level test
    below is exact for every input). Deeper layers see qkv that differ slightly (the paths sum
    attention in different orders): in the last float bits under fp32 activations, so a code moves
    only where x / s sits within float rounding of a .5 tie (rare); by whole fp16 steps under fp16
    activations, where the attention output's rounding to fp16 goes the other way, so there codes
    move more often. Either way at most one code apart, and scales one fp16 step."""
    if name.endswith(".0"):
        np.testing.assert_array_equal(got, want, err_msg=name)
    elif want.dtype == np.int8:
        moved = abs(got.astype(np.int32) - want)
        assert moved.max() <= 1 and (moved > 0).mean() < (1e-3 if act == "fp32" else 0.05), name
    elif is_scale(name):
        np.testing.assert_allclose(got, want, rtol=2 ** -9, atol=0, err_msg=name)
    else:
        np.testing.assert_allclose(got, want, atol=1e-5 if want.dtype == np.float32 else 2e-3, err_msg=name)


@pytest.mark.parametrize("w", [16, 80])  # 80 > GROW: the cache has S = 64 < W slots for a while
@pytest.mark.parametrize("act,kv_cache", [("fp32", None), ("fp16", None), *CACHE_TYPES])  # None: the activations'
@pytest.mark.parametrize("sinks", [0, 3])
def test_kernel_equals_function_body_and_reference(library, tmp_path, w, act, kv_cache, sinks):
    dim = 64 if w > 64 else 32  # head_dim 16 (full vectors) and 8
    ck = checkpoint_of(tiny_hf_mistral(window=w, vocab=128, dim=dim, seed=w))
    path = tmp_path / "m.onnx"
    export_onnx(ck, parse_quant("fp32"), path, chunk=5, activations=act, sinks=sinks, kv_cache=kv_cache)
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
    expected = reference(ck, w, tokens_of, steps, sinks, kv_cache)

    assert native.slots == body.slots == w - sinks
    assert len(want_cache) == 2 * ck.config.n_layers * (2 if sinks else 1) * (2 if kv_cache == "int8" else 1)
    for name, cache in want_cache.items():  # the kernel wrote the bound buffers in place
        assert abs(cache.astype(np.float32)).max() > 0
        assert_same_store(name, got_cache[name], cache, act)
    for (chunk, valid), g, f, r in zip(steps, got, want, expected):
        for row, n in enumerate(valid):  # padding positions have no defined logits
            tol = (1e-5 if kv_cache != "int8" else 1e-4) if act == "fp32" else FP16_TOL * abs(f).max()
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


# --- One node at a time: each cache type against the spec (docs/kernel.md) and the function body.

def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The spec's int8 rows in numpy, float32 throughout: s = fp16(max|x| / 127) (1 for a zero row),
    codes clip(rint(x / s), -127, 127); np.rint rounds half to even, like nearbyint."""
    x = x.astype(np.float32)
    a = np.abs(x).max(-1, keepdims=True)
    s = np.where(a > 0, a / np.float32(127), np.float32(1)).astype(np.float16)
    return np.clip(np.rint(x / s.astype(np.float32)), -127, 127).astype(np.int8), s


def dequantized(layer: Layer, cache: dict[str, np.ndarray], kind: str) -> np.ndarray:
    x = cache[f"{kind}.0"].astype(np.float64)
    return x * cache[f"{kind}_scale.0"].astype(np.float64) if layer.kv_cache == "int8" else x


def half_rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)


def attend(layer: Layer, qkv: np.ndarray, plan: dict, before: dict, after: dict) -> np.ndarray:
    """The op's output in float64 from its inputs and the stored cache before and after the step:
    one softmax over (the ring after the write, the entries the chunk overwrote, the sinks)."""
    hq, hkv, d = layer.cfg.n_heads, layer.cfg.n_kv_heads, layer.cfg.head_dim
    B, C, _ = qkv.shape
    tables = [plan[n].astype(np.float64)[:, :, None] for n in ("cos_q", "sin_q")]
    q = half_rotate(qkv[..., :hq * d].astype(np.float64).reshape(B, C, hq, d), *tables)
    q = q.transpose(0, 2, 1, 3).reshape(B, hkv, -1, d)  # rows g-major per kv head
    parts = {x: [dequantized(layer, after, x), np.take_along_axis(dequantized(layer, before, x), plan["gather_idx"], 2)]
             for x in ("key", "value")}
    for x in ("key", "value") if layer.sinks else ():
        parts[x].append(dequantized(layer, after, "sink_" + x))
    keys, values = (np.concatenate(parts[x], 2) for x in ("key", "value"))
    scores = q @ keys.transpose(0, 1, 3, 2) + plan["bias"].astype(np.float64)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    out = (p / p.sum(-1, keepdims=True)) @ values  # [B, Hkv, G C, D]
    return out.reshape(B, hkv, -1, C, d).transpose(0, 3, 1, 2, 4).reshape(B, C, hq * d)


def node_session(layer: Layer, kernel: str) -> ort.InferenceSession:
    """kernel "on": the graph has no function body, so only the library can run it."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    path = _register_kernel(so, kernel)
    assert path.startswith("native kernel" if kernel == "on" else "function body")
    model = layer.attention_model(body=kernel == "off")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def op_config(head_dim: int) -> ModelConfig:
    return ModelConfig(dim=32, n_layers=1, n_heads=6, n_kv_heads=2, head_dim=head_dim, hidden_dim=32, vocab_size=16)


def lockstep(layer: Layer, runs: dict, steps, seed: int):
    """Feed every (session, caches) in `runs` (nodes of `layer`'s shapes) the same random qkv on the
    parity schedule; yields (valid lengths, qkv, plan, the first run's cache before the step,
    outputs by run) per step."""
    ring = layer.window - layer.sinks
    width = (layer.cfg.n_heads + 2 * layer.cfg.n_kv_heads) * layer.cfg.head_dim
    rng = np.random.default_rng(seed)
    positions = np.zeros(2, np.int64)
    for chunk, valid in steps:
        qkv = (2 * rng.standard_normal((2, chunk, width))).astype(ACTIVATIONS[layer.act].np_type)
        plan = layer.plan(positions, np.array(valid), chunk, ring)
        before = {k: a.copy() for k, a in next(iter(runs.values()))[1].items()}
        out = {}
        for key, (sess, caches) in runs.items():
            io = bind(sess, qkv, plan, caches)
            sess.run_with_iobinding(io)
            out[key] = io.copy_outputs_to_cpu()[0]
        yield valid, qkv, plan, before, out
        positions += valid


def assert_outputs_close(got: np.ndarray, want: np.ndarray, valid, act: str) -> None:
    for row, n in enumerate(valid):  # padding positions have no defined output
        tol = 2e-5 if act == "fp32" else FP16_TOL * abs(want).max()
        np.testing.assert_allclose(got[row, :n], want[row, :n], rtol=0, atol=tol)


def check_cache_type(act: str, kv_cache: str, sinks: int, head_dim: int) -> None:
    """The kernel over a kv_cache store against the same kernel over a cache of the activation type
    (itself checked against the function body above), step by step on the parity schedule: every
    stored row is exactly the spec's conversion of the activation-type row (fp16: a cast; int8:
    `quantize`, codes and scales bit for bit, since the kernel quantizes the very float values it
    would store), slots the chunk does not write keep their bytes, and the output equals `attend`
    over what is stored."""
    new, same = Layer(op_config(head_dim), 16, act, kv_cache, sinks), Layer(op_config(head_dim), 16, act, act, sinks)
    runs = {layer: (node_session(layer, "on"), layer.new_cache(2, 16 - sinks, ".0")) for layer in (new, same)}
    before_calls = kernels.calls()
    steps = schedule(16 - sinks)
    for valid, qkv, plan, before, out in lockstep(new, runs, steps, head_dim + sinks):
        got, ref = runs[new][1], runs[same][1]
        for kind in ("key", "value") + (("sink_key", "sink_value") if sinks else ()):
            x = ref[f"{kind}.0"]
            if kv_cache == "fp16":
                np.testing.assert_array_equal(got[f"{kind}.0"], x.astype(np.float16))
                continue
            codes, scales = quantize(x)
            written = (x != 0).any(-1, keepdims=True)  # random rows are never all zero
            np.testing.assert_array_equal(got[f"{kind}.0"], codes)
            np.testing.assert_array_equal(got[f"{kind}_scale.0"], np.where(written, scales, 0))
        assert_outputs_close(out[new], attend(new, qkv, plan, before, got), valid, act)
    assert kernels.calls() - before_calls == 2 * len(steps)


@pytest.mark.parametrize("act,kv_cache", CACHE_TYPES)
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("head_dim", [16, 12])  # full 8-lane vectors, and 4-lane ones
def test_cache_types_store_and_read_as_the_spec_says(library, act, kv_cache, sinks, head_dim):
    check_cache_type(act, kv_cache, sinks, head_dim)


@pytest.mark.parametrize("act,kv_cache", CACHE_TYPES)
@pytest.mark.parametrize("sinks", [0, 3])
def test_cache_types_store_what_the_function_body_stores(library, act, kv_cache, sinks):
    """Fed the same inputs, kernel and function body store the same bytes: fp16 rows, and int8
    codes and scales, bit for bit. Exact, not within one code of a .5 tie: the kernel rotates keys
    with ONNX Runtime's own rounding (MLAS's fused products) and quantizes with the body's float32
    operations in the body's order (Div, Round half to even, Clip), so both see the same x / s."""
    layer = Layer(op_config(16), 16, act, kv_cache, sinks)
    runs = {mode: (node_session(layer, mode), layer.new_cache(2, 16 - sinks, ".0")) for mode in ("on", "off")}
    for valid, _, _, _, out in lockstep(layer, runs, schedule(16 - sinks), 7):
        for name, array in runs["on"][1].items():
            np.testing.assert_array_equal(array, runs["off"][1][name], err_msg=name)
        assert_outputs_close(out["on"], out["off"], valid, act)


def check_ties(head_dim: int) -> None:
    """Value rows whose x / s fall on .5 ties (s = 1: max |x| = 127) and on +-127 quantize as the
    spec says: half to even, clipped, in the vector lanes and in the scalar tail alike."""
    layer = Layer(op_config(head_dim), 16, "fp32", "int8")
    session = node_session(layer, "on")
    cfg = layer.cfg
    ties = np.array([127, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -126.5, 126.5, 0, -1.5, 4.5, -127, 5.5, 6.5, -3.5])
    qkv = np.zeros((2, 1, (cfg.n_heads + 2 * cfg.n_kv_heads) * head_dim), np.float32)
    values = qkv[:, 0, (cfg.n_heads + cfg.n_kv_heads) * head_dim:].reshape(2, cfg.n_kv_heads, head_dim)
    values[...] = ties[:head_dim]
    values[1, 1] = -ties[:head_dim] * 3  # s = fp16(381 / 127) = 3: ties again, and codes at the clip
    caches = layer.new_cache(2, 16, ".0")
    session.run_with_iobinding(bind(session, qkv, layer.plan(np.zeros(2, np.int64), np.ones(2, np.int64), 1, 16),
                                    caches))
    codes, scales = quantize(values)
    np.testing.assert_array_equal(caches["value.0"][:, :, 0], codes)
    np.testing.assert_array_equal(caches["value_scale.0"][:, :, 0], scales)
    assert set(codes[0, 0, 1:6]) == {0, 2, -2} and scales[1, 1, 0] == 3


@pytest.mark.parametrize("isa", ["default", "avx2", "portable"])
def test_int8_rows_round_half_to_even_on_every_variant(library, isa):
    if isa == "default":
        for head_dim in (16, 12):
            check_ties(head_dim)
        return
    code = "import sys; sys.path.insert(0, 'tests'); import test_kernel as t\nfor d in (16, 12):\n    t.check_ties(d)"
    env = {**os.environ, "MISTRAL_EDGE_KERNEL_ISA": isa, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("kv_cache", ["fp32", "int8"])
@pytest.mark.parametrize("sinks", [0, 3])
def test_slots_every_row_masks_are_not_read(library, kv_cache, sinks):
    """The kernel skips the slots that every query row of a block masks (docs/kernel.md): the empty
    tail of a ring not yet full. What they hold cannot reach the output then, not even a NaN,
    which a product with probability 0 would spread (0 * NaN); the rows they hide weigh exactly
    nothing, so the output is the same bit for bit as over a zeroed tail."""
    layer = Layer(op_config(16), 64, "fp32", kv_cache, sinks)
    session = node_session(layer, "on")
    rng = np.random.default_rng(5)
    positions, slots = np.array([20, 9]), 48  # decode; slots 21.. (row 0) and 10.. (row 1) are empty
    plan = layer.plan(positions, np.array([1, 1]), 1, slots)
    qkv = rng.standard_normal((2, 1, (6 + 2 * 2) * 16)).astype(np.float32)
    clean = layer.new_cache(2, slots, ".0")
    for name, a in clean.items():
        a[...] = rng.uniform(0.01, 0.03, a.shape) if is_scale(name) else rng.integers(-9, 10, a.shape)
        if not name.startswith("sink_"):
            for row, p in enumerate(positions):
                a[row, :, p:] = 0
    outputs = []
    for poison in (False, True):
        caches = {name: a.copy() for name, a in clean.items()}
        if poison:
            for name, a in caches.items():
                if not name.startswith("sink_") and a.dtype != np.int8:
                    for row, p in enumerate(positions):
                        a[row, :, p + 1:] = np.nan  # past the slot this step writes
        io = bind(session, qkv, plan, caches)
        session.run_with_iobinding(io)
        outputs.append(io.copy_outputs_to_cpu()[0])
    assert np.isfinite(outputs[0]).all()
    np.testing.assert_array_equal(outputs[1], outputs[0])


@pytest.mark.parametrize("isa", ["avx2", "portable"])
def test_cache_types_on_every_compute_variant(library, isa):
    code = ("import sys; sys.path.insert(0, 'tests'); import test_kernel as t; from mistral_edge import kernels\n"
            "for act, kv in t.CACHE_TYPES:\n    for sinks in (0, 3):\n        t.check_cache_type(act, kv, sinks, 12)\n"
            "print(kernels.isa())")
    env = {**os.environ, "MISTRAL_EDGE_KERNEL_ISA": isa, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [isa]


def test_the_library_claims_only_the_types_it_computes(library):
    """A float16-activation node over a float32 cache (refused at export, not implemented here)
    finds no kernel: with no function body to fall back to, the session cannot be made."""
    node_session(Layer(op_config(16), 16, "fp32", "int8"), "on")  # an implemented pair loads
    with pytest.raises(Exception, match="(?i)type|kernel|implementation"):
        node_session(Layer(op_config(16), 16, "fp16", "fp32"), "on")
