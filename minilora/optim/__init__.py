"""Optimizers: the paged CPU-offload AdamW (offload.py)."""
