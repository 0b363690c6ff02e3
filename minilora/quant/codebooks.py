"""The codebooks bitsandbytes quantizes to, bit for bit, and the lookup tables built from them.

4-bit: NF4 (normal quantiles), FP4 (1 sign, 2 exponent, 1 mantissa bit) and INT4 (k/7), 16 values
each, index = code. 8-bit: the dynamic map (double quantization of the 4-bit scales, 8-bit Adam).

`codebook_tables(quant_type, device)` gathers what the 4-bit quantizer and dequantizer read, built
once per (quant_type, device): the codebook, the midpoints between its sorted values, a byte ->
(high, low) value table for dequantizing, and a grid over [-1, 1] that finds the nearest code with
one lookup and one comparison (`nearest_codes`), equal to `torch.bucketize` bit for bit.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

__all__ = [
    "QUANT_TYPES", "GRID_CELLS", "nf4_codebook", "fp4_codebook", "int4_codebook", "codebook", "dynamic_map",
    "shared_dynamic_map", "CodeGrid", "CodebookTables", "codebook_tables", "nearest_codes",
]

QUANT_TYPES = ("nf4", "fp4", "int4")
GRID_CELLS = 4096  # cells of the code-lookup grid over [-1, 1]


@lru_cache(maxsize=None)
def _nf4_values() -> tuple[float, ...]:
    from scipy.stats import norm

    # QLoRA appendix / bitsandbytes create_normal_map: equal-probability quantiles of N(0, 1),
    # 8 positive and 7 negative plus an exact zero, so that 0 is representable. The outermost
    # quantile is offset = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 to avoid the infinite tails.
    # bitsandbytes evaluates the quantile grid in float32; a float64 grid lands 1 ulp away.
    offset = 0.9677083
    positive = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy()).tolist()
    negative = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())).tolist()
    values = torch.tensor(positive + [0.0] + negative, dtype=torch.float32).sort().values
    return tuple((values / values.max()).tolist())


def nf4_codebook() -> torch.Tensor:
    """The 16 NormalFloat4 values, fp32, sorted; index = 4-bit code."""
    return torch.tensor(_nf4_values(), dtype=torch.float32)


def fp4_codebook() -> torch.Tensor:
    """bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2), in code order, max 1."""
    # code bits 0b_eem for the 3 low bits: 0, subnormal 0.0625, then 8, 12, 4, 6, 2, 3; bit 3 = sign.
    # Code 8 ("-0") is +0.0: bitsandbytes writes the integer literal -0, and the serialized
    # quant_map bytes must match.
    magnitudes = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
    values = torch.tensor(magnitudes + [0.0] + [-m for m in magnitudes[1:]], dtype=torch.float32)
    return values / 12.0


def int4_codebook() -> torch.Tensor:
    """Symmetric INT4 as bitsandbytes' "int4" type: k/7 for k = 7..0, 0..-7 (zero twice, both +0.0)."""
    values = torch.tensor([7.0, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7])
    return values / 7.0


def codebook(quant_type: str) -> torch.Tensor:
    """The 16 values of "nf4", "fp4" or "int4" in code order (a fresh fp32 tensor)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return {"nf4": nf4_codebook, "fp4": fp4_codebook, "int4": int4_codebook}[quant_type]()


@lru_cache(maxsize=None)
def _dynamic_values(signed: bool) -> tuple[float, ...]:
    # bitsandbytes create_dynamic_map(signed, max_exponent_bits=7, total_bits=8): a dynamic
    # exponent (10^-6 .. 10^0) with a shrinking linear fraction (Dettmers 2015, arXiv:1511.04561).
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return tuple(sorted(data))


def dynamic_map(signed: bool = True, device=None) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map (fp32[256], sorted; a fresh tensor on `device`, default CPU).
    signed=True is the double-quantization map; signed=False is 8-bit Adam's map for v."""
    return torch.tensor(_dynamic_values(bool(signed)), dtype=torch.float32, device=device)


@lru_cache(maxsize=None)
def shared_dynamic_map(device: torch.device) -> torch.Tensor:
    """dynamic_map(signed=True) on `device`, built once and shared (read it, do not write): the map
    the double-quantized 4-bit scales decode with."""
    return dynamic_map(True, device)


# ----------------------------------------------------------------------------------- 4-bit tables

