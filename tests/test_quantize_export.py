"""Exact formats and parity of the int4 embedding, the int4 head, the fp16-stored scales and the
integer format's int8 (MatMulInteger on per-token uint8 activations)."""

import numpy as np
import onnx
import pytest
import torch
from helpers import W, checkpoint_of, tiny_hf_mistral
from onnx import TensorProto
from test_export import EXACT, run_chunks, tokens_for, unfuse

from mistral_edge.compare.variants import model_bits_per_weight
from mistral_edge.export.decoder import build_decoder
from mistral_edge.export.linear import WeightEmitter
from mistral_edge.export.onnx_builder import ACTIVATIONS, Builder
from mistral_edge.model import reference as reference_module
from mistral_edge.model.reference import ReferenceModel
from mistral_edge.quantize.int4 import quantize_int4
from mistral_edge.quantize import spec as spec_module
from mistral_edge.quantize.int8 import quantize_int8
from mistral_edge.quantize.plan import TensorQuant, head_shares_embedding, quant_plan, tensor_shapes
from mistral_edge.quantize.spec import bits_per_weight, parse_quant
from mistral_edge.runtime.session import DecoderSession
from mistral_edge.targets.budget import estimate, stored_bytes


def export(path, ck, spec, fmt, plan=None):
    """Write the graph in `fmt`; returns (the canonical weights it computes with, its plan)."""
    emitter = WeightEmitter(Builder(), plan or quant_plan(ck.config, spec), fmt, 0, ACTIVATIONS["fp32"],
                            keep_dequantized=True)
    path.write_bytes(build_decoder(ck.config, ck.weights, W, 5, emitter).SerializeToString())
    computed = unfuse(ck.config, emitter.dequantized)
    if head_shares_embedding(ck.config, emitter.plan):
        computed["output.weight"] = computed["tok_embeddings.weight"]
    return {**ck.weights, **computed}, emitter.plan


def assert_graph_matches_reference(tmp_path, ck, spec, fmt, plan=None) -> dict:
    """The exported graph computes what the reference model computes on the weights the graph holds,
    and stores exactly the budget's bytes; returns those weights."""
    weights, plan = export(tmp_path / "m.onnx", ck, spec, fmt, plan)
    ref = ReferenceModel(ck.config, weights)
    tokens = tokens_for(ck, 3 * W)
    expected = ref.prefill(tokens, ref.new_cache(), 5).numpy()
    got = run_chunks(DecoderSession(tmp_path / "m.onnx", config=EXACT), tokens.numpy(), 5)
    assert np.abs(got - expected).max() < 1e-4
    model = onnx.load(str(tmp_path / "m.onnx"))
    stored = sum(len(t.raw_data) for t in model.graph.initializer)
    assert stored == estimate(ck.config, plan, W, 5, fmt=fmt, stored=True).weight_bytes
    return weights


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
@pytest.mark.parametrize("quant, head", [("int4-g32-fzp", "int4"), ("int4-g32-izp", "int8"), ("int4", "int4"),
                                          ("int4-g64-sym-rtn", "int4"), ("int8", "int8")])
def test_int4_embedding_graph_matches_reference_on_its_weights(tmp_path, quant, head, fmt, tied):
    """An int4 embedding (Gather of packed rows, unpacked with standard ops), alone or shared with a
    tied int4 head, computes exactly with its dequantized rows (8-bit scales too: `int4`, the plan's);
    its stored bytes are the budget's."""
    ck = checkpoint_of(tiny_hf_mistral(n_heads=4, n_kv_heads=2, window=W, tied=tied, dim=64))
    weights = assert_graph_matches_reference(tmp_path, ck, parse_quant(quant, head=head, embedding="int4"), fmt)
    assert not torch.equal(weights["tok_embeddings.weight"], ck.weights["tok_embeddings.weight"])
    if tied and head == "int4":  # one table for both
        model = onnx.load(str(tmp_path / "m.onnx"))
        assert not any(t.name.startswith("output") for t in model.graph.initializer)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
