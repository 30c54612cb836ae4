"""The exported decoder-step graph equals the reference model, for every quant level and format."""

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_close, checkpoint_of, tiny_hf_mistral

from mistral_edge.errors import EdgeError
from mistral_edge.export.decoder import build_decoder
from mistral_edge.export.linear import WeightEmitter
from mistral_edge.export.onnx_builder import ACTIVATIONS, Builder
from mistral_edge.export.pipeline import export_onnx, resolve_window
from mistral_edge.model.reference import ReferenceModel
from mistral_edge.quantize.plan import head_shares_embedding, quant_plan
from mistral_edge.quantize.spec import parse_quant
from mistral_edge.runtime.session import DecoderSession, SessionConfig

W = 16
EXACT = SessionConfig(entries=(("session.qdq_matmulnbits_accuracy_level", "0"),))
"""ORT turns DequantizeLinear+MatMul into MatMulNBits with int8 compute unless told not to."""


def run_chunks(session: DecoderSession, tokens: np.ndarray, chunk: int) -> np.ndarray:
    return np.concatenate([session.step(tokens[:, s:s + chunk], all_logits=True).copy()
                           for s in range(0, tokens.shape[1], chunk)], 1)


def tokens_for(ck, n, seed=0):
    return torch.randint(0, ck.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def unfuse(cfg, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical weights from the exporter's names (fused wqkv / w13, 'output'), to run the
    reference model on exactly the weights a quantized graph uses."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {}
    for name, t in tensors.items():
        if name.endswith("attention.wqkv"):
            for part, piece in zip(("wq", "wk", "wv"), t.split([q, kv, kv])):
                out[name.replace("wqkv", part) + ".weight"] = piece
        elif name.endswith("feed_forward.w13"):
            for part, piece in zip(("w1", "w3"), t.split([cfg.hidden_dim] * 2)):
                out[name.replace("w13", part) + ".weight"] = piece
        else:
            out[name + ".weight"] = t
    return out


def export_exact(path, ck, quant: str, fmt: str, activations: str = "fp32") -> dict[str, torch.Tensor]:
    """Write the graph with fp32 compute in its linears (accuracy_level 0); returns the canonical
    weights it really computes with (quantized, or rounded to fp16), for the reference."""
    emitter = WeightEmitter(Builder(), quant_plan(ck.config, parse_quant(quant)), fmt, 0, ACTIVATIONS[activations],
                            keep_dequantized=True)
    path.write_bytes(build_decoder(ck.config, ck.weights, W, 5, emitter).SerializeToString())
    computed = unfuse(ck.config, emitter.dequantized)
    if head_shares_embedding(ck.config, emitter.plan) and "tok_embeddings.weight" in computed:
        computed["output.weight"] = computed["tok_embeddings.weight"]  # the head reads the embedding's table
    return {**ck.weights, **computed}


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("chunk", [1, 5, W])
def test_fp32_graph_matches_reference(tmp_path, kv_heads, chunk):
    ck = checkpoint_of(tiny_hf_mistral(n_heads=4, n_kv_heads=kv_heads, window=W))
    tokens = tokens_for(ck, 4 * W + 3)
    ref = ReferenceModel(ck.config, ck.weights)
    expected = ref.prefill(tokens, ref.new_cache(), chunk).numpy()
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=W, chunk=chunk)
    got = run_chunks(DecoderSession(tmp_path / "m.onnx"), tokens.numpy(), chunk)
    assert np.abs(got - expected).max() < 1e-4


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
@pytest.mark.parametrize("quant", ["fp16", "int8", "int4-g32", "int4-g32-izp", "int4-g64-sym-rtn", "int4-g128-izp-rtn"])
def test_quantized_graph_matches_reference_on_its_weights(tmp_path, quant, fmt, tied):
    """The graph computes exactly with the dequantized weights (accuracy_level 0: fp32 compute)."""
    ck = checkpoint_of(tiny_hf_mistral(n_heads=4, n_kv_heads=2, window=W, tied=tied, dim=64))
    weights = export_exact(tmp_path / "m.onnx", ck, quant, fmt)
    assert any(not torch.equal(weights[k], ck.weights[k]) for k in ck.weights), \
        "a quantized export must record what it quantized"
    ref = ReferenceModel(ck.config, weights)
    tokens = tokens_for(ck, 4 * W)
    expected = ref.prefill(tokens, ref.new_cache(), 5).numpy()
    got = run_chunks(DecoderSession(tmp_path / "m.onnx", config=EXACT), tokens.numpy(), 5)
    assert np.abs(got - expected).max() < 1e-4


@pytest.mark.parametrize("chunk,tied", [(1, False), (5, True)], ids=["decode", "prefill-tied"])
@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
@pytest.mark.parametrize("quant", ["fp16", "int8", "int4-g32"])
def test_fp16_graph_matches_reference_on_its_weights(tmp_path, quant, fmt, chunk, tied):
    """fp16 activations and cache (ONNX Runtime's CPU provider runs the ops it has no fp16 kernel
    for in fp32, behind casts it inserts), one token at a time or in chunks, past the window."""
    ck = checkpoint_of(tiny_hf_mistral(n_heads=4, n_kv_heads=2, window=W, tied=tied, dim=64))
    ref = ReferenceModel(ck.config, export_exact(tmp_path / "m.onnx", ck, quant, fmt, "fp16"))
    tokens = tokens_for(ck, 4 * W + 3)
    session = DecoderSession(tmp_path / "m.onnx", config=EXACT)
    got = run_chunks(session, tokens.numpy(), chunk)
    assert session.cache_dtype == np.float16 and got.dtype == np.float32
    assert_close(got, ref.prefill(tokens, ref.new_cache(), chunk).numpy(), "fp16")


def test_fp16_graph_types(tmp_path):
    """Cache in and out, hidden states, norms, tables, scales are fp16; logits stay float32."""
    ck = checkpoint_of(tiny_hf_mistral(window=W, tied=True))
    export_onnx(ck, parse_quant("int4-g32"), tmp_path / "m.onnx", window=W, chunk=4, activations="fp16")
    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(model, full_check=True)  # strict shape and type inference
    F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert {t for n, t in types.items() if n.startswith(("past_", "present_"))} == {F16}
    assert types["logits"] == F32
    floats = {t.name: t.data_type for t in model.graph.initializer if t.data_type in (F16, F32)}
    assert floats.pop("rope.inv_freq") == F32  # positions times frequencies in fp32, then cast
    assert set(floats.values()) == {F16} and {"layers.0.attention.wqkv.scales", "layers.0.attention.wqkv.row_scales"} & set(floats)
    assert {p.key: p.value for p in model.metadata_props}["mistral_edge.activation_dtype"] == "fp16"
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    hidden = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    assert hidden[next(n.output[0] for n in model.graph.node if n.op_type == "RMSNormalization")] == F16


def test_unknown_activation_dtype(tmp_path):
    ck = checkpoint_of(tiny_hf_mistral(window=W))
    with pytest.raises(EdgeError, match="unknown activation dtype 'bf16'; expected one of fp32, fp16"):
        export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", activations="bf16")


@pytest.mark.parametrize("activations", ["fp32", "fp16"])
def test_batch_of_two_different_lengths(tmp_path, activations):
    """Padding rows see no key: the finite mask keeps them from NaN in fp16 too."""
    ck = checkpoint_of(tiny_hf_mistral(n_heads=4, n_kv_heads=2, window=W))
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=W, chunk=6, activations=activations)
    a, b = tokens_for(ck, 3 * W + 5, 1)[0].tolist(), tokens_for(ck, 2 * W + 1, 2)[0].tolist()
    session = DecoderSession(tmp_path / "m.onnx", batch=2)
    last = {}
    for s in range(0, len(a), 6):
        pieces = [a[s:s + 6], b[s:s + 6]]
        tokens = np.zeros((2, 6), np.int64)
        for i, p in enumerate(pieces):
            tokens[i, :len(p)] = p
        valid = np.array([len(p) for p in pieces])
        logits = session.step(tokens, valid)
        assert not np.isnan(logits).any()
        for i in np.nonzero(valid)[0]:
            last[i] = logits[i, 0].copy()
    ref = ReferenceModel(ck.config, ck.weights)
    for i, seq in enumerate((a, b)):
        expected = ref.prefill(torch.tensor([seq]), ref.new_cache(), 6)[0, -1].numpy()
        assert_close(last[i][None], expected[None], activations)
    # the shorter row stopped advancing when its tokens ran out
    assert session.positions.tolist() == [len(a), len(b)]


