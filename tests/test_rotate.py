import dataclasses
import json
import os

import pytest
import torch

from mistral_edge.errors import EdgeError
from mistral_edge.model.loaders import load_checkpoint
from mistral_edge.model.reference import ReferenceModel
from mistral_edge.model.rotate import main, random_orthogonal, rotate_checkpoint, save_hf
from mistral_edge.quantize.int4 import quantize_int4

from helpers import SPM_V1, checkpoint_of, tiny_hf_mistral

LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def on_grid(ck):
    """The fixture with every linear and the embedding moved onto a Q4_1-like grid (float zero
    points, groups of 32 along K), as the demo model's GGUF weights are."""
    weights = dict(ck.weights)
    for name, t in ck.weights.items():
        if t.dim() == 2:
            weights[name] = quantize_int4(t, 32, "float", "rtn").dequantize()
    ck = dataclasses.replace(ck, weights=weights, tokenizer_files={"tokenizer.model": SPM_V1})
    return ck


def grid_error(t):
    """Relative error of the best Q4_1-like fit: 0 (to float rounding) for a weight on the grid."""
    return float((t - quantize_int4(t, 32, "float", "rtn").dequantize()).norm() / t.norm())


def logits(ck, tokens):
    model = ReferenceModel(ck.config, ck.weights)
    return model.prefill(tokens, model.new_cache(1), 8)[0]


@pytest.mark.parametrize("tied", [False, True])
def test_rotated_copy_has_the_same_logits_and_no_grid(tmp_path, tied):
    ck = on_grid(checkpoint_of(tiny_hf_mistral(tied=tied, seed=3, vocab=32000)))  # the tokenizer's size
    tokens = torch.randint(0, ck.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    assert max(grid_error(t) for t in ck.weights.values() if t.dim() == 2) < 1e-6
    out = save_hf(rotate_checkpoint(ck, seed=7), tmp_path / "rot")
    rotated = load_checkpoint(str(out))  # through the Hugging Face loader, as every export path reads it
    assert not rotated.config.tied_embeddings and "output.weight" in rotated.weights
    assert dataclasses.replace(rotated.config, tied_embeddings=tied) == ck.config
    expected = logits(ck, tokens)
    assert float((logits(rotated, tokens) - expected).abs().max()) < 1e-4 * float(expected.abs().max())
    for name, t in rotated.weights.items():
        if name.endswith("norm.weight"):
            assert torch.equal(t, torch.ones_like(t))
        else:
            assert grid_error(t) > 0.01, name  # a 4-bit grid's fit error on random-normal weights: ~0.05
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert json.loads((out / "config.json").read_text())["sliding_window"] == ck.config.sliding_window
    umask = os.umask(0o22)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}  # not mkdtemp's 0600
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_rotation_is_orthogonal_and_seeded():
    q = random_orthogonal(48, seed=1)
    torch.testing.assert_close(q @ q.T, torch.eye(48, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, random_orthogonal(48, seed=1))
    assert not torch.allclose(q, random_orthogonal(48, seed=2))
    ck = checkpoint_of(tiny_hf_mistral())
    a, b, c = (rotate_checkpoint(ck, seed) for seed in (5, 5, 6))
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert not torch.equal(a.weights["layers.0.attention.wq.weight"], c.weights["layers.0.attention.wq.weight"])


def test_save_refuses_an_existing_directory_and_leaves_nothing_on_failure(tmp_path, monkeypatch, capsys):
    ck = rotate_checkpoint(checkpoint_of(tiny_hf_mistral()))
    (tmp_path / "taken").mkdir()
    with pytest.raises(EdgeError, match="already exists"):
        save_hf(ck, tmp_path / "taken")
    assert main([str(tmp_path / "taken")]) == 1
    assert capsys.readouterr().err.startswith("error: ") and list((tmp_path / "taken").iterdir()) == []

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("mistral_edge.model.rotate.save_file", broken)
    with pytest.raises(OSError):
        save_hf(ck, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
