"""NF4 / FP4 blockwise 4-bit quantization and the 8-bit "double quantization" of its scales.

The byte layout, rounding and codebooks are those of bitsandbytes (`bitsandbytes.functional`
`quantize_4bit` / `dequantize_4bit`, kernels in `backends/default/ops.py`), bit for bit:

    w (any shape, fp32/bf16/fp16)
      -> flatten, fp32, blocks of `block_size` (last block may be partial)
      -> absmax per block; scaled = clamp(x * (1/absmax), -1, 1)   (partial block: x / absmax)
      -> code = index of the nearest codebook value (ties -> lower value)
      -> two codes per byte, FIRST element in the HIGH nibble; odd length padded with 0.0
    double_quant: offset = mean(absmax); (absmax - offset) quantized in blocks of 256 with the
    signed 8-bit dynamic map -> uint8 absmax + fp32 absmax2 per 256 blocks + fp32 offset.

Dequantizing is `codebook[code] * absmax` in fp32, then a cast to the original dtype.

bitsandbytes' CUDA kernel rounds differently from its CPU path (see minilora/quant/bnb_cuda.py):
`kernel="auto"` gives the bytes bitsandbytes gives on the tensor's device; `kernel="cpu"` or
`"cuda"` asks for one kernel's rounding wherever the tensor is.

Storage per parameter: 4 + 32/64 = 4.5 bits (block 64), with double quantization
4 + 8/64 + 32/(64*256) = 4.127 bits plus a 4-byte offset.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from minilora.quant import bnb_cuda as _bnb_cuda

__all__ = [
    "nf4_codebook", "fp4_codebook", "int4_codebook", "dynamic_map",
    "QuantState4bit", "quantize_4bit", "dequantize_4bit",
    "quantize_blockwise_8bit", "dequantize_blockwise_8bit", "quantization_error",
]

QUANT_TYPES = ("nf4", "fp4", "int4")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements per chunk: quantize/dequantize touch at most a few chunk-sized fp32 temporaries, so
# memory stays bounded for a 128256 x 4096 embedding, and each chunk stays in cache.
_CHUNK = 1 << 20
KERNELS = ("auto", "cpu", "cuda")
# How bitsandbytes' CUDA kernel computes 1/absmax: "approx" (rcp.approx.ftz.f32, what nvcc's
# --use_fast_math emits; bitsandbytes builds with it) or "ieee" (correctly rounded).
CUDA_RECIPROCAL = "approx"
# Opt-in: dequantize CUDA tensors in one torch.compile'd kernel (bit-identical to the eager path,
# tested on an H100). Off by default: at 4096 x 4096 it did not pay on an H100 (0.29 ms both ways in
# fp32, 0.36 vs 0.29 ms in bf16: per-call overhead dominates, not bytes) and it compiles on first use.
FUSED_CUDA_DEQUANTIZE = False
# Opt-in: encode whole 1M-element chunks of 8-bit blocks on the CPU in one torch.compile'd loop (the
# same codes, 5x faster on 2 cores; compiles C++ on first use). CPUOffloadAdamW(state_bits=8) uses it.
FUSED_CPU_ENCODE_8BIT = False
# fused paths torch.compile could not build here; their eager twins (the same bits) serve from then on
_FUSED_BROKEN: set[str] = set()


def _kernel(kernel, device: torch.device) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return ("cuda" if device.type == "cuda" else "cpu") if kernel == "auto" else kernel


def _cuda_reciprocal(device: torch.device) -> str:
    # the approximate reciprocal is a GPU instruction: on a CPU tensor the correctly rounded one
    # stands in (equal for most absmax values, not all)
    return CUDA_RECIPROCAL if device.type == "cuda" else "ieee"


# ----------------------------------------------------------------------------------- codebooks

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


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map (fp32[256], sorted); signed=False is 8-bit Adam's map for v."""
    return torch.tensor(_dynamic_values(bool(signed)), dtype=torch.float32)


