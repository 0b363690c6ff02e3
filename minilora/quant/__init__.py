"""Quantization: NF4 / FP4 blockwise codes bit-identical to bitsandbytes (nf4.py, bnb_cuda.py) and
the 4-bit linear layer QLoRA trains on (qlora.py)."""
