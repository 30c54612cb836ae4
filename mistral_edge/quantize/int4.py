"""int4 weights in groups of G along K, and their two ONNX layouts.

W[n, k] ~= (q[n, k] - z[n, k // G]) * s[n, k // G], codes q in [0, 15]. The zero
point z is one of ("zero_point"):
- "none": symmetric, z = 8 everywhere (nothing stored);
- "int": an integer in [0, 15] (what MatMulNBits and DequantizeLinear store), so
  0 is always on the grid and each group's range includes 0;
- "float": any real number (HQQ-style), so a group's 16 levels can sit anywhere:
  the range is the group's own [min, max]. Neither ONNX op has a fast path for
  it (MatMulNBits takes float zero points but then dequantizes the whole matrix
  on every call: 40x slower decode), so the graph splits W = s (q - 8) + o with
  the per-group offset o = s (8 - z) (`split_offset`): a symmetric int4 matmul
  plus the group sums of x times o.
K is zero-padded to whole groups; padding never moves a group's fit (it carries
zero weight in the error and is left out of a float range).

Methods:
- "rtn": the range (symmetric: absmax / 7), round to nearest.
- "search": each group keeps the best of CLIP_RATIOS shrinks of that range
  (ratio 1.0 is RTN; towards 0 for an integer zero point, towards the range's
  middle for a float one), then alternates exact least-squares steps (codes given
  scale/zero; integer zero given codes/scale, then scale given codes/zero; float:
  scale and zero jointly given the codes). Each step can only lower the group's
  squared error, so search is never worse than RTN. The error may be weighted
  per input channel by `act_scale` (AWQ-style calibration: typical |x_k|; the
  error is weighted by its square, which is what x @ (W - Wq).T sees for
  independent channels).

Measured on SmolLM2-135M (next-token KL vs fp32 on 384 WikiText tokens, all
linears int4, integer zero points): act-weighted search beats RTN by 27-35% (g128
0.28 vs 0.39, g32 0.17 vs 0.26). Unweighted, the lower weight error does not carry
over: search is slightly better at g32 (0.25 vs 0.26) but worse at g64/g128 (0.40
vs 0.35, 0.47 vs 0.39): it clips large weights that meet large activations.
Uncalibrated g64/g128 exports do better with "rtn".

Float zero points, same model, the compare protocol (WikiText-2 test, 32 x 512
tokens): g32 perplexity +0.17% vs fp32 (integer zero points: +20%). That is
because its weights come from a Q4_1 GGUF (w = d q + m per block of 32 along K,
the same grid), which a float zero point fits exactly (relative error 1e-7); on
weights from a float checkpoint it is a better-fitting grid (Q4_1-like), not a
lossless one. At g64 (5.0 bits, not aligned to a Q4_1 grid) it measured about
as far from fp32 as integer g32 (+18.6% vs +18.2% on 4 windows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import EdgeError
from .spec import INT4_METHODS

TENSOR_ZERO_POINTS = ("none", "int", "float")

CLIP_RATIOS = torch.linspace(1.0, 0.75, 12).tolist()  # 20 or 40 ratios measured no better
REFINE_STEPS = 3
_ROW_CHUNK = 4096  # bounds temporaries on 49k-row embeddings


@dataclass(frozen=True)
class Int4Weight:
    q: torch.Tensor
    """uint8 [N, Kpad], values 0..15; padding columns hold the code nearest 0."""
    scales: torch.Tensor
    """float32 [N, n_groups]."""
    zero_points: torch.Tensor
    """[N, n_groups]: uint8 0..15 (all 8 when symmetric), or float32 for float zero points."""
    group_size: int
    k: int
    """The real K (q is padded to n_groups * group_size)."""
    zero_point: str = "int"

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]."""
        g = self.group_size
        z = self.zero_points.float().repeat_interleave(g, dim=1)
        s = self.scales.repeat_interleave(g, dim=1)
        return ((self.q.float() - z) * s)[:, : self.k]

    def split_offset(self) -> tuple[Int4Weight, torch.Tensor]:
        """W = s (q - 8) + o: the symmetric int4 weight with the same codes and scales, and the
        per-group offset o = s (8 - z), float32 [N, n_groups] (see the module docstring)."""
        sym = Int4Weight(self.q, self.scales, torch.full_like(self.q[:, : self.n_groups], 8), self.group_size,
                         self.k, "none")
        return sym, self.scales * (8 - self.zero_points.float())


