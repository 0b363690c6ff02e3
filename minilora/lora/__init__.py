"""LoRA: the adapter layer (layer.py, and experts.py for 3-D expert tensors), what a config adapts
(targets.py), model-level inject / merge / unload (model.py), peft's adapter file format (peft_io.py,
peft_experts.py) and adapter arithmetic (arithmetic.py)."""