@lru_cache(maxsize=None)
def _dynamic_on(device: torch.device) -> torch.Tensor:
    return dynamic_map(True).to(device)  # cached, read-only: the double-quantization map


_GRID = 4096  # cells of the code-lookup grid over [-1, 1]


@lru_cache(maxsize=None)
def _tables(quant_type: str, device: torch.device):
    """(codebook in code order, midpoints of the sorted values, sorted->code order or None,
    byte -> (high value, low value) table as int64[256] so one gather fetches two fp32 values,
    grid tables (below_code uint8[_GRID], midpoint fp32[_GRID]) for _nearest_codes)."""
    code = {"nf4": nf4_codebook, "fp4": fp4_codebook, "int4": int4_codebook}[quant_type]()
    # stable sort: FP4/INT4 hold zero twice (codes 0 and 8); the first (code 0) wins, as in bitsandbytes.
    values, order = torch.sort(code, stable=True)
    midpoints = (values[:-1] + values[1:]) / 2
    order = None if torch.equal(order, torch.arange(16)) else order.to(torch.uint8)
    byte = torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()  # (256, 2)
    pair_table = pairs.view(torch.int64).view(256)
    # The grid: cell j covers [-1 + 2j/G, -1 + 2(j+1)/G]; a scaled value's sorted code is the number
    # of midpoints strictly below it (= bucketize, ties to the lower code). Midpoints entirely below
    # the cell (with a margin far above fp32 rounding of the cell index) are counted in below[j];
    # at most one midpoint can fall inside a widened cell (the closest two are 0.0026 apart), and
    # it is compared exactly, so the result equals bucketize bit for bit.
    edges = torch.linspace(-1, 1, _GRID + 1, dtype=torch.float64)
    lower, upper = edges[:-1] - 1e-6, edges[1:] + 1e-6
    mids = midpoints.double()
    below = (mids[None, :] < lower[:, None]).sum(1)
    inside = (mids[None, :] >= lower[:, None]) & (mids[None, :] <= upper[:, None])
    if int(inside.sum(1).max()) > 1:
        raise AssertionError(f"{quant_type}: more than one midpoint per grid cell; raise _GRID")
    cell_mid = torch.where(inside.any(1), midpoints[inside.float().argmax(1)], torch.tensor(float("inf")))
    grid = (below.to(torch.uint8), cell_mid.float())
    if order is not None:  # fold the sorted -> code order in: code if <= midpoint, code if above
        grid = (order[below], order[(below + 1).clamp(max=15)], cell_mid.float())
    put = lambda t: None if t is None else t.to(device)  # noqa: E731
    return put(code), put(midpoints), put(order), put(pair_table), tuple(put(t) for t in grid)


def _nearest_codes(scaled: torch.Tensor, grid) -> torch.Tensor:
    """4-bit code (uint8) of each scaled value: nearest codebook entry, ties to the lower value.
    Equal to bucketize(scaled, midpoints) but ~15x faster: one cell lookup and one comparison."""
    cell = scaled.mul(_GRID / 2).add_(_GRID / 2).int().clamp_(0, _GRID - 1)
    if len(grid) == 2:  # sorted codebook (NF4): code = midpoints below the cell + the one inside
        below, cell_mid = grid
        codes = torch.index_select(below, 0, cell)
        return codes.add_(scaled > torch.index_select(cell_mid, 0, cell))
    low, high, cell_mid = grid
    above = scaled > torch.index_select(cell_mid, 0, cell)
    return torch.where(above, torch.index_select(high, 0, cell), torch.index_select(low, 0, cell))


# ------------------------------------------------------------------------------------- chunking

