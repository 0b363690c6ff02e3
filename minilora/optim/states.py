"""m and v of one segment: fp32 views of its page, or bitsandbytes-style blockwise 8-bit codes.

8-bit states (state_bits=8) follow bitsandbytes' blockwise 8-bit Adam: m is stored with the signed
dynamic map, v with the unsigned one, in blocks of 256 elements, each with an fp32 absmax; tensors
with fewer than 4096 elements keep 32-bit states. The update itself is the fp32 one, on dequantized
copies, which are quantized again after it.
"""
from __future__ import annotations

from torch import Tensor

from minilora.optim.pages import BLOCK_SIZE, Segment

__all__ = ["MomentStates"]


class MomentStates:
    """Reads and writes m ("exp_avg") and v ("exp_avg_sq") of a segment as fp32.

    `compiled_encoder` encodes whole 1M-element chunks of 8-bit states in one torch.compile'd loop
    (minilora/quant: the same codes as the eager encoder, about 3.5x faster)."""

    def __init__(self, eight_bit: bool, compiled_encoder: bool):
        self.compiled_encoder = compiled_encoder
        self.maps = {}
        if eight_bit:
            from minilora.quant.nf4 import dynamic_map   # the shared quantizer (bitsandbytes' maps)
            self.maps = {"exp_avg": dynamic_map(signed=True), "exp_avg_sq": dynamic_map(signed=False)}

    def read(self, seg: Segment, name: str) -> Tensor:
        """An fp32 view (32-bit: updating it updates the page) or a dequantized copy (8-bit)."""
        if not seg.param.quantized:
            return seg.view(name)
        from minilora.quant.nf4 import dequantize_blockwise_8bit
        return dequantize_blockwise_8bit(seg.view(name + "_code"), seg.view(name + "_absmax"),
                                         self.maps[name], BLOCK_SIZE)

    def write(self, seg: Segment, name: str, value: Tensor) -> None:
        if not seg.param.quantized:
            seg.view(name).copy_(value)
            return
        from minilora.quant.nf4 import quantize_blockwise_8bit
        codes, absmax = quantize_blockwise_8bit(value, self.maps[name], BLOCK_SIZE,
                                                backend="compiled" if self.compiled_encoder else "eager")
        seg.view(name + "_code").copy_(codes)
        seg.view(name + "_absmax").copy_(absmax)