def quantize_int4(
    w: torch.Tensor,
    group_size: int = 32,
    zero_point: str = "int",
    method: str = "search",
    act_scale: torch.Tensor | None = None,
) -> Int4Weight:
    """Quantize W [N, K] (y = x @ W.T) to int4 groups of `group_size` along K."""
    if method not in INT4_METHODS:
        raise EdgeError(f"unknown int4 method {method!r}; expected one of {', '.join(INT4_METHODS)}")
    if zero_point not in TENSOR_ZERO_POINTS:
        raise EdgeError(f"unknown int4 zero point {zero_point!r}; expected one of {', '.join(TENSOR_ZERO_POINTS)}")
    if group_size % 2:
        raise EdgeError(f"int4 group size must be even, got {group_size}")
    w = w.detach().float()
    n, k = w.shape
    groups = math.ceil(k / group_size)
    pad = groups * group_size - k
    weight = torch.ones(k) if act_scale is None else act_scale.detach().float().reshape(k) ** 2
    weight = F.pad(weight, (0, pad)).view(1, groups, group_size)
    grouped = F.pad(w, (0, pad)).view(n, groups, group_size)
    fits = [_fit(rows, weight, zero_point, method) for rows in grouped.split(_ROW_CHUNK)]
    scales = torch.cat([s for s, _ in fits])
    zeros = torch.cat([z for _, z in fits])
    q = _codes(grouped, scales, zeros).to(torch.uint8).view(n, -1)
    return Int4Weight(q, scales, zeros if zero_point == "float" else zeros.to(torch.uint8), group_size, k, zero_point)


def _codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Nearest codes (float, 0..15) of w [rows, groups, G] for per-group s, z."""
    return torch.round(w / s[..., None] + z[..., None]).clamp_(0, 15)


def _error(w: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    q = _codes(w, s, z)
    return (((q - z[..., None]) * s[..., None] - w) ** 2 * weight).sum(-1)


def _range(w: torch.Tensor, weight: torch.Tensor, zero_point: str, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ratio x each group's range: [min(w, 0), max(w, 0)] (the
    integer grid holds 0), absmax (symmetric), or the real entries' [min, max] around its middle."""
    if zero_point == "none":
        s = w.abs().amax(-1) * (ratio / 7)
        z = torch.full_like(s, 8.0)
    elif zero_point == "int":
        lo, hi = w.amin(-1).clamp(max=0) * ratio, w.amax(-1).clamp(min=0) * ratio
        s = (hi - lo) / 15
        z = torch.round(-lo / torch.where(s > 0, s, 1.0)).clamp_(0, 15)
    else:
        real = weight > 0
        lo = torch.where(real, w, torch.inf).amin(-1).nan_to_num(posinf=0.0)
        hi = torch.where(real, w, -torch.inf).amax(-1).nan_to_num(neginf=0.0)
        mid, s = (hi + lo) / 2, (hi - lo) * (ratio / 15)
        z = torch.where(s > 0, 7.5 - mid / torch.where(s > 0, s, 1.0), -lo)  # a flat group: s = 1, q = 0
    return torch.where(s > 0, s, 1.0), z


