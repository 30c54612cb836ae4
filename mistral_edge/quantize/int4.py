"""int4 weights in groups of G along K, and their two ONNX layouts.

W[n, k] ~= (q[n, k] - z[n, k // G]) * s[n, k // G], codes q in [0, 15]. The zero
point z is one of (`zero_point_kind`; `zero_points` holds the values):
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
zero weight in the error and is left out of a float range). Scales, and float zero points'
offsets s (8 - z), are fp16 values: every layout stores them so, and the codes are the nearest
ones for the stored values. With 8-bit scales (`scale_bits`, float zero points only: the mixed
plan's, quantize/plan.py) a row's scales are integer multiples 1..255 of one fp16 row scale and
its zero points multiples of 1/16, stored as uint8 codes (4.5 bits per weight at g32, not 5).

Methods:
- "rtn": the range (symmetric: absmax / 7), round to nearest.
- "search": each group keeps the best of CLIP_RATIOS shrinks of that range
  (ratio 1.0 is RTN; towards 0 for an integer zero point, towards the range's
  middle for a float one), then alternates exact least-squares steps (codes given
  scale/zero; integer zero given codes/scale, then scale given codes/zero; float:
  scale and zero jointly given the codes). Each step can only lower the group's
  squared error, so search is never worse than RTN. A group under PARENT_GROUP also
  tries its parent's fit (the group twice its size that it halves). The error may be weighted
  per input channel by `act_scale` (AWQ-style calibration: typical |x_k|; the
  error is weighted by its square, which is what x @ (W - Wq).T sees for
  independent channels).

The default method is "search" at every group size (`int4-g128` is `int4-g128-mzp-search`).
Measurements of both methods and of the zero points: docs/quantization.md.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
FP16_TINY, FP16_MAX = 2.0**-24, 65504.0
"""The range of a stored (fp16) scale: its smallest subnormal and its largest finite value."""
PARENT_GROUP = 32
"""A group smaller than this (g16) also tries the fit of the group twice its size that it halves (that
group's range, refined: on a weight already on a 32-wide grid, a Q4_0/Q4_1 GGUF's, the grid itself),
and keeps whichever is better as stored (docs/quantization.md)."""
CHUNK_ELEMENTS = 1 << 18
"""Weights fitted at once (whole rows): bounds the search's temporaries to a few MiB for any matrix."""


@dataclass(frozen=True)
class Int4Weight:
    q: torch.Tensor
    """uint8 [N, Kpad], values 0..15; padding columns hold the code nearest 0."""
    scales: torch.Tensor
    """float32 [N, n_groups], each an fp16 value."""
    zero_points: torch.Tensor
    """[N, n_groups]: uint8 0..15 (all 8 when symmetric), or float32 for float zero points."""
    group_size: int
    k: int
    """The real K (q is padded to n_groups * group_size)."""
    zero_point_kind: str = "int"
    """"none", "int" or "float" (see the module docstring): what `zero_points` holds."""
    row_scales: torch.Tensor | None = None
    """8-bit scales (`scale_bits` 8): float32 [N], fp16 values, and every scale is an integer 1..255
    times its row's (`scale_codes`); float zero points are then multiples of 1/16 in [0, 255/16].
    None: fp16 scales and offsets."""

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], each group's scale and zero point broadcast over its codes (expanding them to [N, K]
        first took 8x as long at Mistral 7B's w13)."""
        groups = self.q.view(self.n, self.n_groups, self.group_size).float()
        out = (groups - self.zero_points.float()[:, :, None]).mul_(self.scales[:, :, None])
        return out.view(self.n, -1)[:, : self.k]

    def split_offset(self) -> tuple[Int4Weight, torch.Tensor]:
        """W = s (q - 8) + o: the symmetric int4 weight with the same codes and scales, and the
        per-group offset o = s (8 - z), float32 [N, n_groups] (see the module docstring)."""
        sym = Int4Weight(self.q, self.scales, torch.full_like(self.q[:, : self.n_groups], 8), self.group_size,
                         self.k, "none", self.row_scales)
        return sym, self.scales * (8 - self.zero_points.float())

    def scale_codes(self) -> torch.Tensor:
        """uint8 [N, n_groups]: the 8-bit scales' codes (scales = codes * row_scales, exactly)."""
        return torch.round(self.scales / self.row_scales[:, None]).to(torch.uint8)

    def zero_codes(self) -> torch.Tensor:
        """uint8 [N, n_groups]: 8-bit scales' float zero points in sixteenths (z = codes / 16, exactly)."""
        return torch.round(self.zero_points * 16).to(torch.uint8)

    def rows(self, r: slice) -> Int4Weight:
        """Rows `r` of this weight."""
        return Int4Weight(self.q[r], self.scales[r], self.zero_points[r], self.group_size, self.k, self.zero_point_kind,
                          None if self.row_scales is None else self.row_scales[r])


