"""Optimizers: the paged CPU-offload AdamW, `CPUOffloadAdamW` (offload.py), and its pieces: pages.py
(paging), transfer.py (moving bytes), host_grad.py (`p.grad` on the host), update.py (the AdamW
update and its kernels), states.py (32- and 8-bit m and v), checkpoint.py (the state dict)."""
