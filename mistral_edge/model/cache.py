"""Rolling buffer KV cache with attention sinks: exactly W slots per layer, whatever the sequence length.

What it stores: for each layer, keys (after RoPE) and values of shape
[batch, n_kv_heads, W, head_dim]. The first `sinks` slots (S) hold positions 0..S-1 for ever
(StreamingLLM's attention sinks); the other R = W - S slots are a ring: position p >= S lives
in slot S + (p - S) mod R. `pos[b]` counts the tokens sequence b has written so far, from which
`slot_positions` recovers the position every slot holds, so no position table is stored.
A query at p sees the sinks and the last R positions (`visible`); S = 0 is the plain window.

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
                 kv_cache: str | None = None):
        if not 0 <= sinks < window:
            raise ValueError(f"sinks must be in [0, W={window}), got {sinks}")
        if kv_cache is not None and kv_cache not in STORAGE:
            raise ValueError(f"kv_cache must be one of {', '.join(STORAGE)}, got {kv_cache!r}")
        shape = (batch, n_kv_heads, window, head_dim)
        self.window, self.sinks, self.kv_cache = window, sinks, kv_cache
        self.store_dtype = STORAGE[kv_cache] if kv_cache else dtype
        self.k = [torch.zeros(shape, dtype=self.store_dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=self.store_dtype, device=device) for _ in range(n_layers)]
        n_scales = n_layers if kv_cache == "int8" else 0
        self.k_scale = [torch.zeros((*shape[:3], 1), dtype=torch.float16, device=device) for _ in range(n_scales)]
        self.v_scale = [torch.zeros((*shape[:3], 1), dtype=torch.float16, device=device) for _ in range(n_scales)]
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.k_scale + self.v_scale)

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

    def slot_positions(self) -> torch.Tensor:
        """[batch, W] absolute position held by each slot, -1 where the slot is still empty."""
        s, ring, device = self.sinks, self.window - self.sinks, self.pos.device
        sink = torch.arange(s, device=device).expand(len(self.pos), s)
        sink = torch.where(sink < self.pos[:, None], sink, -1)
        last = self.pos[:, None] - 1 - s  # the latest position in the ring, counted from S
        p = s + last - torch.remainder(last - torch.arange(ring, device=device), ring)
        return torch.cat([sink, torch.where(p >= s, p, -1)], 1)

    def slots_of(self, positions: torch.Tensor) -> torch.Tensor:
        s = self.sinks
        return torch.where(positions < s, positions, s + torch.remainder(positions - s, self.window - s))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, n_valid: torch.Tensor) -> None:
        """Store a chunk's [batch, n_kv_heads, C, head_dim] keys/values at the slots of positions pos + i.

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

    def advance(self, n_valid: torch.Tensor) -> None:
        self.pos += n_valid
