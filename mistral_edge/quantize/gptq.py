"""Error-feedback int4 (GPTQ-style): round one input column at a time and push its error onto the
columns not yet rounded, weighted by the inverse Hessian of the layer's calibration inputs.

For y = x W^T with inputs X, the output error of W + dW is tr(dW H dW^T) with H = X^T X. Rounding
column j leaves an error e_j on it; the columns after it (in the processing order) absorb
-e_j H^-1[j, later] / H^-1[j, j], the least-squares correction given H (Optimal Brain
Surgeon). With U the upper Cholesky factor of H^-1, row j of U holds exactly those weights for
the columns still open, so one factorisation serves the whole matrix, and the rows of W are
independent given it: blocks of rows run on torch.get_num_threads() threads, each with
single-threaded ops (as quantize_int4 does: the steps are small). Columns are processed in
blocks of BLOCK: inside a block the updates are rank-1, the rest of the matrix gets the block's
errors in one matmul (lazy batch updates).

act-order: columns with the largest diag(H) (the largest inputs) are rounded first, while the
most columns are left to absorb their error. MatMulNBits' groups are contiguous in K and it takes
no group index, so the groups are static: every group's scale and zero point are fitted in the
original order before the pass (quantize_int4 weighted by diag(H)), and a column rounds onto its
own group's grid whatever its turn. The result is an ordinary Int4Weight.

Memory: H's diagonal blocks over the segments of K (`Hessian`: 0.2 GiB for Mistral 7B's w2,
K = 14336) and the factor of one segment, plus W in float32; H is accumulated from row blocks of X.
"""

from __future__ import annotations

import dataclasses

import torch

from .int4 import Int4Weight, _each_on_threads, quantize_int4

DAMP = 0.01
"""Added to diag(H), as a share of its mean: keeps the factorisation defined when inputs are
collinear (or a channel is always 0) and limits how far one column's error is pushed."""
BLOCK = 128
MAX_COLUMNS = 4096
"""Error feedback runs within segments of at most this many input columns (whole groups): the
factorisation costs K^3, so Mistral 7B's w2 (K = 14336) in one piece would cost 40x a 4096 one."""
ROWS = 4096
"""Calibration rows added to a Hessian at once."""


