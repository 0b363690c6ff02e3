"""Llama-3.1-8B's shape on a real GPU at the calculator's longest sequence (issue 16's GPU goal).

    .venv/bin/python -m bench.long_context_gpu [--gib 24] [--throughput-seq N] [--quick]
    .venv/bin/python -m bench.long_context_gpu --dry-run     # CPU, a tiny Llama, the same code

The README table's setting: Llama-3.1-8B's shape (calculators' preset), random weights built in
bf16 on the device and quantized to NF4 there (minilora.train's QLoRA path), LoRA r=16 on every
linear layer, batch 1, full gradient checkpointing, AdamW, bf16 autocast. With --gib G (default:
the device's memory), the caching allocator is capped at G GiB less the calculator's 500 MiB for
the CUDA context (torch.cuda.set_per_process_memory_fraction), as on a G GiB card. Then:
  1. the calculator's longest sequence on G GiB for none, chunked loss, offload, both, and both with
     the tiled MLP (tiles of MLP_TILE tokens);
  2. two training steps of "both" and of "both + tiled MLP", each at its longest:
     torch.cuda.max_memory_allocated during the second beside the calculator's peak (goal: within
     5%), and the host's pinned bytes beside its CPU column;
  3. tokens/s of each combination at one length all of them fit (the longest "none" fits, at most
     8,192, or --throughput-seq; --quick: 2,048; the MLP in tiles of a quarter of it, at most
     MLP_TILE), two timed steps after a warm-up each.
Writes bench/results/long_context_gpu-<machine>.json. --dry-run runs every step on the CPU with a
tiny Llama and a 1 GiB "GPU" (no measurement: torch counts no CPU allocations) and writes nothing,
so CI runs the code.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from bench._harness import report

PRESET = "llama-3.1-8b"
TINY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
# (loss, activation offload, tiled MLP)
COMBOS = {"none": ("full", False, False), "chunked loss": ("chunked", False, False), "offload": ("full", True, False),
          "both": ("chunked", True, False), "both + tiled MLP": ("chunked", True, True)}
PEAKS = ("both", "both + tiled MLP")   # measured at their longest
# Tokens per MLP tile: Arctic's TiledMLP default is the hidden size (4,096 for the 8B); the
# calculator puts one tile's intermediates at 0.44 GiB there, against 9.9 GiB for the whole MLP
# at 57,349 tokens. The dry run's tiny Llama tiles by 16.
MLP_TILE = 4096
LORA = dict(lora_r=16, lora_alpha=32, lora_targets="all-linear")


def setup_for(combo: str, seq: int, tile: int = MLP_TILE):
    from calculators import LoRASpec, TrainingSetup

    loss, offload, tiled = COMBOS[combo]
    return TrainingSetup(method="qlora", batch=1, seq=seq, grad_ckpt="full", loss=loss, stack="minilora",
                         offload_activations=offload, mlp_tile=min(tile, seq) if tiled else 0,
                         lora=LoRASpec(rank=16, alpha=32, targets="all-linear"))


def build(config: dict, device: torch.device):
    """The QLoRA model and its optimizer, as minilora.train builds them, on `device`."""
    from minilora.train import TrainConfig, build_model, make_optimizer
    from reference_models import from_hf_config

    cfg = TrainConfig(data="(bench)", method="qlora", grad_checkpointing=True, lr=1e-4, **LORA)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: the 8B never passes through fp32
    try:
        with torch.device(device):
            model = from_hf_config(config)
    finally:
        torch.set_default_dtype(previous)
    model, _ = build_model(cfg, model, device)
    optimizer = make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], device)
    return cfg, model, optimizer


def step(cfg, model, optimizer, seq: int, device: torch.device) -> int:
    """One training step on random ids; returns the host bytes the activation offload held between
    forward and backward (0 without it)."""
    from minilora.train import autocast

    ids = torch.randint(0, model.config.vocab_size, (1, seq + 1), device=device)
    with autocast(cfg, device):
        loss = model(ids[:, :-1], ids[:, 1:])[1]
    offload = model.activation_offload
    host = offload.host_bytes() if offload is not None else 0
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return host


def switch(model, combo: str, device: torch.device, tile: int) -> None:
    from minilora.train import ActivationOffload

    loss, offload, tiled = COMBOS[combo]
    model.set_loss(loss)
    model.set_gradient_checkpointing(True, offload=ActivationOffload(device) if offload else None)
    model.set_mlp_tiling(tile if tiled else None)


def peak_at_longest(cfg, model, optimizer, spec, combo: str, seq: int, tile: int, device: torch.device) -> dict:
    """Two steps of `combo` at `seq`: the second's peak and host bytes beside the calculator's."""
    from calculators import training_memory

    tile = min(tile, seq)
    switch(model, combo, device, tile)
    cuda = device.type == "cuda"
    step(cfg, model, optimizer, seq, device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    host = step(cfg, model, optimizer, seq, device)
    predicted = training_memory(spec, setup_for(combo, seq, tile))
    measured = torch.cuda.max_memory_allocated() if cuda else None
    # what the pinned allocator holds (its blocks rounded up to powers of two, cached between steps)
    pinned = torch.cuda.memory.host_memory_stats().get("allocated_bytes.current") if cuda else None
    return {"combo": combo, "seq": seq, "mlp_tile": tile if COMBOS[combo][2] else None,
            "predicted_peak_gib": predicted.peak / 2 ** 30,
            "measured_peak_gib": measured / 2 ** 30 if measured is not None else None,
            "predicted / measured": predicted.peak / measured if measured else None,
            "predicted_host_gib": predicted.cpu / 2 ** 30, "host_tensors_gib": host / 2 ** 30,
            "pinned_allocated_gib": pinned / 2 ** 30 if pinned is not None else None}


def throughput(cfg, model, optimizer, seq: int, tile: int, device: torch.device) -> list[dict]:
    rows = []
    for combo in COMBOS:
        switch(model, combo, device, tile)
        step(cfg, model, optimizer, seq, device)  # warm-up
        times = []
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(cfg, model, optimizer, seq, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows.append({"combo": combo, "seq": seq, "mlp_tile": tile if COMBOS[combo][2] else None,
                     "tokens_per_s": seq / min(times)})
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs none"] = row["tokens_per_s"] / base
    return rows


def run_gpu(dry_run: bool = False, gib: float | None = None, throughput_seq: int | None = None) -> dict | None:
    """The run (module docstring); returns its rows and settings (None without a CUDA device)."""
    from calculators import largest_fitting, load_config, model_spec

    if not dry_run and not torch.cuda.is_available():
        print("bench.long_context --gpu needs a CUDA device (torch.cuda.is_available() is False); "
              "--dry-run runs its code on the CPU")
        return None
    device = torch.device("cpu" if dry_run else "cuda")
    config = dict(TINY) if dry_run else load_config(PRESET)
    spec = model_spec(config)
    if dry_run:
        gib = 1.0
    elif gib is None:
        gib = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    tile = 16 if dry_run else MLP_TILE
    longest = {combo: largest_fitting(spec, setup_for(combo, 1, tile), int(gib * 2 ** 30), "seq") for combo in COMBOS}
    print(f"longest sequence on {gib:.1f} GiB:", longest)
    cfg, model, optimizer = build(config, device)
    if not dry_run:
        from calculators.terms import CUDA_CONTEXT

        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (gib * 2 ** 30 - CUDA_CONTEXT) / total), device)
    rows = [peak_at_longest(cfg, model, optimizer, spec, combo, min(longest[combo], 64) if dry_run else longest[combo],
                            tile, device) for combo in PEAKS]
    common = throughput_seq or min(longest["none"], 64 if dry_run else 8192)
    rows += throughput(cfg, model, optimizer, common, min(tile, max(common // 4, 1)), device)
    extra = {"model": PRESET if not dry_run else TINY, "gib": gib, "longest": longest, "mlp_tile": tile}
    if dry_run:
        print(rows, "\n(dry run: nothing measured, nothing written)")
    else:
        report("long_context_gpu", rows, extra=extra)
    return {"rows": rows, **extra}


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="a tiny Llama on the CPU through the same code")
    p.add_argument("--gib", type=float, default=None, help="the memory to fit in (default: the device's)")
    p.add_argument("--throughput-seq", type=int, default=None,
                   help="the length of the tokens/s comparison (default: the longest 'none' fits, at most 8192)")
    p.add_argument("--quick", action="store_true", help="the tokens/s comparison at 2,048 tokens")
    args = p.parse_args(argv)
    if not args.dry_run:  # fewer fragmentation failures at the cap; read once, when CUDA starts
        os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    return run_gpu(args.dry_run, args.gib, args.throughput_seq or (2048 if args.quick and not args.dry_run else None))


if __name__ == "__main__":
    main()