@pytest.mark.parametrize("activations", ["fp32", "fp16"])
def test_cache_is_updated_in_place_without_copies(tmp_path, capfd, activations):
    ck = checkpoint_of(tiny_hf_mistral(window=W))
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=W, chunk=4, activations=activations)
    session = DecoderSession(tmp_path / "m.onnx")
    tokens = tokens_for(ck, 3 * W).numpy()
    run_chunks(session, tokens[:, :W], 4)  # the cache has grown to its final W slots
    before = {k: v.data_ptr() for k, v in session.cache.items()}
    first = session.cache["key.0"].numpy().copy()
    run_chunks(session, tokens[:, W:], 4)
    session.step(np.array([[3]]))
    err = capfd.readouterr().err
    assert "in-place optimization not activated" not in err
    assert {k: v.data_ptr() for k, v in session.cache.items()} == before
    assert not np.array_equal(session.cache["key.0"].numpy(), first)  # the bound buffer itself changed
    cfg = ck.config
    item = {"fp32": 4, "fp16": 2}[activations]
    assert session.cache_bytes == cfg.n_layers * 2 * 1 * cfg.n_kv_heads * W * cfg.head_dim * item


def test_cache_grows_to_the_window_with_the_same_logits(tmp_path, monkeypatch):
    """Under the function body, a session whose cache starts small and grows gives the logits of one
    that starts at W slots."""
    from mistral_edge.runtime import session as session_mod

    window = 40
    ck = checkpoint_of(tiny_hf_mistral(window=window))
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=window, chunk=5)
    tokens = tokens_for(ck, 3 * window).numpy()
    body = SessionConfig(kernel="off")
    monkeypatch.setattr(session_mod, "GROW", window)
    full = DecoderSession(tmp_path / "m.onnx", config=body)
    monkeypatch.setattr(session_mod, "GROW", 16)
    growing = DecoderSession(tmp_path / "m.onnx", config=body)
    assert growing.slots == 0
    sizes = []
    for s in range(0, tokens.shape[1], 5):
        a, b = full.step(tokens[:, s:s + 5]).copy(), growing.step(tokens[:, s:s + 5])
        assert np.abs(a - b).max() < 1e-5
        sizes.append(growing.slots)
    assert full.slots == window and sorted(set(sizes)) == [16, 32, window]
    growing.reset()
    assert growing.slots == 0 and growing.positions.tolist() == [0]


