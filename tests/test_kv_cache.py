"""The KV cache stored in fp16 or int8 (docs/cache.md): the storage rule itself, the exported graph
against the reference with the same storage emulated, int8 against the fp32 cache, the cache
updated in place at a size fixed by W, its bytes in the budget, snapshots, and the requests that
are refused."""

import json

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_close, checkpoint_of, tiny_hf_mistral
from onnx import TensorProto, helper
from test_cache import batched, sequences
from test_kernel import library  # noqa: F401  (the fixture: the native library, built where it can be)
from test_targets import cli, export  # noqa: F401  (cli: the fixture)

from mistral_edge.contract import GraphInfo, cache_names, layer_cache_names
from mistral_edge.errors import EdgeError
from mistral_edge.export.attention import PLAN_INPUTS, SINK_PLAN_INPUTS, CacheStorage
from mistral_edge.export.onnx_builder import ACTIVATIONS, Builder
from mistral_edge.export.pipeline import export_onnx
from mistral_edge.model.cache import dequantize_rows, quantize_rows
from mistral_edge.model.reference import ReferenceModel
from mistral_edge.quantize.plan import quant_plan
from mistral_edge.quantize.spec import parse_quant
from mistral_edge.runtime.session import DecoderSession, SessionConfig, _kernel_covers
from mistral_edge.runtime import session as session_module
from mistral_edge.targets.budget import estimate

W, S = 16, 3
FP32 = parse_quant("fp32")
BODY = SessionConfig(kernel="off")
"""The portable function body (the native kernel's int8 variants are checked in test_kernel.py)."""


@pytest.fixture(scope="module")
def ck():
    return checkpoint_of(tiny_hf_mistral(window=W))


def graph(ck, path, kv_cache, activations="fp32", sinks=0, chunk=4):
    export_onnx(ck, FP32, path, window=W, chunk=chunk, sinks=sinks, activations=activations, kv_cache=kv_cache)
    return path


# --- the storage rule -------------------------------------------------------------------------------

def storage_graph(kv_cache: str, act: str) -> onnx.ModelProto:
    """x -> what the function body stores for it, and what it reads back."""
    b = Builder()
    a = ACTIVATIONS[act]
    storage = CacheStorage(b, kv_cache, a)
    stored = storage.store("x")
    b.op("Identity", [storage.load(stored)], outputs=["back"])
    outs = [b.op("Identity", [t], outputs=[f"part{i}"]) for i, t in enumerate(stored)]
    shape = [2, 3, 4, 8]
    types = [TensorProto.INT8, TensorProto.FLOAT16] if kv_cache == "int8" else [TensorProto.FLOAT16]
    g = helper.make_graph(b.nodes, "storage", [helper.make_tensor_value_info("x", a.onnx_type, shape)],
                          [helper.make_tensor_value_info("back", a.onnx_type, shape),
                           *(helper.make_tensor_value_info(o, t, None) for o, t in zip(outs, types))])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 24)], ir_version=10)


def rows_with_edge_cases(dtype) -> np.ndarray:
    x = np.random.default_rng(0).normal(0, 3, (2, 3, 4, 8)).astype(np.float32)
    x[0, 0, 0] = [127, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 0]  # s = 1: ties go to even
    x[0, 0, 1] = 0  # an all-zero row: scale 1, codes 0
    x[0, 0, 2] = [1e-3, -2e-3, 0, 0, 0, 0, 0, 5e-4]  # a small scale (fp16 subnormal range)
    x[0, 0, 3] = [6e4, -3e4, 1, 0, 0, 0, 0, 0]  # near fp16's largest
    return x.astype(dtype)


