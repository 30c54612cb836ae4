"""Weight-only int8 and int4 linears on PyTorch's own kernels: `--backend torch --quant int8-wo|int4-wo`.

int8-wo: one symmetric scale per output row, w ~= q * s with q in [-127, 127], multiplied by
`aten._weight_int8pack_mm` (CPU, CUDA). int4-wo: asymmetric groups along K, w ~= (q - 8) * s + z
with q in [0, 15] and (s, z) per group, the layout of PyTorch's int4 kernels: on CUDA the
tinygemm tiled layout of `_convert_weight_to_int4pack` (two values a byte) with
`_weight_int4pack_mm`, on a CPU `_convert_weight_to_int4pack_for_cpu` with
`_weight_int4pack_mm_for_cpu`. The activations stay in the model's dtype (bf16 for int4 on
CUDA, the only dtype tinygemm takes); embedding, norms and head stay unquantized.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import EdgeError, first_line
from .reference import ReferenceModel

WO_QUANTS = ("int8-wo", "int4-wo")
INT4_GROUPS = (128, 64, 32)
"""int4 group sizes along K, the first that divides a layer's K wins."""
INNER_K_TILES = (8, 4, 2)
"""The int4 kernels' K tiling (16 * tiles must divide K), largest first."""
INT8_K_MULTIPLE = 16
"""The int8 CPU kernel in bf16/fp16 reads past a row whose K is not a multiple of 16 (garbage or a
crash at K = 136 in torch 2.13), so such a layer stays float."""


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 q [N, K], float32 scale [N]) with w ~= q * scale[:, None]."""
    w = w.float()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-8)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int32 q [N, K] in 0..15, float32 scales_and_zeros [K/group, N, 2])."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    low, high = g.amin(-1), g.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = ((g - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous()


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """The float [N, K] weight the int4 kernels multiply by (scales and zeros as stored)."""
    n, k = q.shape
    s, z = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # [N, K/group] each
    return ((q.reshape(n, k // group, group) - 8) * s[..., None] + z[..., None]).reshape(n, k)


class Int8Linear(torch.nn.Module):
    fused = False
    """True: the gpt-fast form, (x @ q.T) * scale with q cast to x's dtype, a single int8-reading GEMV once
    torch.compile fuses the cast into it (eagerly it materializes the float weight every call). The GPU
    benchmark measures it against the aten kernel (benchmarks/gpu_vs_hf.py, row ours-int8-wo-fused)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        q, scale = quantize_int8(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return torch.nn.functional.linear(x, self.weight.to(x.dtype)) * self.scale
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scale)
        return out.view(*x.shape[:-1], -1)


class Int4Linear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, group: int, tiles: int):
        super().__init__()
        q, scales_and_zeros = quantize_int4(weight, group)
        if weight.device.type == "cuda":
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
            self.mm = torch.ops.aten._weight_int4pack_mm
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, tiles)
            self.mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        self.group = group
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mm(x.reshape(-1, x.shape[-1]), self.weight, self.group, self.scales_and_zeros)
        return out.view(*x.shape[:-1], -1)


def int4_layout(n: int, k: int) -> tuple[int, int] | None:
    """(group, tiles) for an [n, k] weight, or None when the int4 kernels cannot take it."""
    group = next((g for g in INT4_GROUPS if k % g == 0), None)
    tiles = next((t for t in INNER_K_TILES if k % (16 * t) == 0), None)
    return None if group is None or tiles is None or n % 16 else (group, tiles)  # N: 16 on a CPU, 8 on CUDA


def weight_only_linear(weight: torch.Tensor, quant: str, dtype: torch.dtype) -> torch.nn.Module | None:
    """`weight` as a `quant` module on its own device, or None for a shape the kernels cannot take."""
    if quant == "int8-wo":
        return Int8Linear(weight, dtype) if weight.shape[1] % INT8_K_MULTIPLE == 0 else None
    layout = int4_layout(*weight.shape)
    return None if layout is None else Int4Linear(weight, dtype, *layout)


def check_weight_only(quant: str, device: torch.device, dtype: torch.dtype) -> None:
    """Run `quant` once on a small layer on `device`, so a missing kernel is one line before a model loads."""
    if quant == "int4-wo" and device.type == "cuda" and dtype != torch.bfloat16:
        raise EdgeError(f"--quant int4-wo on CUDA computes in bf16 (PyTorch's int4 kernel); got --dtype {dtype}")
    try:
        with torch.no_grad():
            layer = weight_only_linear(torch.randn(64, 256, device=device), quant, dtype)
            out = layer(torch.randn(2, 256, device=device, dtype=dtype))
        if not torch.isfinite(out).all():
            raise ValueError("non-finite output on a test layer")
    except Exception as e:
        raise EdgeError(f"--quant {quant} cannot run on {device.type} in {dtype}: "
                        f"{type(e).__name__}: {first_line(e)}") from None


def model_bytes(model: ReferenceModel) -> int:
    """Bytes of the weights `model` holds: its float tensors and its linear modules' saved state."""
    states = (t for m in model.linears.values() for t in m.state_dict().values())
    return sum(t.nbytes for t in model.w.values()) + sum(t.nbytes for t in states)


def swap_linears(model: ReferenceModel, make: Callable[[torch.Tensor], torch.nn.Module | None]) -> int:
    """Replace every layer linear of `model` by `make(weight)` (None: keep it float), one at a time, dropping
    the float weight as it goes; returns model_bytes, read before any forward (some modules repack on first use)."""
    for name in [k for k, w in model.w.items() if k.startswith("layers.") and w.ndim == 2]:
        module = make(model.w[name])
        if module is not None:
            model.linears[name] = module
            del model.w[name]
    return model_bytes(model)


def quantize_weight_only(model: ReferenceModel, quant: str) -> int:
    return swap_linears(model, lambda w: weight_only_linear(w, quant, model.dtype))
