"""LoRA: the adapter layer (layer.py), model-level inject / merge / unload (model.py), peft's
adapter file format (peft_io.py) and adapter arithmetic (arithmetic.py)."""