def test_native_kernel_session_holds_the_whole_ring_from_the_first_step_and_keeps_it(tmp_path):
    """The native kernel reads only written slots, so the session allocates all W at once (no growth,
    whose dropped buffers stayed resident) and a reset zeroes what was written instead of reallocating:
    the next sequence's logits are a fresh session's."""
    from mistral_edge import kernels

    if kernels.unavailable_reason() is not None:
        pytest.skip(kernels.unavailable_reason())
    window = 80  # > GROW: a growing cache would have 64 slots after the first step
    ck = checkpoint_of(tiny_hf_mistral(window=window))
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=window, chunk=5)
    a, b = tokens_for(ck, 25, seed=1).numpy(), tokens_for(ck, 12, seed=2).numpy()
    session = DecoderSession(tmp_path / "m.onnx", config=SessionConfig(kernel="on"))
    assert session.attention_path.startswith("native kernel") and session.slots == 0
    session.step(a[:, :5])
    buffer = session._arrays["key.0"]
    assert session.slots == window and np.abs(buffer[:, :, :5]).max() > 0 and not buffer[:, :, 5:].any()
    for s in range(5, 25, 5):
        session.step(a[:, s:s + 5])
    session.reset()
    assert session._arrays["key.0"] is buffer and not buffer.any() and session.positions.tolist() == [0]
    fresh = DecoderSession(tmp_path / "m.onnx", config=SessionConfig(kernel="on"))
    for s in range(0, 12, 4):
        np.testing.assert_array_equal(session.step(b[:, s:s + 4]), fresh.step(b[:, s:s + 4]))


def test_unbound_cache_would_copy(tmp_path, capfd):
    """The in-place test above can fail: plain run() without shared buffers makes ORT copy."""
    import onnxruntime as ort

    ck = checkpoint_of(tiny_hf_mistral(window=W))
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=W, chunk=4)
    s = ort.InferenceSession(str(tmp_path / "m.onnx"))
    cfg = ck.config
    feeds = {"input_ids": np.array([[1]]), "positions": np.array([0]), "valid_lens": np.array([1]),
             "logits_index": np.array([[0]])}
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}.{i}"] = np.zeros((1, cfg.n_kv_heads, W, cfg.head_dim), np.float32)
    s.run(None, feeds)
    assert "in-place optimization not activated" in capfd.readouterr().err


@pytest.mark.parametrize("window,chunk,message", [
    (0, None, "window must be a positive integer"),
    (-4, None, "window must be a positive integer"),
    (16, 0, "chunk size must be between 1 and the window"),
    (16, -1, "chunk size must be between 1 and the window"),
    (16, 17, "chunk size must be between 1 and the window"),
])
def test_bad_window_or_chunk(window, chunk, message):
    ck = checkpoint_of(tiny_hf_mistral(window=W))
    with pytest.raises(EdgeError, match=message):
        resolve_window(ck, window, chunk)


