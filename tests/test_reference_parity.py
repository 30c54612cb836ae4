"""The reference model with its rolling cache equals transformers' Mistral on the full sequence."""

import pytest
import torch

from mistral_edge.errors import EdgeError
from mistral_edge.model.reference import ReferenceModel
from helpers import W, checkpoint_of, tiny_hf_mistral



@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # GQA ratios 1, 2, 4
@pytest.mark.parametrize("chunk", [1, 4, 5, W])  # 1, divisor, non-divisor, W
def test_chunked_prefill_matches_transformers(kv_heads, chunk):
    hf = tiny_hf_mistral(n_heads=4, n_kv_heads=kv_heads, window=W)
    ck = checkpoint_of(hf)
    tokens = torch.randint(0, ck.config.vocab_size, (1, 5 * W), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    ref = ReferenceModel(ck.config, ck.weights)
    cache = ref.new_cache()
    got = ref.prefill(tokens, cache, chunk)
    assert (got - expected).abs().max().item() < 1e-4
    assert cache.nbytes == 2 * ck.config.n_layers * kv_heads * W * ck.config.head_dim * 4


def test_decode_after_prefill_matches():
    hf = tiny_hf_mistral(window=W)
    ck = checkpoint_of(hf)
    tokens = torch.randint(0, ck.config.vocab_size, (1, 4 * W + 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens).logits
    ref = ReferenceModel(ck.config, ck.weights)
    cache = ref.new_cache()
    head = ref.prefill(tokens[:, :W + 1], cache, 7)
    tail = [ref.forward(tokens[:, t:t + 1], cache) for t in range(W + 1, tokens.shape[1])]
    assert (torch.cat([head, *tail], 1) - expected).abs().max().item() < 1e-4


def test_batch_of_different_lengths():
    hf = tiny_hf_mistral(window=W)
    ck = checkpoint_of(hf)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 128, (1, 3 * W + 5), generator=g), torch.randint(0, 128, (1, 2 * W + 1), generator=g)
    ref = ReferenceModel(ck.config, ck.weights)
    cache = ref.new_cache(batch=2)
    C = 6
    last = {}
    for s in range(0, a.shape[1], C):
        chunk = torch.zeros(2, C, dtype=torch.long)
        n = torch.tensor([max(0, min(C, seq.shape[1] - s)) for seq in (a, b)])
        for i, seq in enumerate((a, b)):
            chunk[i, :n[i]] = seq[0, s:s + n[i]]
        logits = ref.forward(chunk, cache, n)
        for i in range(2):
            if n[i]:
                last[i] = logits[i, n[i] - 1]
    with torch.no_grad():
        for i, seq in enumerate((a, b)):
            assert (last[i] - hf(seq).logits[0, -1]).abs().max().item() < 1e-4


def test_chunk_larger_than_window_refused():
    ck = checkpoint_of(tiny_hf_mistral(window=W))
    ref = ReferenceModel(ck.config, ck.weights)
    with pytest.raises(EdgeError, match="larger than the window"):
        ref.forward(torch.zeros(1, W + 1, dtype=torch.long), ref.new_cache())