def test_per_tensor_group_sizes_match_reference_on_their_weights(tmp_path, fmt, tied):
    """The mixed plan's rungs side by side, each tensor with its own group size (MatMulNBits
    block_size 16 for int4 too, the float zero points' group sums per (K, G), the embedding's
    Gather): the graph computes with the weights each group size dequantizes to, stores the budget's
    bytes, and a g16 tensor is stored as 16-column groups."""
    ck = checkpoint_of(tiny_hf_mistral(n_heads=4, n_kv_heads=2, window=W, tied=tied, dim=64))
    spec = parse_quant("int4")
    plan = quant_plan(ck.config, spec)

    def int4(g):
        return TensorQuant("int4", g, "float", "search", 8)
    groups = {"attention.wqkv": int4(16), "attention.wo": int4(64), "feed_forward.w13": TensorQuant("int8"),
              "feed_forward.w2": int4(32)}
    plan = {n: groups.get(n.split(".", 2)[-1], plan[n]) for n in plan}
    plan["output"] = int4(16)
    plan["tok_embeddings"] = int4(16) if tied else int4(64)
    weights = assert_graph_matches_reference(tmp_path, ck, spec, fmt, plan)
    wqkv = ck.weights["layers.0.attention.wq.weight"]
    q4 = quantize_int4(wqkv, 16, "float", "search", scale_bits=8)
    assert q4.n_groups == wqkv.shape[1] // 16
    model = onnx.load(str(tmp_path / "m.onnx"))
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    if fmt == "nbits":
        n = wqkv.shape[0] + 2 * ck.weights["layers.0.attention.wk.weight"].shape[0]
        assert inits["layers.0.attention.wqkv.q4"] == [n, 64 // 16, 8]
        assert inits["layers.0.attention.wqkv.scale_codes"] == [n, 64 // 16]
        blocks = {a.i for node in model.graph.node if node.op_type == "MatMulNBits" for a in node.attribute
                  if a.name == "block_size"}
        assert {16, 32, 64} <= blocks
    assert not torch.equal(weights["output.weight"], ck.weights.get("output.weight", ck.weights["tok_embeddings.weight"]))


@pytest.mark.parametrize("group", [None, 64])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
def test_grouped_int8_graph_matches_reference_on_its_weights(tmp_path, monkeypatch, group, fmt, tied):
    """int8 with a scale per group of columns (partial last groups: K 96 and 200; K padded to
    MatMulNBits' blocks of 32) or per row, in every role: the layer linears, the embedding's Gather
    and the head, tied (one table) or not."""
    monkeypatch.setattr(spec_module, "INT8_GROUP_SIZE", group)
    ck = checkpoint_of(tiny_hf_mistral(n_heads=4, n_kv_heads=2, window=W, tied=tied, dim=96))
    weights = assert_graph_matches_reference(tmp_path, ck, parse_quant("int8"), fmt)
    w2 = weights["layers.0.feed_forward.w2.weight"]
    q8 = quantize_int8(ck.weights["layers.0.feed_forward.w2.weight"])
    assert q8.scales.shape == (96, 1 if group is None else 4) and torch.equal(w2, q8.dequantize())


@pytest.mark.parametrize("zero_point, extra", [("fzp", {".offsets": (TensorProto.FLOAT16, [2, 128])}),
                                               ("izp", {".zero_points": (TensorProto.UINT8, [128])}),
                                               ("sym", {})])
def test_int4_embedding_initializers(tmp_path, zero_point, extra):
    """The embedding is stored in the MatMulNBits layout: codes uint8 [V, groups, G/2], fp16 scales
    [V * groups], integer zero points two per byte, float ones as fp16 offsets [groups, V]."""
    ck = checkpoint_of(tiny_hf_mistral(window=W, dim=64))
    spec = parse_quant(f"int4-g32-{zero_point}", embedding="int4")
    export(tmp_path / "m.onnx", ck, spec, "nbits")
    model = onnx.load(str(tmp_path / "m.onnx"))
    inits = {t.name: (t.data_type, list(t.dims)) for t in model.graph.initializer if t.name.startswith("tok_embed")}
    expected = {".q4": (TensorProto.UINT8, [128, 2, 16]), ".scales": (TensorProto.FLOAT16, [256]), **extra}
    assert inits == {"tok_embeddings" + k: v for k, v in expected.items()}
    ops = {n.op_type for n in model.graph.node}
    assert {"BitwiseAnd", "BitShift", "Gather"} <= ops


@pytest.mark.parametrize("fmt", ["nbits", "qdq"])
def test_scales_are_stored_as_fp16_and_cast_up(tmp_path, fmt):
    """In an fp32 graph every scale and offset initializer is fp16, read through one Cast each."""
    ck = checkpoint_of(tiny_hf_mistral(window=W, dim=64))
    export(tmp_path / "m.onnx", ck, parse_quant("int4"), fmt)
    model = onnx.load(str(tmp_path / "m.onnx"))
    scales = [t for t in model.graph.initializer if t.name.endswith((".scales", ".offsets", ".row_scales"))]
    assert scales and all(t.data_type == TensorProto.FLOAT16 for t in scales)
    casts = [n.input[0] for n in model.graph.node if n.op_type == "Cast"]
    assert all(casts.count(t.name) == 1 for t in scales)


@pytest.mark.parametrize("zero_point", ["none", "int", "float"])
def test_fitted_scales_and_offsets_are_fp16_values(zero_point):
    """The quantizers fit for the stored (fp16) scales: nothing moves when the graph stores them."""
    w = torch.randn(64, 96) * torch.rand(64, 1) * 3
    q4 = quantize_int4(w, 32, zero_point, "search")
    assert torch.equal(q4.scales.half().float(), q4.scales)
    if zero_point == "float":
        _, offsets = q4.split_offset()
        assert ((offsets.half().float() - offsets).abs() <= 1e-6 * q4.scales).all()  # float32 rounding only
    q8 = quantize_int8(w)
    assert torch.equal(q8.scales.half().float(), q8.scales)
    assert (q8.q.abs() <= 127).all()


def uint8_rounded(x: torch.Tensor) -> torch.Tensor:
    """Each row of x rounded to uint8 and back: its range widened to hold 0, the zero point
    rounded (as DynamicQuantizeLinear does to a whole tensor)."""
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).tiny)
    zero = torch.round(-lo / s)
    return (torch.clamp(torch.round(x / s) + zero, 0, 255) - zero) * s