@pytest.mark.parametrize("act", ["fp32", "fp16"])
def test_int8_storage_of_the_graph_is_the_reference_rule_bit_for_bit(act):
    import onnxruntime as ort

    x = rows_with_edge_cases(ACTIVATIONS[act].np_type)
    back, codes, scale = ort.InferenceSession(storage_graph("int8", act).SerializeToString()).run(None, {"x": x})
    want_codes, want_scale = quantize_rows(torch.from_numpy(x))
    np.testing.assert_array_equal(codes, want_codes.numpy())
    np.testing.assert_array_equal(scale, want_scale.numpy())
    np.testing.assert_array_equal(back, dequantize_rows(want_codes, want_scale).numpy().astype(x.dtype))
    assert codes[0, 0, 0].tolist() == [127, 0, 2, 2, 0, -2, 4, 0] and scale[0, 0, 0, 0] == 1
    assert not codes[0, 0, 1].any() and scale[0, 0, 1, 0] == 1
    err = np.abs(back.astype(np.float32) - x.astype(np.float32))
    assert (err <= 0.6 * scale.astype(np.float32)).all()  # half a step (and an fp16 rounding of the product)
    assert err.max() > 0  # int8 is lossy: the comparisons above can fail


def test_fp16_storage_under_fp32_activations_rounds_to_fp16():
    import onnxruntime as ort

    x = rows_with_edge_cases(np.float32)
    back, stored = ort.InferenceSession(storage_graph("fp16", "fp32").SerializeToString()).run(None, {"x": x})
    np.testing.assert_array_equal(stored, x.astype(np.float16))
    np.testing.assert_array_equal(back, x.astype(np.float16).astype(np.float32))


# --- the graph against the reference ----------------------------------------------------------------

def against_reference(ck, path, kv_cache, activations, sinks, chunk, seed=0):
    """Max |logit error| of the graph against the reference storing `kv_cache`, and against the
    reference with a cache of its compute type, over two rows of different lengths well past the
    window. The reference computes in the graph's activation type: under fp16 activations the int8
    codes are taken from fp16 keys, and an fp32 reference's keys land across a rounding boundary
    often enough to double the error (measured: 0.0036 against 0.0018)."""
    a, b = sequences(seed, [4 * W + 3, 3 * W - 2])
    session = DecoderSession(path, batch=2, config=BODY)
    ref = ReferenceModel(ck.config, ck.weights, torch.float16 if activations == "fp16" else torch.float32)
    same, plain = ref.new_cache(2, W, sinks, kv_cache), ref.new_cache(2, W, sinks)
    err_same = err_plain = 0.0
    for tokens, valid in batched(a, b, chunk):
        got = session.step(tokens, valid, all_logits=True)
        t, v = torch.tensor(tokens), torch.tensor(valid)
        want, base = ref.forward(t, same, v).numpy(), ref.forward(t, plain, v).numpy()
        for i, n in enumerate(valid):
            if n:
                assert_close(got[i, :n], want[i, :n], activations)
                err_same = max(err_same, float(abs(got[i, :n] - want[i, :n]).max()))
                err_plain = max(err_plain, float(abs(got[i, :n] - base[i, :n]).max()))
    assert session.positions.tolist() == [len(a), len(b)]
    return err_same, err_plain


@pytest.mark.parametrize("sinks", [0, S])
@pytest.mark.parametrize("chunk", [1, 5, "ring"])  # decode, an odd chunk, C = W - sinks (every write wraps)
@pytest.mark.parametrize("activations", ["fp32", "fp16"])
def test_int8_cache_graph_matches_the_reference_storing_int8(ck, tmp_path, activations, chunk, sinks):
    chunk = W - sinks if chunk == "ring" else chunk
    path = graph(ck, tmp_path / "m.onnx", "int8", activations, sinks, chunk)
    err_same, err_plain = against_reference(ck, path, "int8", activations, sinks, chunk)
    if activations == "fp32":  # the emulation is what makes it tight: the fp32 cache is far off
        assert err_same < 1e-4 < err_plain and 20 * err_same < err_plain


