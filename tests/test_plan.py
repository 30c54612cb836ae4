"""The per-tensor plan: a mixed int4 spec spends its bit budget on the most sensitive tensors."""

from dataclasses import replace

import pytest
from helpers import checkpoint_of, tiny_hf_mistral

from mistral_edge.compare.variants import model_bits_per_weight
from mistral_edge.model.config import ModelConfig
from mistral_edge.quantize.plan import (LAYER_LINEARS, ROLE_SENSITIVITY, RUNG_ERROR, RUNGS, TARGET_BITS, TensorQuant,
                                        head_shares_embedding, quant_plan, scheme_name, stored_bits, tensor_shapes)
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


def mistral7b() -> ModelConfig:
    return ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
                       vocab_size=32768, norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tied_embeddings=False)


def rung(tq: TensorQuant) -> int | str:
    return tq.group_size if tq.kind == "int4" else tq.kind


def estimated_kl(cfg: ModelConfig, plan: dict) -> float:
    """The plan's own estimate (ROLE_SENSITIVITY x weights x RUNG_ERROR), a tied table counted once."""
    shapes = tensor_shapes(cfg)
    names = [n for n in shapes if not (n == "tok_embeddings" and head_shares_embedding(cfg, plan))]
    prior = {n: ROLE_SENSITIVITY[n.split(".", 2)[-1]] + (ROLE_SENSITIVITY["tok_embeddings"] if n == "output" and
                                                         cfg.tied_embeddings else 0) for n in names}
    return sum(prior[n] * shapes[n][0] * shapes[n][1] * RUNG_ERROR[rung(plan[n])] for n in names)


@pytest.mark.parametrize("cfg", [smollm(False), smollm(True), mistral7b()], ids=["off-grid", "demo", "7b"])
def test_g16_plan_spends_the_bit_budget_where_the_estimate_saves_most(cfg):
    """`int4-g16`: every tensor on a rung (int4 g16..g128 with float zero points and 8-bit scales, or int8) within
    TARGET_BITS stored bits over the whole model; no single move to another rung that still fits
    saves more estimated KL per bit than the plan's cheapest-per-bit rung bought; within a role,
    the later layers hold the higher rungs."""
    plan = quant_plan(cfg, parse_quant("int4-g16"))
    shapes = tensor_shapes(cfg)
    stored = {n: shapes[n][0] * shapes[n][1] * stored_bits(*shapes[n], plan[n]) for n in shapes}
    counted = [n for n in shapes if not (n == "output" and head_shares_embedding(cfg, plan))]
    total = sum(shapes[n][0] * shapes[n][1] for n in counted)
    bits = sum(stored[n] for n in counted) / total
    assert bits == pytest.approx(model_bits_per_weight(cfg, plan), abs=1e-12)  # the exact formula, as compare counts
    assert TARGET_BITS - 0.05 < bits <= TARGET_BITS
    assert {scheme_name(tq) for tq in plan.values()} <= {"int8"} | {f"int4-g{g}-fzp-search-s8" for g in RUNGS[:-1]}
    assert head_shares_embedding(cfg, plan) == cfg.tied_embeddings
    order = {r: i for i, r in enumerate(RUNGS)}
    edge = cfg.n_layers // 8
    for role in LAYER_LINEARS:
        rungs = [order[rung(plan[f"layers.{i}.{role}"])] for i in range(cfg.n_layers)]
        first, middle, last = rungs[:edge], rungs[edge:-edge], rungs[-edge:]
        assert first == sorted(first) and middle == sorted(middle) and last == sorted(last)
        assert min(first + last) >= max(middle)  # the edge layers count double
    # the plan the default was before (every int4 g32, head int8, then wqkv and w2 int8 from the last layer
    # down while they fit) is within the same budget and estimated worse
    before = {n: replace(tq, group_size=32) if tq.kind == "int4" else TensorQuant("int4", 32, "float", "search", 8)
              for n, tq in plan.items()}
    before["output"] = TensorQuant("int8")
    if cfg.tied_embeddings:
        before["tok_embeddings"] = before["output"]
    for name in [f"layers.{i}.{role}" for role in ("attention.wqkv", "feed_forward.w2") for i in reversed(range(cfg.n_layers))]:
        trial = {**before, name: TensorQuant("int8")}
        if model_bits_per_weight(cfg, trial) <= TARGET_BITS:
            before = trial
    assert estimated_kl(cfg, plan) < estimated_kl(cfg, before)


