"""bitsandbytes' CUDA quantization kernels, rounding for rounding, in PyTorch ops.

bitsandbytes' CPU path and its CUDA kernel (`kQuantizeBlockwise` in csrc) do not round alike, so
their bytes differ on some inputs. The quantizers (minilora/quant/nf4.py, blockwise.py) take
`kernel`, which rounding to reproduce (`resolve_kernel`): "auto" (what bitsandbytes runs on the
tensor's device), "cpu", "cuda" (this module), or "cuda-ieee". What the CUDA kernel does differently:

  * every block, the partial last one too, is scaled by x * (1/absmax); the reciprocal is
    computed once per block in fp32 (`reciprocal`): bitsandbytes builds with nvcc --use_fast_math,
    which emits the GPU's approximate rcp.approx.ftz.f32 ("cuda"); "cuda-ieee" is the same kernel
    with a correctly rounded reciprocal (a build without fast math), which is also what "cuda"
    computes on a CPU tensor, where the GPU instruction does not exist (equal for most absmax
    values, not all); an all-zero block gives 0 * inf = NaN;
  * 4-bit codes come from a decision tree of fp32 thresholds (`x > t` goes up, NaN goes to code
    0). NF4's thresholds are the midpoints; FP4's are short decimal literals, some of which are
    a few ulps off the midpoints, and FP4 codes |x| with the sign bit set for x < 0;
  * 8-bit codes (the double quantization of absmax) come from a 7-step binary search over the
    256-entry map followed by one midpoint test (`dQuantize<0>`), which is not always the nearest
    entry and breaks ties upward on one side.
"""
from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import torch

__all__ = ["KERNELS", "RECIPROCAL", "resolve_kernel", "fp32_from_decimal", "thresholds", "reciprocal", "scale_blocks",
           "codes_4bit", "codes_8bit"]

KERNELS = ("auto", "cpu", "cuda", "cuda-ieee")
# how each CUDA rounding computes 1/absmax (see `reciprocal`)
RECIPROCAL = {"cuda": "approx", "cuda-ieee": "ieee"}


def resolve_kernel(kernel, device: torch.device) -> str:
    """The rounding a call reproduces: "cpu", "cuda" or "cuda-ieee" ("auto": bitsandbytes' kernel
    on `device`; "cuda" on a CPU tensor: "cuda-ieee", the GPU's approximate reciprocal needs a GPU)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        return "cuda" if device.type == "cuda" else "cpu"
    return "cuda-ieee" if kernel == "cuda" and device.type != "cuda" else kernel


# dQuantizeNF4's thresholds, in code order of the values they separate, and dQuantizeFP4's on |x|:
# the decimal literals of csrc, which nvcc rounds straight to fp32. Four NF4 literals lie within
# 1e-17 of a tie between two fp32 values, where going through a double first rounds the other way,
# so they are kept as text and rounded exactly (fp32_from_decimal).
_NF4_THRESHOLDS = (
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011",
)
_FP4_THRESHOLDS = ("0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333", "0.8333333")
# the 3-bit FP4 code of each interval between those thresholds, smallest |x| first
_FP4_CODES = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)


def fp32_from_decimal(literal: str) -> float:
    """The fp32 value nearest to a decimal literal (ties to even), as a C compiler reads `literal`f."""
    exact = Fraction(literal)
    guess = torch.tensor(float(exact), dtype=torch.float32)
    candidates = (torch.nextafter(guess, torch.tensor(-math.inf)), guess, torch.nextafter(guess, torch.tensor(math.inf)))
    def distance(c):  # noqa: E306
        return abs(Fraction(c.item()) - exact), int(c.view(torch.int32)) & 1
    return min(candidates, key=distance).item()


@lru_cache(maxsize=None)
def _table(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if values and isinstance(values[0], str):
        values = tuple(fp32_from_decimal(v) for v in values)
    return torch.tensor(values, dtype=dtype).to(device)


def thresholds(quant_type: str, device=torch.device("cpu")) -> torch.Tensor:
    """The fp32 thresholds of the kernel's decision tree: NF4's on x, FP4's on |x| (shared: read only)."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes' CUDA kernel has no {quant_type!r} quantizer; it has nf4 and fp4")
    return _table(_NF4_THRESHOLDS if quant_type == "nf4" else _FP4_THRESHOLDS, torch.float32, torch.device(device))


