"""Rolling buffer KV cache with attention sinks: exactly W slots per layer, whatever the sequence length.

What it stores: for each layer, keys (after RoPE) and values of shape
[batch, n_kv_heads, W, head_dim]. The first `sinks` slots (S) hold positions 0..S-1 for ever
(StreamingLLM's attention sinks); the other R = W - S slots are a ring: position p >= S lives
in slot S + (p - S) mod R. `pos[b]` counts the tokens sequence b has written so far, from which
`slot_positions` recovers the position every slot holds, so no position table is stored (but
for a pool's slots, below).
A query at p sees the sinks and the last R positions (`visible`); S = 0 is the plain window.

With a pool of P slots (`pool`, docs/cache.md "A pool of the most-attended keys"), slots
S..S+P-1 hold, per kv head, the P keys that have received the most attention per query so far
among those that left the ring, and the ring is R = W - S - P. Every slot records the attention
mass its key has received (`received`, summed over the kv head's query heads and the queries
that saw it); a key at position j has been seen by pos - j queries. Before a chunk attends, the
keys its tokens will overwrite in the ring compete with the pool's (`admit`): the P with the
highest mean mass stay (ties keep the earlier candidate, the pool's first), the winners taking
the losers' slots in slot order. A winner is then read from the pool only.

`kv_cache` emulates the exported graph's storage (contract.KV_CACHES, docs/cache.md): "fp16"
stores float16, "int8" int8 codes plus one float16 scale per slot and kv head (`k_scale`,
`v_scale`, [batch, n_kv_heads, W, 1]); `keys`/`values` read them back dequantized, and
`stored` is what a chunk's own keys/values become once written, which is what the graph
attends to.
"""

from __future__ import annotations

import torch


def visible(kpos: torch.Tensor, qpos: torch.Tensor, window: int, sinks: int = 0) -> torch.Tensor:
    """Whether a query at qpos may attend to a key at kpos (broadcast; kpos < 0 is an empty slot):
    causal, and either a sink (kpos < S) or one of the last W - S positions."""
    return (kpos >= 0) & (kpos <= qpos) & ((kpos < sinks) | (kpos > qpos - (window - sinks)))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and float16 scales [..., 1] of rows x [..., D], computed in float32:
    s = fp16(max|x| / 127) (1 for an all-zero row), q = round-half-even(x / s) clipped to +-127."""
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, (amax / 127).half(), torch.ones_like(amax, dtype=torch.float16))
    return torch.round(x / scale.float()).clamp(-127, 127).to(torch.int8), scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 q * s (exact: an int8 times an fp16 has at most 19 significant bits)."""
    return codes.float() * scale.float()


STORAGE = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}


class RollingKVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, window: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, sinks: int = 0, device: torch.device | str = "cpu",
                 kv_cache: str | None = None, pool: int = 0):
        if not (0 <= sinks and 0 <= pool and sinks + pool < window):
            raise ValueError(f"sinks + pool must be in [0, W={window}), got {sinks} + {pool}")
        if kv_cache is not None and kv_cache not in STORAGE:
            raise ValueError(f"kv_cache must be one of {', '.join(STORAGE)}, got {kv_cache!r}")
        shape = (batch, n_kv_heads, window, head_dim)
        self.window, self.sinks, self.pool, self.kv_cache = window, sinks, pool, kv_cache
        self.ring = window - sinks - pool
        self.store_dtype = STORAGE[kv_cache] if kv_cache else dtype
        self.k = [torch.zeros(shape, dtype=self.store_dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=self.store_dtype, device=device) for _ in range(n_layers)]
        n_scales = n_layers if kv_cache == "int8" else 0
        self.k_scale = [torch.zeros((*shape[:3], 1), dtype=torch.float16, device=device) for _ in range(n_scales)]
        self.v_scale = [torch.zeros((*shape[:3], 1), dtype=torch.float16, device=device) for _ in range(n_scales)]
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        n_pooled = n_layers if pool else 0
        self.received = [torch.zeros(shape[:3], device=device) for _ in range(n_pooled)]
        self.pool_pos = [torch.full((*shape[:2], pool), -1, device=device) for _ in range(n_pooled)]

    @property
    def nbytes(self) -> int:
        tensors = self.k + self.v + self.k_scale + self.v_scale + self.received + self.pool_pos
        return sum(t.numel() * t.element_size() for t in tensors)

    def _read(self, codes: torch.Tensor, scales: list[torch.Tensor], layer: int, dtype: torch.dtype) -> torch.Tensor:
        return (dequantize_rows(codes, scales[layer]) if scales else codes).to(dtype)

    def keys(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        """[batch, n_kv_heads, W, head_dim] keys of `layer` as stored, read back in `dtype`."""
        return self._read(self.k[layer], self.k_scale, layer, dtype)

    def values(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        return self._read(self.v[layer], self.v_scale, layer, dtype)

    def stored(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., head_dim] as writing it to this cache and reading it back gives it, in x's dtype."""
        if self.kv_cache == "int8":
            return dequantize_rows(*quantize_rows(x)).to(x.dtype)
        return x.to(self.store_dtype).to(x.dtype)

    def slot_positions(self, layer: int | None = None) -> torch.Tensor:
        """[batch, W] absolute position held by each slot, -1 where the slot is still empty; with
        a pool, [batch, n_kv_heads, W] for `layer` (the pool's slots differ by kv head)."""
        s, ring, device = self.sinks, self.ring, self.pos.device
        sink = torch.arange(s, device=device).expand(len(self.pos), s)
        sink = torch.where(sink < self.pos[:, None], sink, -1)
        last = self.pos[:, None] - 1 - s  # the latest position in the ring, counted from S
        p = s + last - torch.remainder(last - torch.arange(ring, device=device), ring)
        p = torch.where(p >= s, p, -1)
        if not self.pool:
            return torch.cat([sink, p], 1)
        heads = self.pool_pos[layer].shape[1]
        return torch.cat([sink[:, None].expand(-1, heads, -1), self.pool_pos[layer], p[:, None].expand(-1, heads, -1)], 2)

    def slots_of(self, positions: torch.Tensor) -> torch.Tensor:
        s = self.sinks
        return torch.where(positions < s, positions, s + self.pool + torch.remainder(positions - s, self.ring))

    def admit(self, layer: int, n_valid: torch.Tensor) -> torch.Tensor:
        """Move the ring keys a chunk of n_valid[b] tokens will overwrite into the pool where their
        mean received mass beats a pool key's (module docstring); returns [batch, n_kv_heads, W],
        true at the ring slots whose key now lives in the pool, which the chunk must not read."""
        B, heads = self.k[layer].shape[:2]
        moved = torch.zeros((B, heads, self.window), dtype=torch.bool, device=self.pos.device)
        P, first = self.pool, self.sinks
        for b in range(B):
            pos, n = int(self.pos[b]), int(n_valid[b])
            kpos = pos + torch.arange(n, device=self.pos.device) - self.ring  # the keys leaving the ring
            src = self.slots_of(pos + torch.arange(n, device=self.pos.device))
            cand = torch.cat([self.pool_pos[layer][b], kpos.expand(heads, n)], 1)  # [heads, P + n]
            mass = torch.cat([self.received[layer][b, :, first:first + P], self.received[layer][b, :, src]], 1)
            mean = torch.where(cand >= first, mass / (pos - cand).clamp(min=1), float("-inf"))
            kept = torch.zeros_like(cand, dtype=torch.bool)
            kept.scatter_(1, torch.sort(mean, dim=1, descending=True, stable=True).indices[:, :P], True)
            for h in range(heads):
                losers = first + torch.nonzero(~kept[h, :P]).flatten()
                winners = src[torch.nonzero(kept[h, P:]).flatten()]
                for store in [self.k, self.v, self.k_scale, self.v_scale, self.received]:
                    if store:
                        store[layer][b, h, losers] = store[layer][b, h, winners]
                self.pool_pos[layer][b, h, losers - first] = cand[h, P:][kept[h, P:]]
                moved[b, h, winners] = True
        return moved

    def receive(self, layer: int, mass: torch.Tensor) -> None:
        """Add the attention mass [batch, n_kv_heads, W] a chunk's queries gave the cache's slots."""
        self.received[layer] += mass

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, n_valid: torch.Tensor,
              mass: torch.Tensor | None = None) -> None:
        """Store a chunk's [batch, n_kv_heads, C, head_dim] keys/values at the slots of positions pos + i
        (with a pool, `mass` [batch, n_kv_heads, C]: what the chunk's own keys received).

        Only the first n_valid[b] tokens of sequence b are stored (padding never
        overwrites a slot). `advance` must follow once every layer has written.
        """
        int8 = self.kv_cache == "int8"
        for b in range(k.shape[0]):
            n = int(n_valid[b])
            slots = self.slots_of(self.pos[b] + torch.arange(n, device=k.device))
            for store, scales, new in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
                rows = new[b, :, :n]
                if int8:
                    rows, scale = quantize_rows(rows)
                    scales[layer][b, :, slots] = scale
                store[layer][b, :, slots] = rows.to(self.store_dtype)
            if self.pool:
                self.received[layer][b, :, slots] = mass[b, :, :n]

    def advance(self, n_valid: torch.Tensor) -> None:
        self.pos += n_valid