class CodeGrid(NamedTuple):
    """The code-lookup grid: cell j covers [-1 + 2j/G, -1 + 2(j+1)/G] of the scaled values (G =
    GRID_CELLS). A value in cell j gets code `low[j]` if it is <= `cell_midpoint[j]` (the one
    midpoint of the codebook inside the cell, +inf when none is), else `high[j]`; `high` is None
    for a sorted codebook (NF4), where it is low + 1."""

    low: torch.Tensor                   # uint8 (G,)
    high: torch.Tensor | None           # uint8 (G,) or None
    cell_midpoint: torch.Tensor         # fp32 (G,)


class CodebookTables(NamedTuple):
    """What the 4-bit quantizer and dequantizer read for one quant type, on one device."""

    codebook: torch.Tensor              # fp32 (16,), index = code
    midpoints: torch.Tensor             # fp32 (15,), between consecutive sorted values
    order: torch.Tensor | None          # uint8 (16,): sorted position -> code; None if already sorted
    pair_table: torch.Tensor            # int64 (256,): byte -> (high nibble's value, low's) as 2 x fp32
    grid: CodeGrid


@lru_cache(maxsize=None)
def codebook_tables(quant_type: str, device: torch.device) -> CodebookTables:
    """The tables of `quant_type` on `device`, built once and shared: read them, do not write."""
    code = codebook(quant_type)
    # stable sort: FP4/INT4 hold zero twice (codes 0 and 8); the first (code 0) wins, as in bitsandbytes.
    values, order = torch.sort(code, stable=True)
    midpoints = (values[:-1] + values[1:]) / 2
    order = None if torch.equal(order, torch.arange(16)) else order.to(torch.uint8)
    byte = torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()  # (256, 2)
    pair_table = pairs.view(torch.int64).view(256)
    grid = _code_grid(quant_type, midpoints, order)
    put = lambda t: None if t is None else t.to(device)  # noqa: E731
    return CodebookTables(put(code), put(midpoints), put(order), put(pair_table), CodeGrid(*map(put, grid)))


def _code_grid(quant_type: str, midpoints: torch.Tensor, order: torch.Tensor | None) -> CodeGrid:
    # A scaled value's sorted code is the number of midpoints strictly below it (= bucketize, ties
    # to the lower code). Midpoints entirely below a cell (with a margin far above fp32 rounding
    # of the cell index) are counted in `below`; at most one midpoint can fall inside a widened
    # cell (the closest two are 0.0026 apart), and it is compared exactly, so the result equals
    # bucketize bit for bit.
    edges = torch.linspace(-1, 1, GRID_CELLS + 1, dtype=torch.float64)
    lower, upper = edges[:-1] - 1e-6, edges[1:] + 1e-6
    mids = midpoints.double()
    below = (mids[None, :] < lower[:, None]).sum(1)
    inside = (mids[None, :] >= lower[:, None]) & (mids[None, :] <= upper[:, None])
    if int(inside.sum(1).max()) > 1:
        raise AssertionError(f"{quant_type}: more than one midpoint per grid cell; raise GRID_CELLS")
    cell_mid = torch.where(inside.any(1), midpoints[inside.float().argmax(1)], torch.tensor(float("inf")))
    if order is None:
        return CodeGrid(below.to(torch.uint8), None, cell_mid.float())
    # fold the sorted -> code order in: one code at or below the cell's midpoint, one above
    return CodeGrid(order[below], order[(below + 1).clamp(max=15)], cell_mid.float())


def nearest_codes(scaled: torch.Tensor, grid: CodeGrid) -> torch.Tensor:
    """4-bit code (uint8) of each scaled value: nearest codebook entry, ties to the lower value.
    Equal to bucketize(scaled, midpoints) but ~15x faster: one cell lookup and one comparison."""
    cell = scaled.mul(GRID_CELLS / 2).add_(GRID_CELLS / 2).int().clamp_(0, GRID_CELLS - 1)
    above = scaled > torch.index_select(grid.cell_midpoint, 0, cell)
    if grid.high is None:  # sorted codebook (NF4): code = midpoints below the cell + the one inside
        return torch.index_select(grid.low, 0, cell).add_(above)
    return torch.where(above, torch.index_select(grid.high, 0, cell), torch.index_select(grid.low, 0, cell))