@pytest.mark.parametrize("sinks", [0, S])
def test_fp16_cache_with_fp32_activations_matches_the_reference_storing_fp16(ck, tmp_path, sinks):
    path = graph(ck, tmp_path / "m.onnx", "fp16", "fp32", sinks, 5)
    err_same, err_plain = against_reference(ck, path, "fp16", "fp32", sinks, 5, seed=1)
    assert err_same < 1e-4 < err_plain


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(p || q) over positions, of softmaxes of [..., V] logits."""
    lp = torch.log_softmax(torch.from_numpy(p_logits).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(q_logits).double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_int8_cache_against_the_fp32_cache_kl(ck, tmp_path):
    """Past the window, chunked, against the fp32 ring (the demo model's figures: docs/cache.md)."""
    tokens = np.array([sequences(5, [6 * W])[0]])
    logits = {}
    for kv_cache in ("fp32", "int8"):
        session = DecoderSession(graph(ck, tmp_path / f"{kv_cache}.onnx", kv_cache, chunk=5), config=BODY)
        logits[kv_cache] = np.concatenate([session.step(tokens[:, s:s + 5], all_logits=True).copy()
                                           for s in range(0, tokens.shape[1], 5)], 1)
    divergence = kl(logits["fp32"], logits["int8"])
    assert 0 < divergence < 1e-3
    assert (logits["fp32"].argmax(-1) == logits["int8"].argmax(-1)).mean() > 0.97


def test_graph_types_names_and_op(ck, tmp_path):
    model = onnx.load(str(graph(ck, tmp_path / "m.onnx", "int8", "fp16", S)))
    onnx.checker.check_model(model, full_check=True)  # strict type and shape inference, function body included
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    names = cache_names(ck.config.n_layers, S, "int8")
    assert names[:8] == ["key.0", "value.0", "key_scale.0", "value_scale.0",
                         "sink_key.0", "sink_value.0", "sink_key_scale.0", "sink_value_scale.0"]
    for name in names:
        want = TensorProto.FLOAT16 if "_scale" in name else TensorProto.INT8
        assert types[f"past_{name}"] == types[f"present_{name}"] == want
    assert shapes["past_key_scale.1"] == ["batch", 2, "slots", 1] and shapes["past_sink_value.0"] == ["batch", 2, S, 8]
    node = next(n for n in model.graph.node if n.name == "layers.1.attention")
    assert node.op_type == "SinkWindowedGroupQueryAttentionInt8Cache" and node.domain == "mistral_edge"
    assert list(node.input[1:9]) == [f"past_{n}" for n in layer_cache_names(1, S, "int8")]
    assert list(node.output[1:]) == [f"present_{n}" for n in layer_cache_names(1, S, "int8")]
    fn = model.functions[0]
    kinds = [n.split(".")[0] for n in layer_cache_names(0, S, "int8")]
    assert fn.name == node.op_type and list(fn.input) == ["qkv", *(f"past_{k}" for k in kinds), *PLAN_INPUTS,
                                                          *SINK_PLAN_INPUTS]
    assert list(fn.output) == ["output", *(f"present_{k}" for k in kinds)]
    meta = {p.key: p.value for p in model.metadata_props}
    assert (meta["mistral_edge.kv_cache"], meta["mistral_edge.graph_contract"]) == ("int8", "5")

    model = onnx.load(str(graph(ck, tmp_path / "f.onnx", "fp16")))
    onnx.checker.check_model(model, full_check=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert types["past_key.0"] == types["present_value.1"] == TensorProto.FLOAT16
    assert {n.op_type for n in model.graph.node if n.domain == "mistral_edge"} == {"WindowedGroupQueryAttention"}


# --- the runtime: in place, fixed by W, the budget ------------------------------------------------

@pytest.mark.parametrize("kv_cache,activations", [("int8", "fp32"), ("int8", "fp16"), ("fp16", "fp32")])
def test_cache_is_updated_in_place_and_memory_is_flat_past_w(ck, tmp_path, capfd, kv_cache, activations):
    session = DecoderSession(graph(ck, tmp_path / "m.onnx", kv_cache, activations, S), config=BODY)
    tokens = np.array([sequences(3, [5 * W])[0]])
    for s in range(0, W, 4):
        session.step(tokens[:, s:s + 4])
    before = {k: v.data_ptr() for k, v in session.cache.items()}
    assert set(before) == set(cache_names(ck.config.n_layers, S, kv_cache))
    first = {k: a.copy() for k, a in session._arrays.items()}
    size = session.cache_bytes
    cfg = ck.config
    slot = cfg.head_dim + 2 if kv_cache == "int8" else cfg.head_dim * 2
    assert size == cfg.n_layers * 2 * cfg.n_kv_heads * W * slot  # ring W - S plus S sinks
    budget = estimate(cfg, quant_plan(cfg, FP32), W, 4, activations=activations, kv_cache=kv_cache)
    assert budget.kv_cache_bytes == size
    for s in range(W, tokens.shape[1], 4):
        session.step(tokens[:, s:s + 4])
        assert session.cache_bytes == size
    assert "in-place optimization not activated" not in capfd.readouterr().err
    assert {k: v.data_ptr() for k, v in session.cache.items()} == before
    for name, a in session._arrays.items():  # every bound buffer itself changed, scales too; the sinks stay
        assert a.dtype == np.dtype(session._tensors[name].dtype)
        assert np.array_equal(a, first[name]) == name.startswith("sink_"), name
    session.reset()
    assert not any(a.any() for a in session._arrays.values())


def test_budget_bytes_per_cache_type(ck):
    cfg = ck.config
    plan = quant_plan(cfg, FP32)
    per = {kv: estimate(cfg, plan, 4096, 8, kv_cache=kv).kv_cache_bytes for kv in ("fp32", "fp16", "int8")}
    n = cfg.n_layers * 2 * cfg.n_kv_heads * 4096  # slots of K and V
    assert per == {"fp32": n * cfg.head_dim * 4, "fp16": n * cfg.head_dim * 2, "int8": n * (cfg.head_dim + 2)}
    assert estimate(cfg, plan, 4096, 8, activations="fp16").kv_cache_bytes == per["fp16"]  # default: the activations


def test_kernel_path_follows_the_cache_type(monkeypatch):
    # a library older than its int8 and fp16-cache variants
    monkeypatch.setattr(session_module, "NATIVE_CACHES", (("fp32", "fp32"), ("fp16", "fp16")))
    info = GraphInfo(2, 2, 8, W, 4, 128, "fp32", "int8")
    assert _kernel_covers("native kernel (avx2)", info, "auto").startswith("function body (the native kernel has no")
    assert _kernel_covers("function body (native kernel turned off)", info, "off") == \
        "function body (native kernel turned off)"
    same = GraphInfo(2, 2, 8, W, 4, 128, "fp16", "fp16")
    assert _kernel_covers("native kernel (avx2)", same, "on") == "native kernel (avx2)"


# --- snapshots --------------------------------------------------------------------------------------

def test_snapshot_round_trip_of_an_int8_cache(ck, tmp_path):
    """capture / save / load / restore carry the codes and the scales, each in its own dtype."""
    from mistral_edge.serve.snapshot import TokenHistory, capture, load, restore, save

    path = graph(ck, tmp_path / "m.onnx", "int8", sinks=S)
    tokens = sequences(4, [3 * W + 2])[0]
    first, second = DecoderSession(path, config=BODY), DecoderSession(path, batch=2, config=BODY)
    for s in range(0, 2 * W, 4):
        first.step(np.array([tokens[s:s + 4]]))
    state = capture(first, 0, TokenHistory.of(tokens[:2 * W], W))
    assert state.cache["key_scale.0"].shape == (2, W - S, 1) and state.cache["key_scale.0"].dtype == np.float16
    assert state.cache["sink_value.1"].dtype == np.int8
    save(tmp_path / "s.snap", state, first, "bundle")
    loaded = load(tmp_path / "s.snap", second, "bundle")
    assert set(loaded.cache) == set(state.cache)
    for name, a in state.cache.items():
        assert loaded.cache[name].dtype == a.dtype
        np.testing.assert_array_equal(loaded.cache[name], a)
    restore(second, 1, loaded)
    rest = np.array([tokens[2 * W:2 * W + 4]])
    want = first.step(rest, all_logits=True).copy()
    got = second.step(np.concatenate([rest, rest]), np.array([0, 4]), all_logits=True)[1:]
    assert np.abs(got - want).max() < 1e-5
    other = DecoderSession(graph(ck, tmp_path / "f.onnx", "fp16", sinks=S), config=BODY)
    with pytest.raises(EdgeError, match="cache layout does not match"):
        load(tmp_path / "s.snap", other, "bundle")


# --- requests, manifest, info ---------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--kv-cache", "int4"], "error: unknown KV cache type 'int4'; expected one of fp32, fp16, int8"),
    (["--kv-cache", "fp32", "--activations", "fp16"], "error: an fp32 KV cache needs fp32 activations"),
    (["--kv-cache", "fp32", "--target", "gpu"], "error: an fp32 KV cache needs fp32 activations"),
    (["--kv-cache", "int8", "--target", "mlc"], "error: the mlc target writes MLC's q4f16_1"),
])
def test_bad_kv_cache_requests_are_one_line_errors(cli, tmp_path, args, message):  # noqa: F811
    result = cli("export", "--out", tmp_path / "b", *args)
    assert result.returncode != 0 and result.stderr.startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_bad_kv_cache_in_graph_metadata(ck, tmp_path):
    meta = DecoderSession(graph(ck, tmp_path / "m.onnx", "int8"), config=BODY).info.to_metadata()
    for bad, why in (("int4", "unknown KV cache type 'int4'"), ("fp32", None)):
        edited = {**meta, "mistral_edge.kv_cache": bad, "mistral_edge.activation_dtype": "fp16"}
        with pytest.raises(EdgeError, match=f"m: graph metadata kv_cache: {why or 'an fp32 KV cache needs fp32'}"):
            GraphInfo.from_metadata(edited, "m")


