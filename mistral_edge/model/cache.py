"""Rolling buffer KV cache with attention sinks: exactly W slots per layer, whatever the sequence length.

What it stores: for each layer, keys (after RoPE) and values of shape
[batch, n_kv_heads, W, head_dim]. The first `sinks` slots (S) hold positions 0..S-1 for ever
(StreamingLLM's attention sinks); the other R = W - S slots are a ring: position p >= S lives
in slot S + (p - S) mod R. `pos[b]` counts the tokens sequence b has written so far, from which
`slot_positions` recovers the position every slot holds, so no position table is stored.
A query at p sees the sinks and the last R positions (`visible`); S = 0 is the plain window.
"""

from __future__ import annotations

import torch


def visible(kpos: torch.Tensor, qpos: torch.Tensor, window: int, sinks: int = 0) -> torch.Tensor:
    """Whether a query at qpos may attend to a key at kpos (broadcast; kpos < 0 is an empty slot):
    causal, and either a sink (kpos < S) or one of the last W - S positions."""
    return (kpos >= 0) & (kpos <= qpos) & ((kpos < sinks) | (kpos > qpos - (window - sinks)))


class RollingKVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, window: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, sinks: int = 0, device: torch.device | str = "cpu"):
        if not 0 <= sinks < window:
            raise ValueError(f"sinks must be in [0, W={window}), got {sinks}")
        shape = (batch, n_kv_heads, window, head_dim)
        self.window, self.sinks = window, sinks
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

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
        for b in range(k.shape[0]):
            n = int(n_valid[b])
            slots = self.slots_of(self.pos[b] + torch.arange(n, device=k.device))
            self.k[layer][b, :, slots] = k[b, :, :n].to(self.k[layer].dtype)
            self.v[layer][b, :, slots] = v[b, :, :n].to(self.v[layer].dtype)

    def advance(self, n_valid: torch.Tensor) -> None:
        self.pos += n_valid
