"""Quantization: NF4 / FP4 blockwise codes bit-identical to bitsandbytes (nf4.py, with codebooks.py,
blockwise.py for the 8-bit codes, bnb_cuda.py for the CUDA kernel's rounding, backends.py for how a
call runs), the 4-bit linear layer and experts QLoRA trains on (qlora.py) and bitsandbytes' 4-bit checkpoint
format (bnb_format.py), which qlora.py registers with reference_models on import."""
