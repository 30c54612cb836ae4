"""Fixtures shared by tests: tiny random Mistral models in the formats users bring."""

from __future__ import annotations

import torch
from transformers import MistralConfig, MistralForCausalLM

from mistral_edge.model.checkpoint import Checkpoint
from mistral_edge.model.loaders.hf import canonical_weights, config_from_hf


def tiny_hf_mistral(n_heads: int = 4, n_kv_heads: int = 2, window: int = 16, vocab: int = 128,
                    dim: int = 32, layers: int = 2, seed: int = 0, tied: bool = False) -> MistralForCausalLM:
    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim + 8, num_hidden_layers=layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=dim // n_heads,
        sliding_window=window, max_position_embeddings=4096, rope_theta=10000.0,
        tie_word_embeddings=tied, attn_implementation="eager",
    )
    model = MistralForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-default weights so attention patterns matter
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def checkpoint_of(model: MistralForCausalLM) -> Checkpoint:
    cfg = config_from_hf({**model.config.to_dict(), "architectures": ["MistralForCausalLM"]})
    return Checkpoint(cfg, canonical_weights(dict(model.state_dict())), source="fixture", source_format="hf")
