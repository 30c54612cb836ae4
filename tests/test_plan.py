"""The per-tensor plan: a mixed int4 spec spends its bit budget on the most sensitive tensors."""

import pytest
from helpers import checkpoint_of, tiny_hf_mistral

from mistral_edge.compare.variants import model_bits_per_weight
from mistral_edge.model.config import ModelConfig
from mistral_edge.quantize.plan import TARGET_BITS, TensorQuant, head_shares_embedding, quant_plan, scheme_name
from mistral_edge.quantize.spec import parse_quant


def smollm(tied: bool) -> ModelConfig:
    """SmolLM2-135M's shape (the demo; untied: the off-grid model)."""
    return ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_dim=1536, vocab_size=49152,
                       norm_eps=1e-5, rope_theta=1e5, sliding_window=None, tied_embeddings=tied)


@pytest.mark.parametrize("tied", [False, True])
def test_mixed_plan_fills_the_bit_budget_in_sensitivity_order(tied):
    cfg = smollm(tied)
    plan = quant_plan(cfg, parse_quant("int4"))
    bits = model_bits_per_weight(cfg, plan)
    assert TARGET_BITS - 0.05 < bits <= TARGET_BITS
    int8 = [name for name, tq in plan.items() if tq.kind == "int8" and name.startswith("layers.")]
    # wqkv first (it holds the value rows), from the last layer down; then w2
    wqkv = [name for name in int8 if name.endswith("wqkv")]
    assert wqkv == [f"layers.{i}.attention.wqkv" for i in range(30 - len(wqkv), 30)] and len(wqkv) >= 29
    if any(name.endswith("w2") for name in int8):
        assert len(wqkv) == 30
    assert not any(name.endswith(("wo", "w13")) for name in int8)
    assert {scheme_name(tq) for tq in plan.values()} <= {"int8", "int4-g32-fzp-search-s8"}
    # an untied embedding is int4 (cheap in KL); a tied one follows the head, stored once
    assert scheme_name(plan["tok_embeddings"]) == ("int8" if tied else "int4-g32-fzp-search-s8")
    assert head_shares_embedding(cfg, plan) == tied


def test_fixed_zero_point_specs_are_not_replanned():
    cfg = smollm(False)
    plan = quant_plan(cfg, parse_quant("int4-g128-izp"))
    layers = {tq for name, tq in plan.items() if name.startswith("layers.")}
    assert layers == {TensorQuant("int4", 128, "int", "search")}
    assert plan["tok_embeddings"] == TensorQuant("int4", 128, "int", "search") and plan["output"].kind == "int8"
    assert quant_plan(cfg, parse_quant("int4", embedding="int8"))["tok_embeddings"] == TensorQuant("int8")
    assert {tq.kind for tq in quant_plan(cfg, parse_quant("int8")).values()} == {"int8"}


def test_a_tiny_model_plan_is_within_budget():
    """Where no int8 upgrade fits, the plan stays all int4 (the head's int8 alone may exceed the budget)."""
    ck = checkpoint_of(tiny_hf_mistral(vocab=32000, dim=32))
    plan = quant_plan(ck.config, parse_quant("int4"))
    assert all(tq.kind == "int4" for name, tq in plan.items() if name.startswith("layers."))


def test_measured_sensitivity_chooses_the_upgrades_within_the_budget():
    """With a measured sensitivity (calibrate.int4_sensitivity) the int8 upgrades follow it, KL per
    added bit, not UPGRADE_ORDER: here w13 of layers 0-3 cost the most, wqkv nothing."""
    cfg = smollm(False)
    names = [name for name in quant_plan(cfg, parse_quant("int4")) if name.startswith("layers.")]
    sensitivity = {name: 0.0 if name.endswith("wqkv") else 1e-3 for name in names}
    sensitivity.update({f"layers.{i}.feed_forward.w13": 1.0 for i in range(4)})
    plan = quant_plan(cfg, parse_quant("int4"), sensitivity)
    assert TARGET_BITS - 0.05 < model_bits_per_weight(cfg, plan) <= TARGET_BITS
    int8 = {name for name, tq in plan.items() if tq.kind == "int8" and name.startswith("layers.")}
    assert {f"layers.{i}.feed_forward.w13" for i in range(4)} <= int8
    assert not any(name.endswith("wqkv") for name in int8)  # the default's first choice, worth nothing here
    # one of them made the least sensitive per bit: the budget (under half the layer weights) runs out first
    less = quant_plan(cfg, parse_quant("int4"), {**sensitivity, "layers.0.feed_forward.w13": 1e-4})
    assert less["layers.0.feed_forward.w13"].kind == "int4" and less["layers.1.feed_forward.w13"].kind == "int8"