def _refine(
    w: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, z: torch.Tensor, zero_point: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating exact minimisation of the weighted squared error (never increases it)."""
    total = weight.sum(-1).clamp(min=1e-30)
    for _ in range(REFINE_STEPS):
        q = _codes(w, s, z)
        if zero_point == "float":
            s, z = _fit_line(w, weight, q, s, z)
        else:
            if zero_point == "int":
                z = torch.round(((q - w / s[..., None]) * weight).sum(-1) / total).clamp_(0, 15)
            d = q - z[..., None]
            den = (d * d * weight).sum(-1)
            best = (w * d * weight).sum(-1) / den.clamp(min=1e-30)
            s = torch.where((den > 0) & (best > 0), best, s)
    return s, z


def _fit_line(
    w: torch.Tensor, weight: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares w ~= a q + c per group, as s = a, z = -c / a; groups whose fit is
    degenerate (fewer than two distinct codes, or a <= 0) or not better keep (s, z)."""
    def moment(t: torch.Tensor) -> torch.Tensor:
        return (t * weight).sum(-1, dtype=torch.float64)
    n, sq, sqq, sw, sqw = moment(torch.ones_like(q)), moment(q), moment(q * q), moment(w), moment(q * w)
    det = n * sqq - sq * sq
    a = (n * sqw - sq * sw) / torch.where(det > 0, det, 1.0)
    c = (sqq * sw - sq * sqw) / torch.where(det > 0, det, 1.0)
    ok = (det > 0) & (a > 0)
    new_s = torch.where(ok, a, 1.0).float()
    new_z = torch.where(ok, -c / torch.where(ok, a, 1.0), 0.0).float()
    better = ok & (_error(w, weight, new_s, new_z) < _error(w, weight, s, z))
    return torch.where(better, new_s, s), torch.where(better, new_z, z)


def _fit(w: torch.Tensor, weight: torch.Tensor, zero_point: str, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero point) for w [rows, groups, G]."""
    if method == "rtn":
        return _range(w, weight, zero_point, 1.0)
    best_s, best_z = _range(w, weight, zero_point, CLIP_RATIOS[0])
    best_err = _error(w, weight, best_s, best_z)
    for ratio in CLIP_RATIOS[1:]:
        s, z = _range(w, weight, zero_point, ratio)
        err = _error(w, weight, s, z)
        better = err < best_err
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        best_err = torch.minimum(err, best_err)
    return _refine(w, weight, best_s, best_z, zero_point)


def pack_matmul_nbits(w: Int4Weight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Inputs B, scales, zero_points of com.microsoft.MatMulNBits (bits=4, block_size=G, K=w.k, N=w.n).

    B: uint8 [N, n_blocks, G/2], two codes per byte along K, the first in the low
    nibble. scales: float32 [N * n_blocks]. zero_points: uint8 [N * ceil(n_blocks/2)],
    two per byte (low nibble first), each row padded to whole bytes; None when
    symmetric (the operator's default zero point is 8). Float zero points: split_offset first.
    """
    _integer_zero_points(w)
    q = w.q.view(w.n, w.n_groups, w.group_size)
    b = q[..., 0::2] | (q[..., 1::2] << 4)
    scales = w.scales.reshape(-1).numpy().astype(np.float32)
    if w.zero_point == "none":
        return b.numpy(), scales, None
    z = F.pad(w.zero_points, (0, w.n_groups % 2))
    return b.numpy(), scales, (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1).numpy()


def blocked_qdq(w: Int4Weight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Inputs x, x_scale, x_zero_point of DequantizeLinear (opset 21+, axis=0, block_size=G).

    Laid out [K, N] so that MatMul(x, DequantizeLinear(...)) computes x @ W.T with no
    Transpose. x has the real K rows: the spec sizes the scale as ceil(K / G) blocks,
    so the last block may be partial. Asymmetric: x and zero point are uint4
    (ml_dtypes arrays, which onnx.numpy_helper.from_array stores as UINT4);
    symmetric: x is int4 (q - 8) and there is no zero point. Scale: float32 [n_blocks, N].
    Float zero points: split_offset first.
    """
    _integer_zero_points(w)
    q = w.q[:, : w.k].T.contiguous().numpy()
    scale = w.scales.T.contiguous().numpy()
    if w.zero_point == "none":
        return (q.astype(np.int8) - 8).astype(ml_dtypes.int4), scale, None
    return q.astype(ml_dtypes.uint4), scale, w.zero_points.T.contiguous().numpy().astype(ml_dtypes.uint4)


def _integer_zero_points(w: Int4Weight) -> None:
    if w.zero_point == "float":
        raise ValueError("float zero points have no ONNX int4 layout: store w.split_offset()'s parts")