class Uint8Linear(torch.nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return uint8_rounded(x) @ self.w.T


@pytest.mark.parametrize("tied", [False, True])
def test_integer_int8_graph_is_the_reference_with_uint8_activations(tmp_path, monkeypatch, tied):
    """The integer format computes every int8 linear (a tied head too) with MatMulInteger on int8
    codes with one scale per output channel and its input rounded to uint8 per row: the reference
    model on those weights, with each linear's and the head's input rounded so, agrees to float
    rounding (1e-4: the emulation is the op's definition, only float summation order differs).
    Without that rounding the logits move by the activations' 8-bit error alone, at most half a step
    (range / 255) per input, summed through the layers: above 1e-3, bounded at 0.1 here (logits' std
    0.4); the nbits graph of the same model agrees to 1e-6 (its int8 is exact at accuracy level 0)."""
    ck = checkpoint_of(tiny_hf_mistral(n_heads=4, n_kv_heads=2, window=W, tied=tied, dim=96))
    weights, plan = export(tmp_path / "m.onnx", ck, parse_quant("int8"), "integer")
    w2 = ck.weights["layers.0.feed_forward.w2.weight"]
    assert torch.equal(weights["layers.0.feed_forward.w2.weight"], quantize_int8(w2, group_size=w2.shape[1]).dequantize())
    tokens = tokens_for(ck, 3 * W)
    got = run_chunks(DecoderSession(tmp_path / "m.onnx", config=EXACT), tokens.numpy(), 5)
    ref = ReferenceModel(ck.config, weights)
    plain = ref.prefill(tokens, ref.new_cache(), 5).numpy()
    assert 1e-3 < np.abs(got - plain).max() < 0.1

    ref.linears = {n: Uint8Linear(w) for n, w in ref.w.items() if n.startswith("layers.") and "norm" not in n}
    norm = reference_module.rms_norm
    monkeypatch.setattr(reference_module, "rms_norm", lambda x, w, eps: uint8_rounded(norm(x, w, eps))
                        if w is ref.w["norm.weight"] else norm(x, w, eps))  # the head's input
    assert np.abs(got - ref.prefill(tokens, ref.new_cache(), 5).numpy()).max() < 1e-4

    model = onnx.load(str(tmp_path / "m.onnx"))
    assert sum(len(t.raw_data) for t in model.graph.initializer) == \
        estimate(ck.config, plan, W, 5, fmt="integer", stored=True).weight_bytes
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulInteger" in ops and "MatMulNBits" not in ops
    inits = {t.name: (t.data_type, list(t.dims)) for t in model.graph.initializer}
    v, d = ck.config.vocab_size, ck.config.dim
    assert inits["tok_embeddings.q_t"] == (TensorProto.INT8, [d, v])  # MatMulInteger's B, [K, N]
    assert inits.get("tok_embeddings.q_t.colsums") == ((TensorProto.FLOAT, [v]) if tied else None)  # the head's
    assert inits["tok_embeddings.scales"] == (TensorProto.FLOAT16, [v])  # one per output channel
    assert any(name.startswith("output") for name in inits) != tied  # a tied head reads the embedding's codes


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("quant", ["int4-g32-fzp", "int4-g64-sym-rtn"])
def test_integer_format_keeps_int4_exact(tmp_path, quant, tied):
    """Without int8 tensors the integer format's graph is the nbits one: int4 MatMulNBits (a tied
    head on the embedding's codes, with its group sums), exact, and the budget's bytes."""
    ck = checkpoint_of(tiny_hf_mistral(n_heads=4, n_kv_heads=2, window=W, tied=tied, dim=64))
    assert_graph_matches_reference(tmp_path, ck, parse_quant(quant, head="int4", embedding="int4"), "integer")


def test_integer_format_int8_costs_one_scale_per_row(monkeypatch):
    """Groups of 64 for the other formats, whole rows for the integer one (plus a float32 column sum
    per linear's output channel, MatMulInteger's zero-point correction): the bits and bytes follow."""
    monkeypatch.setattr(spec_module, "INT8_GROUP_SIZE", 64)
    assert bits_per_weight("int8", 10, 576) == 8 + 9 * 16 / 576
    assert bits_per_weight("int8", 10, 576, fmt="integer") == 8 + 16 / 576
    cfg = checkpoint_of(tiny_hf_mistral(window=W, dim=128)).config
    plan = quant_plan(cfg, parse_quant("int8"))
    shapes = tensor_shapes(cfg)  # an untied embedding needs no column sums
    assert stored_bytes(cfg, plan, "integer") == sum(n * k + 6 * n for n, k in shapes.values()) - 4 * cfg.vocab_size
    assert model_bits_per_weight(cfg, plan, "integer") == \
        8 * stored_bytes(cfg, plan, "integer") / sum(n * k for n, k in shapes.values())


@pytest.mark.parametrize("quant, block", [("int4", 64), ("int8", 16)])
def test_int8_blocks_are_16_in_an_int8_model_and_the_group_among_int4_tensors(tmp_path, quant, block):
    """Accuracy level 4 quantizes activations per MatMulNBits block: an int8 model's tables take the
    smallest blocks (16); among int4 tensors an int8 table's block is its group (64), which ONNX Runtime
    holds in 9.7 bits per weight instead of 14.2 (export/linear.py::int8_block). Either way the graph
    computes the reference on its weights and stores the budget's bytes."""
    ck = checkpoint_of(tiny_hf_mistral(dim=128, n_heads=4, n_kv_heads=2))  # K = 128 and 264: whole groups and a partial one
    spec = parse_quant(quant)
    assert_graph_matches_reference(tmp_path, ck, spec, "nbits")
    model = onnx.load(str(tmp_path / "m.onnx"))
    int8 = [n for n in model.graph.node if n.op_type == "MatMulNBits"
            and onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits")) == 8]
    assert int8, "the plan has int8 tables"
    for node in int8:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["block_size"] == block, (node.name, attrs)
