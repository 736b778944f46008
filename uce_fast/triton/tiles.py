"""Tile layout shared by every Triton kernel of uce_fast.

Layout: input (B, C, N), samples (β, B, C, N), all contiguous, so the C values of one pixel are N
elements apart. Every kernel runs one program per tile of ``BLOCK_N`` consecutive pixels of one
batch row (a 1-D grid of ``B * cdiv(N, BLOCK_N)`` programs, so no grid-axis limit applies to B)
and handles classes as the other tile axis: each class row of a tile is a contiguous
``BLOCK_N``-element load, so loads coalesce along pixels without permuting the tensors. Per-pixel
quantities are ``BLOCK_N`` vectors; reductions over classes are ``axis=0`` reductions of the
(classes, pixels) tile.

All math is fp32 (exp2/log2 with log2(e) factors). Offsets: the base of a tile (b·C·N + n0) is
computed in int64 and samples are stepped by adding B·C·N to a 64-bit pointer (stacks beyond 2^31
elements are common at segmentation sizes); the offsets inside a tile, c·N + j, are int32 unless
C·N itself needs int64 (``WIDE``): an int64 offset tile would cost two registers per element in
the loops over samples. Masked lanes are really computed (and, under the interpreter, really
evaluated), so masked class rows are set to -inf by ``tl.where`` and masked pixel lanes read 0:
a padded row then contributes exp(-inf) = 0 and a padded pixel stays finite.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
INT32_MAX = tl.constexpr(2147483647)


@triton.jit
def _pixel_tile(C, N, BLOCK_N: tl.constexpr):
    """This program's tile: (batch row b, first pixel n0, the int64 offsets of the tile in the
    (B, N) per-pixel tensors, ``pix`` = b·N + n0, and of its class 0 in the (B, C, N) ones,
    ``base`` = b·C·N + n0; pixel index j within the tile, int32; mask of real pixels). Program
    id = b * cdiv(N, BLOCK_N) + tile."""
    pid = tl.program_id(0).to(tl.int64)
    tiles = tl.cdiv(N, BLOCK_N)
    b = pid // tiles
    n0 = (pid - b * tiles) * BLOCK_N
    j = tl.arange(0, BLOCK_N)
    return b, n0, b * N + n0, b * C * N + n0, j, j < N - n0


@triton.jit
def _tile_offsets(cls, j, N, WIDE: tl.constexpr):
    """Offsets c·N + j of a (classes, pixels) tile from its base; int64 only when C·N needs it."""
    if WIDE:  # noqa: SIM108  (a constexpr branch: only one side is compiled)
        offs = cls.to(tl.int64)[:, None] * N + j[None, :]
    else:
        offs = cls[:, None] * N + j[None, :]
    return offs


@triton.jit
def _load_classes(tile, cls, j, nmask, C, N, WIDE: tl.constexpr):
    """(classes, pixels) fp32 tile at ``tile`` (the address of class 0, first pixel); padded
    classes -inf, padded pixels 0."""
    cmask = cls < C
    x = tl.load(tile + _tile_offsets(cls, j, N, WIDE), mask=cmask[:, None] & nmask[None, :],
                other=0.0).to(tl.float32)
    return tl.where(cmask[:, None], x, NEG_INF)