def test_g16_plan_of_the_off_grid_shape():
    """`int4-g16` on SmolLM2's untied shape (the off-grid model, docs/quantization.md): the value-holding wqkv and
    all w2 int8; w13 and wo int4 g16 but int8 in the edge layers; the head int4 g16, the embedding
    (the least KL per weight) int4 g64."""
    cfg = smollm(False)
    plan = quant_plan(cfg, parse_quant("int4-g16"))
    int8 = {role: [i for i in range(30) if plan[f"layers.{i}.{role}"].kind == "int8"] for role in LAYER_LINEARS}
    assert int8 == {"attention.wqkv": list(range(30)), "feed_forward.w2": list(range(30)),
                    "feed_forward.w13": [0, 1, 2, 27, 28, 29], "attention.wo": [1, 2, 27, 28, 29]}
    assert {scheme_name(tq) for name, tq in plan.items() if name.startswith("layers.") and tq.kind == "int4"} == {
        "int4-g16-fzp-search-s8"}
    assert scheme_name(plan["output"]) == "int4-g16-fzp-search-s8"
    assert scheme_name(plan["tok_embeddings"]) == "int4-g64-fzp-search-s8"
    assert model_bits_per_weight(cfg, plan) == pytest.approx(5.9940, abs=1e-4)


def test_a_head_or_embedding_the_user_fixed_is_kept():
    cfg = smollm(False)
    plan = quant_plan(cfg, parse_quant("int4-g16", head="int8", embedding="int8"))
    assert plan["output"] == plan["tok_embeddings"] == TensorQuant("int8")
    assert model_bits_per_weight(cfg, plan) <= TARGET_BITS
    tied = quant_plan(smollm(True), parse_quant("int4-g16", head="int4"))
    assert tied["output"] == tied["tok_embeddings"] and tied["output"].kind == "int4"


def test_fixed_zero_point_specs_are_not_replanned():
    cfg = smollm(False)
    plan = quant_plan(cfg, parse_quant("int4-g128-izp"))
    layers = {tq for name, tq in plan.items() if name.startswith("layers.")}
    assert layers == {TensorQuant("int4", 128, "int", "search")}
    assert plan["tok_embeddings"] == TensorQuant("int4", 128, "int", "search") and plan["output"].kind == "int8"
    assert quant_plan(cfg, parse_quant("int4", embedding="int8"))["tok_embeddings"] == TensorQuant("int8")
    assert {tq.kind for tq in quant_plan(cfg, parse_quant("int8")).values()} == {"int8"}


def test_a_tiny_model_plan_is_within_budget():
    """Where no int8 upgrade fits, the default stays all int4 (the head's int8 alone may exceed the
    budget); `int4-g16` uses no group larger than the row (K = 32) and keeps the head (most of this
    model) int4 to fit."""
    ck = checkpoint_of(tiny_hf_mistral(vocab=32000, dim=32))
    plan = quant_plan(ck.config, parse_quant("int4"))
    assert all(tq.kind == "int4" for name, tq in plan.items() if name.startswith("layers."))
    plan = quant_plan(ck.config, parse_quant("int4-g16"))
    assert model_bits_per_weight(ck.config, plan) <= TARGET_BITS
    assert all(tq.group_size <= 32 for tq in plan.values() if tq.kind == "int4") and plan["output"].kind == "int4"


def test_measured_sensitivity_chooses_the_upgrades_within_the_budget():
    """With a measured sensitivity (calibrate.int4_sensitivity) the int8 upgrades follow it, KL per
    added bit, from g32, not UPGRADE_ORDER: here w13 of layers 0-3 cost the most, wqkv nothing; the head
    stays int8 and the embedding int4 g32, as the sensitivity was measured against."""
    cfg = smollm(False)
    names = [name for name in quant_plan(cfg, parse_quant("int4")) if name.startswith("layers.")]
    sensitivity = {name: 0.0 if name.endswith("wqkv") else 1e-3 for name in names}
    sensitivity.update({f"layers.{i}.feed_forward.w13": 1.0 for i in range(4)})
    plan = quant_plan(cfg, parse_quant("int4"), sensitivity)
    assert TARGET_BITS - 0.05 < model_bits_per_weight(cfg, plan) <= TARGET_BITS
    int8 = {name for name, tq in plan.items() if tq.kind == "int8" and name.startswith("layers.")}
    assert {f"layers.{i}.feed_forward.w13" for i in range(4)} <= int8
    assert not any(name.endswith("wqkv") for name in int8)  # the default's first choice, worth nothing here
    assert {rung(tq) for tq in plan.values()} == {32, "int8"} and plan["output"].kind == "int8"
    # one of them made the least sensitive per bit: the budget (under half the layer weights) runs out first
    less = quant_plan(cfg, parse_quant("int4"), {**sensitivity, "layers.0.feed_forward.w13": 1e-4})
    assert less["layers.0.feed_forward.w13"].kind == "int4" and less["layers.1.feed_forward.w13"].kind == "int8"
