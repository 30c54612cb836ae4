"""Rolling buffer KV cache: exactly W slots per layer, whatever the sequence length.

What it stores: for each layer, keys (after RoPE) and values of shape
[batch, n_kv_heads, W, head_dim]. The key/value of absolute position p lives in
slot p mod W. `pos[b]` counts the tokens sequence b has written so far; the
position held by slot j is therefore the latest p < pos[b] with p = j (mod W),
which `slot_positions` recovers, so no position table is stored.
"""

from __future__ import annotations

import torch


class RollingKVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, window: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, n_kv_heads, window, head_dim)
        self.window = window
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def slot_positions(self) -> torch.Tensor:
        """[batch, W] absolute position held by each slot, -1 where the slot is still empty."""
        j = torch.arange(self.window, device=self.pos.device)
        last = self.pos[:, None] - 1
        p = last - torch.remainder(last - j, self.window)
        return torch.where(p >= 0, p, torch.full_like(p, -1))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, n_valid: torch.Tensor) -> None:
        """Store a chunk's [batch, n_kv_heads, C, head_dim] keys/values at slots (pos + i) mod W.

        Only the first n_valid[b] tokens of sequence b are stored (padding never
        overwrites a slot). `advance` must follow once every layer has written.
        """
        for b in range(k.shape[0]):
            n = int(n_valid[b])
            slots = torch.remainder(self.pos[b] + torch.arange(n, device=k.device), self.window)
            self.k[layer][b, :, slots] = k[b, :, :n].to(self.k[layer].dtype)
            self.v[layer][b, :, slots] = v[b, :, :n].to(self.v[layer].dtype)

    def advance(self, n_valid: torch.Tensor) -> None:
        self.pos += n_valid