def quantize_int4(
    w: torch.Tensor,
    group_size: int = 32,
    zero_point: str = "int",
    method: str = "search",
    act_scale: torch.Tensor | None = None,
    scale_bits: int = 16,
) -> Int4Weight:
    """Quantize W [N, K] (y = x @ W.T) to int4 groups of `group_size` along K; `scale_bits` 8 (float
    zero points only): scales stored as 8-bit codes times an fp16 scale per row, zero points in
    sixteenths (Int4Weight.row_scales), 4.5 bits per weight at g32 instead of 5.

    Fits blocks of CHUNK_ELEMENTS in whole rows (converted to float32 one block at a time), all
    their groups at once, on torch.get_num_threads() threads. Every group is fitted on its own
    (8-bit scales: then rounded onto its row's grid), so the result depends on neither the block
    size nor the thread count."""
    if method not in INT4_METHODS:
        raise EdgeError(f"unknown int4 method {method!r}; expected one of {', '.join(INT4_METHODS)}")
    if zero_point not in TENSOR_ZERO_POINTS:
        raise EdgeError(f"unknown int4 zero point {zero_point!r}; expected one of {', '.join(TENSOR_ZERO_POINTS)}")
    if group_size % 2:
        raise EdgeError(f"int4 group size must be even, got {group_size}")
    if scale_bits not in (8, 16) or (scale_bits == 8 and zero_point != "float"):
        raise EdgeError(f"int4 scales are 16-bit, or 8-bit with float zero points; got {scale_bits} with {zero_point}")
    w = w.detach()
    n, k = w.shape
    groups = math.ceil(k / group_size)
    parent = 2 * group_size if group_size < PARENT_GROUP and method != "rtn" and k > group_size else None
    q = torch.empty(n, groups * group_size, dtype=torch.uint8)
    scales, zeros = torch.empty(n, groups), torch.empty(n, groups)
    row_scales = torch.empty(n) if scale_bits == 8 else None
    rows = min(n, max(1, CHUNK_ELEMENTS // (groups * group_size)))
    fits = threading.local()  # one set of buffers per thread

    def fit_block(block: slice) -> None:
        if not hasattr(fits, "fit"):
            fits.fit = _GroupFit(rows, groups, group_size, _channel_weight(act_scale, k, group_size), zero_point,
                                 scale_bits)
            if parent:
                fits.parent = _GroupFit(rows, math.ceil(k / parent), parent, _channel_weight(act_scale, k, parent),
                                        zero_point, scale_bits)
        also = None
        if parent:  # each pair of groups may share the fit of the group they form
            fit = fits.parent.fit(w[block], method, ratios=CLIP_RATIOS[:1])  # its refinement finds a grid
            also = tuple(t.repeat_interleave(2, dim=1)[:, :groups] for t in fit)
        scales[block], zeros[block], codes, row = fits.fit(w[block], method, also)
        q[block] = codes.view(len(codes), -1)
        if row_scales is not None:
            row_scales[block] = row

    _each_on_threads(fit_block, [slice(start, start + rows) for start in range(0, n, rows)])
    return Int4Weight(q, scales, zeros if zero_point == "float" else zeros.to(torch.uint8), group_size, k, zero_point,
                      row_scales)


def _channel_weight(act_scale: torch.Tensor | None, k: int, group_size: int) -> torch.Tensor | None:
    """The error weight per input channel as [groups, G] (padding columns 0), or None: all ones."""
    groups = math.ceil(k / group_size)
    pad = groups * group_size - k
    if act_scale is None and not pad:
        return None
    ones = torch.ones(k) if act_scale is None else act_scale.detach().float().reshape(k) ** 2
    return F.pad(ones, (0, pad)).view(groups, group_size)


def _each_on_threads(work: Callable[[slice], None], blocks: list[slice]) -> None:
    """work(block) for every block, spread over torch.get_num_threads() threads that each run their
    ops single-threaded. (Intra-op threads meet at a barrier after every step, a few microseconds
    of work each: on a busy machine the waiting cost 20x the work.)"""
    caller = torch.get_num_threads()
    threads = min(caller, len(blocks))
    if threads == 1:
        for block in blocks:
            work(block)
        return
    try:
        with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            list(pool.map(work, blocks))
    finally:
        torch.set_num_threads(caller)  # set_num_threads is process-wide: restore the caller's count


class _GroupFit:
    """Fits the groups of a block of whole rows, [rows, groups, G] in float32, in reused buffers
    (fresh full-size temporaries page-fault at every step and cost more than the arithmetic)."""

    def __init__(self, rows: int, groups: int, group_size: int, weight: torch.Tensor | None, zero_point: str,
                 scale_bits: int = 16):
        shape = (rows, groups, group_size)
        self.weight, self.kind, self.scale_bits = weight, zero_point, scale_bits
        self._buffers = [torch.zeros(shape)] + [torch.empty(shape) for _ in range(3 if weight is None else 4)]
        self.total = torch.tensor(float(group_size)) if weight is None else weight.sum(-1)
        """The weight per group."""

    def __call__(self, w: torch.Tensor, method: str, also: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scale and zero point [rows, groups] for the rows w [rows, K], the codes (float, a view of a
        buffer that the next call overwrites) and the 8-bit scales' row scales [rows] (or None).
        `also`: one more fit (s, z) per group, a candidate for the search and, as stored, against its
        result (on one row scale for both), so a group is never worse than `also` as stored."""
        s, z = self.fit(w, method, also)
        row = self._row(s if also is None else torch.maximum(s, also[0]))
        s, z = self._stored(s, z, row)
        if also is not None:
            s_a, z_a = self._stored(*also, row)
            better = self._error(s_a, z_a) < self._error(s, z)
            s, z = torch.where(better, s_a, s), torch.where(better, z_a, z)
        return s, z, self._residual(s, z)[0], row

    def fit(self, w: torch.Tensor, method: str, also: tuple[torch.Tensor, torch.Tensor] | None = None,
            ratios: list[float] = CLIP_RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
        """The fit's scale and zero point [rows, groups] before they are stored (see __call__),
        searching the clip `ratios`."""
        self.w, self.y, self.q, self.keep, *wa = (b[: len(w)] for b in self._buffers)
        self.w.view(len(w), -1)[:, : w.shape[1]].copy_(w)  # padding columns stay 0
        self.wa = self.w if self.weight is None else torch.mul(self.w, self.weight, out=wa[0])
        lo, hi = self._bounds()
        self.lo, self.flat = lo, hi <= lo  # a flat group: any scale fits it
        if method == "rtn":
            return _grid(lo, hi, self.kind, 1.0)
        candidates = (_grid(lo, hi, self.kind, ratio) for ratio in ratios)
        s, z = next(candidates)
        err = self._error(s, z)
        for s_r, z_r in (*candidates, *([also] if also else [])):
            err_r = self._error(s_r, z_r)
            better = err_r < err
            s, z, err = torch.where(better, s_r, s), torch.where(better, z_r, z), torch.minimum(err_r, err)
        return self._refine_line(s, z, err) if self.kind == "float" else self._refine(s, z)

    def _row(self, s: torch.Tensor) -> torch.Tensor | None:
        """8-bit scales: the fp16 row scale [rows] for per-group scales up to s (the largest / 255;
        all-zero groups left out, a constant group c counted as |c| / 8); None for fp16 scales."""
        if self.scale_bits != 8:
            return None
        c = self.lo
        live = torch.where(self.flat, torch.where(c == 0, 0.0, c.abs() / 8), s).amax(-1)
        return torch.where(live > 0, live / 255, 1.0).clamp(FP16_TINY, FP16_MAX).half().float()

    def _stored(self, s: torch.Tensor, z: torch.Tensor, row: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The fit as the graph stores it: scales rounded to fp16 (every layout stores them so), and a
        float zero point moved so that the fp16 offset s (8 - z) it is stored as is exact. 8-bit
        scales: scales rounded to integer multiples (1..255) of the row scale `row` (`_row`), the zero
        points to sixteenths in [0, 255/16]; a constant group c has s = |c| / 8 (to within s / 32)."""
        if row is not None:
            c = self.lo  # a flat group's value: codes 0 (c < 0) or 15 (c > 0) at z = 8 or 7, s = |c| / 8
            s = torch.where(self.flat, c.abs() / 8, s)
            s16 = torch.round(s / row[:, None]).clamp_(1, 255) * row[:, None]
            z = torch.where(self.flat, torch.where(c > 0, 15.0, 0.0) - c / s16, z)
            return s16, torch.round(z * 16).clamp_(0, 255) / 16
        s16 = s.clamp(FP16_TINY, FP16_MAX).half().float()
        if self.kind == "float":
            z = 8 - (s16 * (8 - z)).half().float() / s16
        return s16, z

    def _residual(self, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes q (float, 0..15) for per-group s, z, and the rounding residual
        r = w / s + z - q in steps (in the buffers q and y)."""
        y = torch.div(self.w, s[..., None], out=self.y).add_(z[..., None])
        q = torch.clamp(y, 0, 15, out=self.q).round_()
        return q, y.sub_(q)

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted sum over each group of x (overwritten)."""
        return (x if self.weight is None else x.mul_(self.weight)).sum(-1)

    def _error(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Weighted squared error per group of the nearest codes: s^2 sum(weight r^2)."""
        return self._sum(self._residual(s, z)[1].square_()) * (s * s)

    def _bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each group's range at ratio 1: [min(w, 0), max(w, 0)] (the integer grid holds 0), [-absmax,
        absmax] (symmetric), or the real entries' [min, max] (float: padding and zero-weight
        channels left out)."""
        w = self.w
        if self.kind == "float" and self.weight is not None:
            pad = self.weight == 0
            lo = self.y.copy_(w).masked_fill_(pad, torch.inf).amin(-1).nan_to_num_(posinf=0.0)
            return lo, self.y.copy_(w).masked_fill_(pad, -torch.inf).amax(-1).nan_to_num_(neginf=0.0)
        lo, hi = w.aminmax(dim=-1)
        if self.kind == "none":
            absmax = torch.maximum(-lo, hi)
            return -absmax, absmax
        return (lo.clamp_(max=0), hi.clamp_(min=0)) if self.kind == "int" else (lo, hi)

    def _refine(self, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Alternating exact minimisation of the weighted squared error on an integer or symmetric
        grid (never increases it): codes, then the integer zero point, then the scale."""
        for _ in range(REFINE_STEPS):
            q, r = self._residual(s, z)
            if self.kind == "int":  # the weighted mean of q - w / s, which is z - r
                z = torch.round(z - self._sum(r) / self.total.clamp(min=1e-30)).clamp_(0, 15)
            d = q.sub_(z[..., None])
            num = torch.mul(d, self.wa, out=self.y).sum(-1)
            den = self._sum(d.square_())
            best = num / den.clamp(min=1e-30)
            s = torch.where((den > 0) & (best > 0), best, s)
        return s, z

    def _refine_line(self, s: torch.Tensor, z: torch.Tensor, err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float zero points: alternate the codes with the weighted least-squares line w ~= a q + c
        per group (s = a, z = -c / a). A group keeps its (s, z) where the fit is degenerate (fewer
        than two distinct codes, or a <= 0) or not better, so the error never increases."""
        n, sw = self.total.double(), self.wa.sum(-1).double()
        q = self.keep.copy_(self._residual(s, z)[0])
        for _ in range(REFINE_STEPS):
            qa = q if self.weight is None else torch.mul(q, self.weight, out=self.y)
            sq = qa.sum(-1).double()
            sqq = torch.mul(q, qa, out=self.y).sum(-1).double()
            sqw = torch.mul(q, self.wa, out=self.y).sum(-1).double()
            det = n * sqq - sq * sq
            a = (n * sqw - sq * sw) / torch.where(det > 0, det, 1.0)
            c = (sqq * sw - sq * sqw) / torch.where(det > 0, det, 1.0)
            ok = (det > 0) & (a > 0)
            new_s = torch.where(ok, a, 1.0).float()
            new_z = torch.where(ok, -c / torch.where(ok, a, 1.0), 0.0).float()
            new_q, r = self._residual(new_s, new_z)
            new_err = self._sum(r.square_()) * (new_s * new_s)
            better = ok & (new_err < err)
            s, z, err = torch.where(better, new_s, s), torch.where(better, new_z, z), torch.where(better, new_err, err)
            q = torch.where(better[..., None], new_q, q, out=self.keep)
        return s, z


def _grid(lo: torch.Tensor, hi: torch.Tensor, zero_point: str, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ratio x the range [lo, hi] (towards 0 for an integer zero
    point, towards the middle for a float one)."""
    if zero_point == "none":
        s = hi * (ratio / 7)
        z = torch.full_like(s, 8.0)
    elif zero_point == "int":
        s = (hi - lo) * ratio / 15
        z = torch.round(-lo * ratio / torch.where(s > 0, s, 1.0)).clamp_(0, 15)
    else:
        mid, s = (hi + lo) / 2, (hi - lo) * (ratio / 15)
        z = torch.where(s > 0, 7.5 - mid / torch.where(s > 0, s, 1.0), -lo)  # a flat group: s = 1, q = 0
    return torch.where(s > 0, s, 1.0), z


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
    if w.zero_point_kind == "none":
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
    if w.zero_point_kind == "none":
        return (q.astype(np.int8) - 8).astype(ml_dtypes.int4), scale, None
    return q.astype(ml_dtypes.uint4), scale, w.zero_points.T.contiguous().numpy().astype(ml_dtypes.uint4)


def _integer_zero_points(w: Int4Weight) -> None:
    if w.zero_point_kind == "float":
        raise ValueError("float zero points have no ONNX int4 layout: store w.split_offset()'s parts")