def segments(k: int, group_size: int) -> list[slice]:
    """The input columns error feedback runs within: equal runs of whole groups, at most
    MAX_COLUMNS each (one segment when K <= MAX_COLUMNS)."""
    n = -(-k // MAX_COLUMNS)
    width = -(-k // (n * group_size)) * group_size
    return [slice(start, min(start + width, k)) for start in range(0, k, width)]


@dataclasses.dataclass(frozen=True)
class Hessian:
    """X^T X / rows of a linear's inputs, only its diagonal blocks over `segments`: the pass reads
    nothing between segments, so those blocks are never formed (Mistral 7B's w2, K = 14336 in 4
    segments: a quarter of the flops and of the 0.8 GiB a whole H takes)."""

    segments: list[slice]
    blocks: list[torch.Tensor]

    def diagonal(self) -> torch.Tensor:
        return torch.cat([block.diagonal() for block in self.blocks])

    def shrunk(self, prior: torch.Tensor, weight: float) -> Hessian:
        """H + weight * mean(diag H) * prior on the same blocks, for a prior [K, K] at unit mean diagonal
        (quantize/prior.py): what few inputs leave undetermined, the prior fills in."""
        mean = float(self.diagonal().mean())
        return Hessian(self.segments, [block + (weight * mean) * prior[cols, cols]
                                       for cols, block in zip(self.segments, self.blocks)])


def hessian(x: torch.Tensor, group_size: int = 32) -> Hessian:
    """The Hessian of inputs x [..., K] for GPTQ with groups of `group_size` (float32, accumulated
    over row blocks of x)."""
    x = x.reshape(-1, x.shape[-1])
    parts = segments(x.shape[1], group_size)
    blocks = [torch.zeros(cols.stop - cols.start, cols.stop - cols.start) for cols in parts]
    for start in range(0, len(x), ROWS):
        rows = x[start:start + ROWS].float()
        for cols, block in zip(parts, blocks):
            block.addmm_(rows[:, cols].T, rows[:, cols])
    return Hessian(parts, [block.div_(max(len(x), 1)) for block in blocks])


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper triangular U with U^T U = (H + damp mean(diag H) I)^-1, with more dampening if H is not
    positive definite in float32.

    The Cholesky factor of the index-reversed H, reversed back, is an upper R with H = R R^T, so
    U = R^-1: one factorisation and one triangular inverse (2/3 K^3 flops) where factoring H, inverting
    it and factoring the inverse costs twice that (Mistral 7B's K = 4096: 0.8 s against 1.4 s)."""
    eye = torch.eye(len(h))
    mean = float(h.diagonal().mean()) or 1.0
    for factor in (damp, 10 * damp, 100 * damp, 1.0):
        lower, info = torch.linalg.cholesky_ex((h + factor * mean * eye).flip(0, 1))
        if int(info) == 0:
            return _upper_inverse(lower.flip(0, 1))
    raise ValueError("the calibration Hessian is not positive definite even when fully dampened")


def _upper_inverse(r: torch.Tensor) -> torch.Tensor:
    """The inverse of an upper triangular r, by halves: inv([[A, B], [0, D]]) has A^-1 and D^-1 on
    its diagonal and -A^-1 B D^-1 above it; mostly matmuls, 1.6x faster than solving against I."""
    n = len(r)
    if n <= 256:
        return torch.linalg.solve_triangular(r, torch.eye(n), upper=True)
    a = n // 2
    out = torch.zeros(n, n)
    out[:a, :a], out[a:, a:] = _upper_inverse(r[:a, :a]), _upper_inverse(r[a:, a:])
    out[:a, a:] = -(out[:a, :a] @ r[:a, a:]) @ out[a:, a:]
    return out


def gptq_int4(w: torch.Tensor, h: Hessian, group_size: int = 32, zero_point: str = "int",
              method: str = "search", act_order: bool = True, damp: float = DAMP, scale_bits: int = 16) -> Int4Weight:
    """int4 codes of W [N, K] (y = x @ W.T) that minimise the output error on inputs with
    Hessian h (`hessian(x, group_size)`), on static groups fitted by quantize_int4(method) with each
    input channel's error weighted by diag(h); each segment of K runs on its own block of h."""
    w = w.detach().float()
    if h.segments != segments(w.shape[1], group_size):
        raise ValueError(f"a Hessian over segments {h.segments} does not fit K = {w.shape[1]} in groups of {group_size}")
    diagonal = h.diagonal()
    dead = diagonal <= 0  # a channel never active: its weight does not matter
    w[:, dead] = 0.0
    diagonal[dead] = 1.0
    grid = quantize_int4(w, group_size, zero_point, method, act_scale=diagonal.sqrt(), scale_bits=scale_bits)
    q = grid.q.clone()  # keeps the padding columns' codes
    for cols, block in zip(h.segments, h.blocks):
        block = block.clone()
        block.diagonal()[dead[cols]] = 1.0
        q[:, cols] = _gptq_columns(w[:, cols], block, grid, cols.start, act_order, damp)
    return dataclasses.replace(grid, q=q)


def _gptq_columns(w: torch.Tensor, h: torch.Tensor, grid: Int4Weight, first: int, act_order: bool,
                  damp: float) -> torch.Tensor:
    """uint8 codes of the columns first.. of `grid` whose weights are w [N, C], Hessian block h [C, C]."""
    n, k = w.shape
    scales, zeros = grid.scales, grid.zero_points.float()
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    w = w[:, order].clone()
    u = _inverse_factor(h[order][:, order], damp)
    group = (first + order) // grid.group_size
    codes = torch.empty(n, k, dtype=torch.uint8)

    def round_rows(rows: slice) -> None:  # rows are independent given U
        for start in range(0, k, BLOCK):
            cols = slice(start, min(start + BLOCK, k))
            errors = _round_block(w[rows, cols], codes[rows, cols], scales[rows][:, group[cols]],
                                  zeros[rows][:, group[cols]], u[cols, cols])
            w[rows, cols.stop:].addmm_(errors, u[cols, cols.stop:], alpha=-1)  # in place: no [rows, K] temporary

    step = -(-n // torch.get_num_threads())
    _each_on_threads(round_rows, [slice(r, r + step) for r in range(0, n, step)])
    out = torch.empty(n, k, dtype=torch.uint8)
    out[:, order] = codes
    return out


def _round_block(block: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                 u: torch.Tensor) -> torch.Tensor:
    """Round the columns of `block` [rows, B] in turn onto their grids s, z [rows, B] (codes written
    to `codes`), each column's error pushed onto the block's later columns; returns the scaled errors
    [rows, B] for the rest of the matrix. Works on a transposed copy (a column per contiguous row),
    where each push is one in-place rank-1 update: 3x faster than on the strided view at 7B's sizes."""
    bt, st, zt = block.T.contiguous(), s.T.contiguous(), z.T.contiguous()
    errors, qt = torch.empty_like(bt), torch.empty_like(bt)
    for i in range(len(bt)):
        q = torch.clamp(torch.round(bt[i] / st[i] + zt[i]), 0, 15, out=qt[i])
        torch.sub(bt[i], (q - zt[i]) * st[i], out=errors[i]).div_(u[i, i])
        if i + 1 < len(bt):
            bt[i + 1:].addr_(u[i, i + 1:], errors[i], alpha=-1)
    codes.copy_(qt.T)
    return errors.T