def reciprocal(absmax: torch.Tensor, mode: str = "ieee") -> torch.Tensor:
    """1/absmax in fp32 as the kernel computes it. "ieee": correctly rounded (nvcc's default);
    "approx": the GPU's rcp.approx.ftz.f32, which --use_fast_math builds emit (CUDA and Triton only)."""
    if mode == "ieee":
        return 1.0 / absmax
    if mode != "approx":
        raise ValueError(f"reciprocal mode must be 'ieee' or 'approx', got {mode!r}")
    if absmax.device.type != "cuda":
        raise ValueError("reciprocal mode 'approx' is the GPU's rcp.approx instruction: it needs a CUDA tensor")
    try:
        from minilora.quant._rcp_triton import rcp_approx
    except ImportError as exc:  # CUDA builds of PyTorch ship Triton on Linux; elsewhere it may be missing
        _warn_once(f"Triton is not importable ({exc}); 1/absmax is correctly rounded instead of the GPU's "
                   "rcp.approx, so a few codes may differ from bitsandbytes' CUDA kernel")
        return 1.0 / absmax
    return rcp_approx(absmax.contiguous())


@lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    import warnings

    warnings.warn(message, RuntimeWarning, stacklevel=3)


def scale_blocks(flat: torch.Tensor, block_size: int, rcp_mode: str = "ieee"):
    """flat fp32 (n,) -> (x * (1/absmax) padded with zeros to whole blocks (blocks * block_size,),
    absmax (blocks,)); the partial last block is scaled like the others, its padding too."""
    n = flat.numel()
    pad = -n % block_size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)  # zeros do not move the max
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * reciprocal(absmax, rcp_mode).unsqueeze(1)).view(-1)
    return scaled, absmax


def codes_4bit(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """uint8 4-bit codes of scaled fp32 values, as dQuantizeNF4 / dQuantizeFP4 choose them."""
    nan = torch.isnan(scaled)
    if quant_type == "nf4":
        # the tree sends x up past every threshold it exceeds: the code is the count of those
        codes = torch.bucketize(scaled, thresholds("nf4", scaled.device))
        return codes.masked_fill_(nan, 0).to(torch.uint8)
    if quant_type == "fp4":
        count = torch.bucketize(scaled.abs(), thresholds("fp4", scaled.device))
        codes = torch.index_select(_table(_FP4_CODES, torch.uint8, scaled.device), 0, count.view(-1))
        codes = codes.view_as(count) | ((scaled < 0).to(torch.uint8) << 3)
        return codes.masked_fill_(nan, 0)
    raise ValueError(f"bitsandbytes' CUDA kernel has no {quant_type!r} quantizer; it has nf4 and fp4")


def codes_8bit(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """uint8 codes of scaled fp32 values against a sorted 256-entry map, as dQuantize<0> picks them:
    a binary search from entry 127 in steps 64, 32, ..., 1, then one midpoint test against the last
    entries passed on either side."""
    code = code.to(scaled.device, torch.float32)
    shape = scaled.shape
    x = scaled.reshape(-1)
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    upper_pivot = torch.full_like(pivot, 255)
    lower_pivot = torch.zeros_like(pivot)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    step = 64
    while step:
        up = x > val
        lower_pivot = torch.where(up, pivot, lower_pivot)
        lower = torch.where(up, val, lower)
        upper_pivot = torch.where(up, upper_pivot, pivot)
        upper = torch.where(up, upper, val)
        pivot = torch.where(up, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    above = x > val
    go_up = x > (upper + val) * 0.5
    go_down = x < (lower + val) * 0.5
    out = torch.where(above, torch.where(go_up, upper_pivot, pivot), torch.where(go_down, lower_pivot, pivot))
    return out.to(torch.uint8).view(shape)