def test_bundle_records_the_cache_type(tmp_path, cli):  # noqa: F811
    from test_targets import fixture_checkpoint

    from mistral_edge.runtime.bundle import Bundle, verify

    ck = fixture_checkpoint()
    m = export(ck, tmp_path / "b", "cpu", "int4", kv_cache="int8")
    assert m.kv_cache == "int8" and verify(tmp_path / "b") == []
    raw = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert raw["kv_cache"] == "int8" and raw["graph_contract"] == 5
    cfg = ck.config
    assert m.memory_budget.kv_cache_bytes == cfg.n_layers * 2 * cfg.n_kv_heads * W * (cfg.head_dim + 2)
    session = Bundle.open(tmp_path / "b").session()
    assert session.kv_cache == "int8" and session.cache_dtype == np.int8
    assert export(ck, tmp_path / "g", "gpu", "int4").kv_cache == "fp16"  # default: the activation type
    out = cli("inspect", tmp_path / "b").stdout
    assert any(line.split()[:4] == ["│", "kv_cache", "│", "int8"] for line in out.splitlines())


def test_info_shows_the_kv_bytes_of_each_cache_type(tmp_path):
    from test_loaders import hf_dir, table_rows
    from typer.testing import CliRunner

    from mistral_edge.cli.main import app

    _, path = hf_dir(tmp_path)
    rows = table_rows(CliRunner().invoke(app, ["info", str(path)]).output)
    # 2 layers x (k, v) x 2 kv heads: head_dim 8 int8 codes and a 2-byte scale each per token
    assert rows["KV per token int8"] == "80 B (0.00 MiB)" and rows["KV for W=16 int8"] == "1,280 B (0.00 MiB)"
    assert rows["KV per token fp32"] == "256 B (0.00 MiB)"


def test_compare_quants_take_a_kv_suffix():
    from mistral_edge.compare.variants import parse_quants

    choices = parse_quants("fp32,fp32+kv8,int4,int4+kv8,fp32+kv16,int4+KV8")
    assert [c.name for c in choices] == ["fp32", "fp32+kv8", "int4-g32-mzp-search", "int4-g32-mzp-search+kv8",
                                         "fp32+kv16"]
    assert [c.kv_cache for c in choices] == [None, "int8", None, "int8", "fp16"]
    assert parse_quants("int4-g32-gptq+kv8")[0].calibration == "gptq"
    with pytest.raises(EdgeError, match=r"int4\+kv4: unknown suffix \+kv4; expected \+kv8 or \+kv16"):
        parse_quants("int4+kv4")
