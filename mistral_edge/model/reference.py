"""The reference Mistral model in PyTorch: the oracle every export is checked against.

RMSNorm, rotate-half RoPE, grouped-query attention with a sliding window, SwiGLU,
and chunked prefill over a rolling buffer cache with optional attention sinks (see cache.py:
the attention pattern is `cache.visible`; keys keep their absolute RoPE positions,
docs/cache.md says why). Each chunk's
queries attend to the cache as it was before the chunk plus the chunk itself (as the cache
will store it: an fp16 or int8 cache rounds the chunk's keys too);
the chunk is written to the cache afterwards, so a chunk of C <= W tokens never
overwrites a key one of its own queries still needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import EdgeError
from .cache import RollingKVCache, visible
from .config import ModelConfig
from .weights import output_weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)) * weight.float()


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [*positions.shape, head_dim] for rotate-half RoPE."""
    even = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device)
    inv_freq = 1.0 / (theta ** (even.float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, C, D]; cos/sin: [B, C, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
           bias: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention of a chunk over the cache before it plus the chunk itself.

    q: [B, H, C, D]; k/v: the chunk's [B, Hkv, C, D]; past_k/v: the cache's [B, Hkv, W, D];
    bias: [B, 1 or Hkv, C, W + C] (0 or -inf). The query heads sharing a KV head are stacked as rows
    of one matmul, so the cache is read once per step, never concatenated or repeated per head.
    With `queries` ([B, C], the real queries), also returns the attention mass [B, Hkv, W + C]
    each key received from them, summed over the kv head's query heads (a pooled cache's score).
    """
    B, H, C, D = q.shape
    kv_heads, W = k.shape[1], past_k.shape[2]
    qg = q.reshape(B, kv_heads, H // kv_heads * C, D)
    scores = torch.cat([qg @ past_k.transpose(-1, -2), qg @ k.transpose(-1, -2)], -1) * D**-0.5
    scores = scores.view(B, kv_heads, H // kv_heads, C, W + C) + bias[:, :, None]
    p = torch.softmax(scores.float(), -1).nan_to_num(0.0).to(q.dtype)
    out = p.view(B, kv_heads, -1, W + C)
    out = (out[..., :W] @ past_v + out[..., W:] @ v).view(B, H, C, D)
    if queries is None:
        return out
    return out, (p.float() * queries[:, None, None, :, None]).sum((2, 3))


class ReferenceModel:
    """Functional model over a canonical weight dict, computing in `dtype` (fp32 by default) on `device`."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.cfg = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.w = {k: v.to(self.device, dtype) for k, v in weights.items()}
        self.head = output_weight(self.w)
        self.linears: dict[str, torch.nn.Module] = {}
        """Layer linears computed by a module instead of `x @ w.T` (bitsandbytes: model/bnb.py)."""

    @property
    def window(self) -> int:
        return self.cfg.sliding_window or self.cfg.max_position

    def new_cache(self, batch: int = 1, window: int | None = None, sinks: int = 0,
                  kv_cache: str | None = None, pool: int = 0) -> RollingKVCache:
        """`kv_cache` (fp32, fp16 or int8; None: the compute dtype) emulates an export's cache storage."""
        c = self.cfg
        return RollingKVCache(c.n_layers, batch, c.n_kv_heads, window or self.window, c.head_dim, self.dtype,
                              sinks, self.device, kv_cache, pool)

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x @ W.T for the layer weight `name`, or its replacement module when there is one."""
        module = self.linears.get(name)
        return module(x) if module is not None else x @ self.w[name].T

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: RollingKVCache, n_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Run one chunk of [B, C] tokens through the model; returns logits [B, C, V]."""
        c = self.cfg
        B, C = tokens.shape
        W, S, P = cache.window, cache.sinks, cache.pool
        if C > cache.ring:
            raise EdgeError(f"chunk of {C} tokens is larger than the window's ring of {cache.ring} slots")
        dev = self.device
        n_valid = torch.full((B,), C, dtype=torch.long, device=dev) if n_valid is None else n_valid.long()
        qpos = cache.pos[:, None] + torch.arange(C, device=dev)  # [B, C]
        chunk_valid = torch.arange(C, device=dev) < n_valid[:, None]
        chunk_pos = torch.where(chunk_valid, qpos, -1)
        if not P:
            bias = self.bias(torch.cat([cache.slot_positions(), chunk_pos], 1)[:, None], qpos, W, S)
        cos, sin = rope_tables(qpos, c.head_dim, c.rope_theta)
        cos, sin = cos.to(self.dtype), sin.to(self.dtype)

        h = F.embedding(tokens, self.w["tok_embeddings.weight"])
        for i in range(c.n_layers):
            p = f"layers.{i}."
            x = rms_norm(h, self.w[p + "attention_norm.weight"], c.norm_eps).to(self.dtype)
            q = self.linear(x, p + "attention.wq.weight").view(B, C, c.n_heads, c.head_dim).transpose(1, 2)
            k = self.linear(x, p + "attention.wk.weight").view(B, C, c.n_kv_heads, c.head_dim).transpose(1, 2)
            v = self.linear(x, p + "attention.wv.weight").view(B, C, c.n_kv_heads, c.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if P:  # the pool's keys differ by layer and kv head: so does what the chunk sees
                moved = cache.admit(i, n_valid)
                kpos = cache.slot_positions(i).masked_fill(moved, -1)
                kpos = torch.cat([kpos, chunk_pos[:, None].expand(-1, c.n_kv_heads, -1)], 2)
                bias = self.bias(kpos, qpos, W - P, S, pooled=slice(S, S + P))
            attn = attend(q, cache.stored(k), cache.stored(v), cache.keys(i, self.dtype), cache.values(i, self.dtype),
                          bias, chunk_valid if P else None)
            if P:
                attn, mass = attn
                cache.receive(i, mass[..., :W])
                cache.write(i, k, v, n_valid, mass[..., W:])
            else:
                cache.write(i, k, v, n_valid)
            h = h + self.linear(attn.transpose(1, 2).reshape(B, C, -1), p + "attention.wo.weight")
            x = rms_norm(h, self.w[p + "ffn_norm.weight"], c.norm_eps).to(self.dtype)
            gate = F.silu(self.linear(x, p + "feed_forward.w1.weight")) * self.linear(x, p + "feed_forward.w3.weight")
            h = h + self.linear(gate, p + "feed_forward.w2.weight")
        cache.advance(n_valid)
        return (rms_norm(h, self.w["norm.weight"], c.norm_eps).to(self.dtype) @ self.head.T).float()

    def bias(self, kpos: torch.Tensor, qpos: torch.Tensor, window: int, sinks: int,
             pooled: slice | None = None) -> torch.Tensor:
        """[B, heads, C, K] additive mask of keys at kpos [B, heads, K] for queries at qpos [B, C]: `visible`
        under (window, sinks), and every held key of the `pooled` slots (a pool's keys are older than the ring's)."""
        seen = visible(kpos[:, :, None, :], qpos[:, None, :, None], window, sinks)
        if pooled is not None:
            seen[..., pooled] = kpos[:, :, None, pooled] >= 0
        return torch.zeros(seen.shape, dtype=self.dtype, device=self.device).masked_fill(~seen, float("-inf"))

    def prefill(self, tokens: torch.Tensor, cache: RollingKVCache, chunk: int) -> torch.Tensor:
        """Process [B, T] tokens chunk by chunk; returns logits for every position [B, T, V]."""
        if chunk <= 0:
            raise EdgeError(f"chunk size must be a positive integer, got {chunk}")
        return torch.cat([self.forward(tokens[:, s:s + chunk], cache) for s in range(0, tokens.shape[1], chunk)], 1)