def _chunk_elements(device: torch.device, block_size: int) -> int:
    """Elements per chunk, a whole number of blocks: big enough that each op's intra-op threads
    have work, small enough that temporaries stay bounded (and in cache on CPU)."""
    target = _CHUNK if device.type == "cpu" else max(_CHUNK, 1 << 24)
    return max(target // block_size, 1) * block_size


# -------------------------------------------------------------------------------------- checks

def _check_block_size(block_size, name: str = "block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not (
        32 <= block_size <= 4096 and block_size & (block_size - 1) == 0
    ):
        raise ValueError(f"{name} must be a power of two in 32..4096, got {block_size!r}")
    return block_size


def _check_input(x, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor ({what} has shape {tuple(x.shape)})")


def _check_finite(absmax: torch.Tensor, x: torch.Tensor, what: str) -> None:
    # max() propagates NaN and keeps Inf, so checking the per-block absmax checks every element.
    if not bool(torch.isfinite(absmax).all()):
        bad = "NaN" if bool(torch.isnan(x).any()) else "Inf"
        raise ValueError(f"{what} contains {bad} (shape {tuple(x.shape)}); only finite values can be quantized")


# ------------------------------------------------------------------------ blockwise core (fp32)

def _scale_blocks(flat: torch.Tensor, block_size: int):
    """flat fp32 (n,) -> (scaled in [-1, 1] (n,), absmax (ceil(n/block_size),)), as bitsandbytes:
    full blocks multiply by 1/absmax, the partial last block divides by its own absmax."""
    n = flat.numel()
    full = n - n % block_size
    blocks = flat[:full].view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    # bitsandbytes clamps to [-1, 1]; values beyond +-1 (by rounding) get the end codes either way,
    # since every midpoint lies inside (-1, 1), so the clamp is left out.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).view(-1)
    if full < n:
        last = flat[full:].abs().max().clamp(min=1e-38)  # stored clamped, as bitsandbytes does
        absmax = torch.cat([absmax, last.view(1)])
        scaled = torch.cat([scaled, flat[full:] / last])
    return scaled, absmax


# The 8-bit maps are dense near zero (the dynamic map spans 1e-7..1 in decades), so a uniform grid
# over [-1, 1] cannot separate their midpoints. A logarithmic grid can: the cell of a value is its
# fp32 bit pattern, made order-preserving, with the low mantissa bits dropped (sign, exponent and
# 10 mantissa bits: cells 2**-10 wide relative to the value, 2**19 of them).
_KEY_SHIFT = 13


def _ordered_cells(x: torch.Tensor) -> torch.Tensor:
    """int32 cell index of each fp32 value; x <= y implies cell(x) <= cell(y)."""
    bits = x.contiguous().view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip all but the sign bit
    return (key >> _KEY_SHIFT) + (1 << (31 - _KEY_SHIFT))


@lru_cache(maxsize=16)
def _code8_tables(values: tuple, device: torch.device):
    """(below int32[2**19], midpoints fp32[256] padded with +inf, depth) for a sorted 8-bit map.
    below[c] counts the midpoints in cells before c; the `depth` midpoints from there on are
    compared exactly, so codes equal bucketize(x, midpoints) bit for bit."""
    code = torch.tensor(values, dtype=torch.float32)
    midpoints = (code[:-1] + code[1:]) / 2
    mid_cells = _ordered_cells(midpoints).long()
    cells = torch.arange(1 << (32 - _KEY_SHIFT), dtype=torch.int64)
    below = torch.searchsorted(mid_cells, cells).to(torch.int32)
    depth = int(torch.bincount(mid_cells).max())
    padded = torch.cat([midpoints, torch.full((depth,), float("inf"))])
    return below.to(device), padded.to(device), depth


def _nearest_codes_8bit(scaled: torch.Tensor, tables) -> torch.Tensor:
    """uint8 code of each scaled fp32 value: nearest map entry, ties to the lower one (= bucketize)."""
    below, padded, depth = tables
    idx = torch.index_select(below, 0, _ordered_cells(scaled).view(-1))
    codes = idx.clone()
    for j in range(depth):
        codes += scaled > torch.index_select(padded, 0, idx + j if j else idx)
    return codes.to(torch.uint8)


@torch.no_grad()
def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor | None = None, block_size: int = 256,
                            kernel: str = "auto", fused: bool | None = None):
    """Blockwise 8-bit quantization with exact nearest-value rounding (ties -> lower value).

    Returns (codes uint8 (n,), absmax fp32 (ceil(n/block_size),)). `code` is a sorted fp32[256]
    map, default `dynamic_map(signed=True)`. This is bitsandbytes' pure-PyTorch kernel; its native
    CPU kernel picks the second-nearest code for ~0.2% of values. With kernel "cuda" (the default on
    CUDA tensors) codes are those of bitsandbytes' CUDA kernel: its binary search instead.
    fused (CPU; None: FUSED_CPU_ENCODE_8BIT): encode whole 1M-element chunks in one torch.compile'd
    loop, the same codes.
    """
    _check_input(x, "x")
    _check_block_size(block_size)
    kernel = _kernel(kernel, x.device)
    code = dynamic_map(True).to(x.device) if code is None else code.to(x.device, torch.float32)
    if code.numel() != 256:
        raise ValueError(f"code must have 256 entries, got {code.numel()}")
    if not bool((code[1:] > code[:-1]).all()):
        raise ValueError("code must be sorted in increasing order with distinct values")
    # the CPU path's lookup tables (2 MiB, cached per device); the CUDA kernel's search needs none
    tables = _code8_tables(tuple(code.tolist()), x.device) if kernel == "cpu" else None
    flat = x.reshape(-1)
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=x.device)
    step = max(_CHUNK // block_size, 1) * block_size
    for start in range(0, n, step):
        chunk = flat[start:start + step].float()
        if kernel == "cuda":
            scaled, chunk_absmax = _bnb_cuda.scale_blocks(chunk, block_size, _cuda_reciprocal(x.device))
            _check_finite(chunk_absmax, x, "x")
            codes[start:start + chunk.numel()] = _bnb_cuda.codes_8bit(scaled[:chunk.numel()], code)
            absmax[start // block_size:start // block_size + chunk_absmax.numel()] = chunk_absmax
            continue
        use_fused = FUSED_CPU_ENCODE_8BIT if fused is None else fused
        if use_fused and chunk.numel() == step and x.device.type == "cpu":
            fused = _fused_or_none("8-bit encoder", _encode_8bit_fused, chunk.view(-1, block_size), tables)
            if fused is not None:
                codes[start:start + step], absmax[start // block_size:(start + step) // block_size] = fused
                _check_finite(fused[1], x, "x")
                continue
        scaled, chunk_absmax = _scale_blocks(chunk, block_size)
        _check_finite(chunk_absmax, x, "x")
        codes[start:start + chunk.numel()] = _nearest_codes_8bit(scaled, tables)
        absmax[start // block_size:start // block_size + chunk_absmax.numel()] = chunk_absmax
    return codes, absmax


@torch.no_grad()
def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None,
                              block_size: int = 256, shape=None, dtype: torch.dtype = torch.float32):
    """Inverse of quantize_blockwise_8bit: code[codes] * absmax per block, fp32, then `dtype`."""
    _check_block_size(block_size)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    n = codes.numel()
    if absmax.numel() != -(-n // block_size):
        raise ValueError(f"absmax has {absmax.numel()} entries, expected ceil({n}/{block_size}) = {-(-n // block_size)}")
    code = _dynamic_on(codes.device) if code is None else code.to(codes.device, torch.float32)
    out = torch.index_select(code, 0, codes.reshape(-1).int())  # (n,) fp32, scaled in place below
    full = n - n % block_size
    out[:full].view(-1, block_size).mul_(absmax[:full // block_size].unsqueeze(1))
    if full < n:
        out[full:].mul_(absmax[-1])
    return out.to(dtype).view(shape if shape is not None else (n,))


# ---------------------------------------------------------------------------------- 4-bit state

@dataclass
class QuantState4bit:
    """A 4-bit quantized tensor, laid out as bitsandbytes' Params4bit + QuantState.

    packed:   uint8 ((n + 1) // 2, 1), two codes per byte, first element in the high nibble
    absmax:   fp32 (blocks,), or uint8 (blocks,) codes of absmax - offset when double quantized
    absmax2:  fp32 (ceil(blocks / dq_block_size),) scales of the 8-bit absmax codes, or None
    offset:   fp32 scalar tensor, mean of the absmax, or None
    shape, dtype: the original tensor's; block_size, quant_type ("nf4" | "fp4" | "int4").
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    block_size: int = 64
    quant_type: str = "nf4"
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    dq_block_size: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def codebook(self) -> torch.Tensor:
        return _tables(self.quant_type, self.packed.device)[0].clone()

    @property
    def nbytes(self) -> int:
        """Bytes of this tensor's own data: codes, scales and (double quant) absmax2 + offset.
        The codebooks are shared constants and not counted."""
        total = self.packed.numel() * self.packed.element_size() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            total += self.absmax2.numel() * 4 + 4
        return total

    def scales(self) -> torch.Tensor:
        """fp32 absmax per block (the double-quantized ones decoded exactly as bitsandbytes does)."""
        if not self.double_quant:
            return self.absmax.float()
        absmax = dequantize_blockwise_8bit(self.absmax, self.absmax2, None, self.dq_block_size)
        return absmax.add_(self.offset)  # a separate fp32 add, as bitsandbytes' `absmax += offset`

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_4bit(self, dtype)

    def to(self, device) -> "QuantState4bit":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantState4bit(move(self.packed), move(self.absmax), self.shape, self.dtype, self.block_size,
                              self.quant_type, move(self.absmax2), move(self.offset), self.dq_block_size)


@torch.no_grad()
def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = True,
                  dq_block_size: int = 256, kernel: str = "auto") -> QuantState4bit:
    """Blockwise 4-bit quantization, byte-identical to bitsandbytes.functional.quantize_4bit
    (compress_statistics=double_quant) on the same device. Works on any shape, contiguous or not,
    in chunks. `kernel`: "auto" (the rounding bitsandbytes uses on w's device), "cpu" or "cuda"."""
    _check_input(w, "w")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    _check_block_size(block_size)
    _check_block_size(dq_block_size, "dq_block_size")
    kernel = _kernel(kernel, w.device)
    if kernel == "cuda" and quant_type == "int4":
        raise ValueError("bitsandbytes' CUDA kernel has no int4 quantizer; use kernel='cpu' for int4")
    grid = _tables(quant_type, w.device)[4]
    flat = w.reshape(-1)  # a view when contiguous; one copy in w's dtype when not
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=w.device)
    step = _chunk_elements(w.device, block_size)
    for start in range(0, n, step):
        chunk = flat[start:start + step].float()
        if kernel == "cuda":  # scaled is padded to whole blocks, as the kernel loads them
            scaled, chunk_absmax = _bnb_cuda.scale_blocks(chunk, block_size, _cuda_reciprocal(w.device))
            _check_finite(chunk_absmax, w, "w")
            codes = _bnb_cuda.codes_4bit(scaled[:chunk.numel() + chunk.numel() % 2], quant_type)
        else:
            scaled, chunk_absmax = _scale_blocks(chunk, block_size)
            _check_finite(chunk_absmax, w, "w")
            if scaled.numel() % 2:
                scaled = torch.nn.functional.pad(scaled, (0, 1))
            codes = _nearest_codes(scaled, grid)  # (m,) uint8
        # pairs as little-endian int16: low byte = first element -> high nibble
        pairs = codes.view(torch.int16)
        packed[start // 2:start // 2 + pairs.numel()] = ((pairs & 15) << 4) | (pairs >> 8)
        absmax[start // block_size:start // block_size + chunk_absmax.numel()] = chunk_absmax
    state = QuantState4bit(packed.view(-1, 1), absmax, torch.Size(w.shape), w.dtype, block_size, quant_type,
                           dq_block_size=dq_block_size)
    if double_quant:
        offset = absmax.mean()
        state.absmax, state.absmax2 = quantize_blockwise_8bit(absmax - offset, dynamic_map(True), dq_block_size,
                                                              kernel)
        state.offset = offset
    return state


def _fused_or_none(what: str, run, *args):
    """run(*args), a torch.compile'd path, or None if it cannot be built here (no compiler, no Triton,
    an unsupported device): then one warning, and the caller's eager path, which gives the same bits,
    serves from then on."""
    if what in _FUSED_BROKEN:
        return None
    try:
        return run(*args)
    except Exception as exc:
        import warnings

        _FUSED_BROKEN.add(what)
        warnings.warn(f"fused {what} unavailable ({type(exc).__name__}: {exc}); using the eager path",
                      RuntimeWarning, stacklevel=3)
        return None


def _encode_8bit_fused(blocks, tables):
    from minilora.quant._encode8_fused import encode_fused

    below, padded, depth = tables
    return encode_fused(blocks, below, padded, depth, _KEY_SHIFT)


def _dequantize_fused(packed, scales, codebook, block_size, dtype):
    from minilora.quant._dequant_fused import dequantize_fused

    return dequantize_fused(packed, scales, codebook, block_size, dtype)


@torch.no_grad()
def dequantize_4bit(state: QuantState4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """codebook[code] * absmax in fp32, cast to `dtype` (default: the original dtype), original shape.

    A byte -> (high, low) table of int64 gathers two fp32 values at once: one gather and one
    multiply per chunk."""
    if not isinstance(state, QuantState4bit):
        raise TypeError(f"state must be a QuantState4bit, got {type(state).__name__}")
    dtype = state.dtype if dtype is None else dtype
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    n, bs = state.numel, state.block_size
    packed = state.packed.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes, shape {tuple(state.shape)} needs {(n + 1) // 2}")
    absmax = state.scales()
    if packed.is_cuda and FUSED_CUDA_DEQUANTIZE and n % bs == 0:
        fused = _fused_or_none("CUDA dequantize", _dequantize_fused, packed, absmax,
                               _tables(state.quant_type, packed.device)[0], bs, dtype)
        if fused is not None:
            return fused.view(state.shape)
    pair_table = _tables(state.quant_type, packed.device)[3]
    out = torch.empty(n, dtype=dtype, device=packed.device)
    full = n - n % bs
    step = _chunk_elements(packed.device, bs)

    # gather pairs into a cache-sized scratch, then one multiply writes (and first touches) the
    # output, in fp32 and rounded once to a 16-bit dtype: both passes run on all threads
    scratch = torch.empty(min(step, full) // 2, dtype=torch.int64, device=packed.device)
    for start in range(0, full, step):
        stop = min(start + step, full)
        pairs = torch.index_select(pair_table, 0, packed[start // 2:stop // 2].int(),
                                   out=scratch[:(stop - start) // 2])
        torch.mul(pairs.view(torch.float32).view(-1, bs), absmax[start // bs:stop // bs].unsqueeze(1),
                  out=out[start:stop].view(-1, bs))
    if full < n:
        tail = pair_table[packed[full // 2:].long()].view(torch.float32)[:n - full]
        out[full:] = tail * absmax[-1]
    return out.view(state.shape)


# ---------------------------------------------------------------------------------- error table

def quantization_error(w: torch.Tensor, quant_types=("nf4", "fp4", "int4"), block_sizes=(32, 64, 128, 256),
                       double_quant: bool = False) -> list[dict]:
    """One row per (quant_type, block_size): mse, max_abs, mean_abs error and the correlation
    between w and its round trip, plus bits per parameter. All in fp64 over fp32 values."""
    rows = []
    ref = w.detach().float().reshape(-1)
    for quant_type in quant_types:
        for block_size in block_sizes:
            state = quantize_4bit(w.detach(), quant_type, block_size, double_quant)
            err = state.dequantize(torch.float32).reshape(-1).double() - ref.double()
            approx = ref.double() + err
            corr = torch.corrcoef(torch.stack([ref.double(), approx]))[0, 1]
            rows.append({
                "quant_type": quant_type, "block_size": block_size,
                "mse": err.square().mean().item(), "max_abs": err.abs().max().item(),
                "mean_abs": err.abs().mean().item(), "correlation": corr.item(),
                "bits_per_param": 8 * state.nbytes / state.numel,
            })
    return rows