def test_runtime_chunk_override_checked(tmp_path):
    ck = checkpoint_of(tiny_hf_mistral(window=W))
    export_onnx(ck, parse_quant("fp32"), tmp_path / "m.onnx", window=W, chunk=4)
    assert DecoderSession(tmp_path / "m.onnx", config=SessionConfig(chunk=8)).chunk == 8
    with pytest.raises(EdgeError, match="chunk size must be between 1 and the window W=16"):
        DecoderSession(tmp_path / "m.onnx", config=SessionConfig(chunk=17))
    with pytest.raises(EdgeError, match="chunk of 17 tokens"):
        DecoderSession(tmp_path / "m.onnx").step(np.zeros((1, 17), np.int64))


def test_unknown_weight_format(tmp_path):
    ck = checkpoint_of(tiny_hf_mistral(window=W))
    with pytest.raises(EdgeError, match="unknown weight format"):
        export_onnx(ck, parse_quant("int8"), tmp_path / "m.onnx", fmt="zip")


def test_emitter_keeps_no_weights_by_default():
    """Regression: every quantized tensor's float32 dequantized copy (and every Int8Weight) was kept
    for the whole export: ~29 GB for a 7B model."""
    ck = checkpoint_of(tiny_hf_mistral(window=W))
    emitter = WeightEmitter(Builder(), quant_plan(ck.config, parse_quant("int8")))
    build_decoder(ck.config, ck.weights, W, 4, emitter)
    assert len(emitter.log) == 4 * ck.config.n_layers + 2  # embedding and head are still logged
    assert emitter.dequantized == {}
    kept = [v for v in vars(emitter).values() if isinstance(v, dict)]
    assert not any(isinstance(x, (torch.Tensor, tuple)) and not isinstance(x, str) for d in kept for x in d.values())


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
@pytest.mark.parametrize("quant", ["int8", "int4-g32", "int4-g32-sym-rtn", "int4-g64-fzp-rtn"])
def test_budget_counts_the_stored_weights(tmp_path, quant, fmt, tied):
    """The budget's weight bytes are the graph's initializer bytes (regression: a qdq tied int8
    head stored the int8 table twice, [K, N] for the head and [N, K] for the embedding; nbits int8
    scales, one per block, were counted once per row)."""
    from mistral_edge.targets.budget import estimate

    ck = checkpoint_of(tiny_hf_mistral(n_heads=4, n_kv_heads=2, window=W, tied=tied, dim=64))
    spec = parse_quant(quant)
    export_onnx(ck, spec, tmp_path / "m.onnx", window=W, chunk=4, fmt=fmt)
    model = onnx.load(str(tmp_path / "m.onnx"))
    stored = sum(len(t.raw_data) for t in model.graph.initializer)
    assert stored == estimate(ck.config, quant_plan(ck.config, spec), W, 4, fmt=fmt, stored=True).weight_bytes
    if tied:  # one int8 table, read by the embedding's Gather and by the head
        assert not any(t.name.startswith("output") for t in model.graph.initializer)
        assert sum(t.name.startswith("tok_embeddings.q") for t in model.graph.initializer) == 1


def test_external_data_runs_as_inline_and_converts_to_ort_format(tmp_path, monkeypatch):
    """Streamed weights: initializers hold only aligned references into model.onnx.data; the graph
    gives the inline graph's logits, and the .ort conversion (android, ios) consumes both files,
    unless the model is past what one ORT-format flatbuffer holds."""
    from mistral_edge.export import pipeline
    from mistral_edge.export.onnx_builder import ALIGN
    from mistral_edge.targets import bundle as bundle_mod

    ck = checkpoint_of(tiny_hf_mistral(window=W))
    export_onnx(ck, parse_quant("int4-g32"), tmp_path / "inline.onnx", window=W, chunk=4)
    assert not (tmp_path / "inline.onnx.data").exists()  # a small model stays one file
    monkeypatch.setattr(pipeline, "INLINE_BELOW", 0)
    (tmp_path / "ext").mkdir()
    path = tmp_path / "ext" / "model.onnx"
    export_onnx(ck, parse_quant("int4-g32"), path, window=W, chunk=4)
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= 4 * ck.config.n_layers and not any(t.raw_data for t in external)
    offsets = [int(e.value) for t in external for e in t.external_data if e.key == "offset"]
    assert len(offsets) == len(external) and all(o % ALIGN == 0 for o in offsets)
    tokens = tokens_for(ck, 12).numpy()
    expected = run_chunks(DecoderSession(tmp_path / "inline.onnx"), tokens, 4)
    np.testing.assert_array_equal(run_chunks(DecoderSession(path), tokens, 4), expected)

    monkeypatch.setattr(bundle_mod, "ORT_FORMAT_MAX_BYTES", path.stat().st_size)
    assert bundle_mod._to_ort_format(path) == "model.onnx"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    monkeypatch.undo()
    assert bundle_mod._to_ort_format(path) == "model.ort"
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.ort"]
    np.testing.assert_allclose(run_chunks(DecoderSession(path.with_suffix(".ort")), tokens, 4), expected, atol=1e-5)
