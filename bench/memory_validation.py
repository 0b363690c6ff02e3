"""GPU memory validation: the calculator's prediction beside torch.cuda.max_memory_allocated.

    .venv/bin/python -m bench.memory_validation            # CUDA: a ~1.1B Llama (random weights)
    .venv/bin/python -m bench.memory_validation --quick    # CUDA: a ~0.2B Llama, shorter sequences
    .venv/bin/python -m bench.memory_validation --dry-run  # CPU: a tiny Llama through the same code
    .venv/bin/python -m bench.memory_validation --stack hf # one stack only (default: both)

For every point (stack) x (method full | lora | qlora) x (gradient checkpointing off | on) x (two
sequence lengths) it builds the model as that stack's users do, takes two real training steps, and
reports the peak of the second step (optimizer states exist by then: the steady state) beside the
calculator's total for the same setup (`--stack` of the calculator). Goal (issues 8 and 13):
within 5% on every point.

minilora: exactly as `minilora.train` does (train.build_model: freezing, quantizing,
prepare_for_kbit_training, injecting adapters; train's optimizer and bf16 autocast). The weights
are bf16, as a bf16 checkpoint loads: full fine-tuning trains in bf16 with bf16 AdamW states, LoRA
keeps its adapters in the base dtype, QLoRA has a 4-bit base with bf16 compute.
hf: transformers + peft + bitsandbytes with their defaults: AutoModelForCausalLM in bf16 (from a
folder saved here, with BitsAndBytesConfig(load_in_4bit=True, nf4, double quantization, bf16
compute) for QLoRA, then prepare_model_for_kbit_training), gradient_checkpointing_enable(),
get_peft_model(LoraConfig) (fp32 adapters), transformers' loss from labels=, fused torch AdamW
(the Trainer's default); no autocast. Batch 1; random token ids.

Without CUDA it prints why and exits 0; --dry-run runs every point on the CPU with a tiny model
(no measurement: CPU allocations are not counted by torch) so the whole path is exercised.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from bench._harness import report

MODEL_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4)  # TinyLlama-1.1B's shapes: 1.10B parameters
MODEL_QUICK = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=4)
MODEL_TINY = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
METHODS = ("full", "lora", "qlora")
STACKS = ("minilora", "hf")
# bf16 weights for every method, as a bf16 checkpoint loads: full fine-tuning then keeps bf16 AdamW
# states (torch.optim.AdamW allocates them like the parameter; no fp32 master copy).
WEIGHT_DTYPE = {"full": torch.bfloat16, "lora": torch.bfloat16, "qlora": torch.bfloat16}
DTYPE_NAME = {torch.bfloat16: "bf16", torch.float32: "fp32"}
LORA = dict(lora_r=16, lora_alpha=32, lora_targets="all-linear")


def build_point(model_kw: dict, method: str, grad_ckpt: bool, device: torch.device):
    """The model and optimizer as minilora.train builds them for `method`."""
    from minilora.train import TrainConfig, build_model, make_optimizer
    from reference_models import Llama, LlamaConfig

    cfg = TrainConfig(data="(random ids)", method=method, grad_checkpointing=grad_ckpt, lr=1e-4, **LORA,
                        precision="auto" if device.type == "cuda" else "fp32")
    torch.manual_seed(0)
    with torch.device(device):  # built in place: a 1B model never passes through host memory
        model = Llama(LlamaConfig(**model_kw, max_position_embeddings=8192)).to(WEIGHT_DTYPE[method])
    model, _ = build_model(cfg, model, device)
    model.set_gradient_checkpointing(grad_ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, device)
    return cfg, model, optimizer


def train_step(cfg, model, optimizer, ids: torch.Tensor) -> float:
    from minilora.train import autocast

    with autocast(cfg, ids.device):
        _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def build_hf_point(model_kw: dict, method: str, grad_ckpt: bool, device: torch.device):
    """The model and optimizer as transformers + peft (+ bitsandbytes) users build them for `method`."""
    import tempfile

    import peft
    import transformers as tf

    config = tf.LlamaConfig(**model_kw, max_position_embeddings=8192)
    torch.manual_seed(0)
    if method == "qlora":
        with tempfile.TemporaryDirectory() as folder:
            with torch.device(device):
                tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
            gc.collect()
            q = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
            model = tf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.bfloat16,
                                                            device_map=device.type)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt)
    else:
        with torch.device(device):  # built in place: a 1B model never passes through host memory
            model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        if grad_ckpt:
            model.gradient_checkpointing_enable()
    if method != "full":
        lora = peft.LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], target_modules=LORA["lora_targets"],
                               task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda" or None)


def hf_train_step(model, optimizer, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure(model_kw: dict, method: str, grad_ckpt: bool, seq: int, batch: int, device: torch.device,
            stack: str = "minilora") -> dict:
    """Two steps; the peak bytes allocated during the second (None on CPU)."""
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
    if stack == "hf":
        model, optimizer = build_hf_point(model_kw, method, grad_ckpt, device)
        step = lambda ids: hf_train_step(model, optimizer, ids)  # noqa: E731
    else:
        cfg, model, optimizer = build_point(model_kw, method, grad_ckpt, device)
        step = lambda ids: train_step(cfg, model, optimizer, ids)  # noqa: E731
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model_kw["vocab_size"], (batch, seq + (stack != "hf")), generator=g).to(device)
    step(ids)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resting = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    loss = step(ids)
    if cuda:
        torch.cuda.synchronize()
    out = {"step_s": time.perf_counter() - t0, "loss": loss,
           "measured": torch.cuda.max_memory_allocated() if cuda else None,
           "resting": resting if cuda else None,
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    del model, optimizer, step
    return out


def predict(model_kw: dict, method: str, grad_ckpt: bool, seq: int, batch: int, device: str,
            stack: str = "minilora") -> dict:
    """The calculators' terms for this point, in bytes; "total" is their peak (CUDA context excluded,
    as torch.cuda.max_memory_allocated excludes it)."""
    from calculators.lora import LoRASpec, parse_targets
    from calculators.memory import TrainingSetup, training_memory
    from calculators.models import model_spec
    from reference_models import LlamaConfig

    spec = model_spec(LlamaConfig(**model_kw).to_hf_dict(), name="validation")
    lora = LoRASpec(rank=LORA["lora_r"], alpha=LORA["lora_alpha"], targets=parse_targets(LORA["lora_targets"]))
    minilora = stack == "minilora"
    # loss: the full one, which build()'s model keeps (set_loss's default; minilora.train's is chunked)
    setup = TrainingSetup(method=method, batch=batch, seq=seq, grad_ckpt="full" if grad_ckpt else "none",
                          dtype=DTYPE_NAME[WEIGHT_DTYPE[method]], master_weights=False if minilora else None,
                          optimizer="adamw", lora=lora, device=device, stack=stack, loss="full",
                          autocast="bf16" if minilora and device == "cuda" else "none")  # minilora.train's autocast
    breakdown = training_memory(spec, setup)
    return {**{t.name: t.gpu for t in breakdown.terms if t.name != "CUDA context"},
            "total": breakdown.peak}


def run(model_kw: dict, seqs: tuple, batch: int, device: torch.device, methods=METHODS, stacks=STACKS) -> list[dict]:
    rows = []
    for stack in stacks:
        for method in methods:
            for grad_ckpt in (False, True):
                for seq in seqs:
                    rows.append(_point(model_kw, stack, method, grad_ckpt, seq, batch, device))
    return rows


def _point(model_kw: dict, stack: str, method: str, grad_ckpt: bool, seq: int, batch: int, device) -> dict:
    row = {"stack": stack, "method": method, "grad_ckpt": grad_ckpt, "seq": seq, "batch": batch}
    try:
        got = measure(model_kw, method, grad_ckpt, seq, batch, device, stack)
    except ImportError as exc:  # a method whose module is not in this checkout yet
        return {**row, "status": f"skipped: {exc}"}
    pred = predict(model_kw, method, grad_ckpt, seq, batch, device.type, stack)
    measured = got["measured"]
    row.update(trainable=got["trainable"], loss=round(got["loss"], 4), step_s=got["step_s"],
               measured_MiB=measured / 2**20 if measured is not None else None,
               predicted_MiB=pred["total"] / 2**20, status="ok")
    if measured is not None:
        row["ratio"] = pred["total"] / measured
        row["within_5pct"] = abs(row["ratio"] - 1) <= 0.05
    row["terms_MiB"] = {k: round(v / 2**20, 2) for k, v in pred.items() if k != "total"}
    print({k: v for k, v in row.items() if k != "terms_MiB"}, flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory_validation", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a ~0.2B model at sequence lengths 256 and 1024")
    p.add_argument("--dry-run", action="store_true", help="CPU: a tiny model through the same code, no measurement")
    p.add_argument("--seqs", type=int, nargs=2, default=None, help="the two sequence lengths (default 512 2048)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--stack", nargs="+", choices=STACKS, default=list(STACKS), help="default: both")
    args = p.parse_args(argv)
    if args.dry_run:
        rows = run(MODEL_TINY, tuple(args.seqs or (16, 32)), args.batch, torch.device("cpu"), args.methods, args.stack)
        ok = all(r["status"].startswith(("ok", "skipped")) for r in rows)
        print(f"dry run: {len(rows)} points through the CUDA code path on the CPU (nothing measured, nothing written)")
        return 0 if ok else 1
    if not torch.cuda.is_available():
        print("bench.memory_validation needs CUDA (it measures torch.cuda.max_memory_allocated); "
              "torch.cuda.is_available() is False. Use --dry-run to exercise the code on the CPU.")
        return 0
    model_kw = MODEL_QUICK if args.quick else MODEL_1B
    seqs = tuple(args.seqs or ((256, 1024) if args.quick else (512, 2048)))
    rows = run(model_kw, seqs, args.batch, torch.device("cuda"), args.methods, args.stack)
    from reference_models import Llama, LlamaConfig

    with torch.device("meta"):
        n_params = sum(p.numel() for p in Llama(LlamaConfig(**model_kw)).parameters())
    judged = [r for r in rows if "within_5pct" in r]
    report("memory_validation" + ("-quick" if args.quick else ""), rows, extra={
        "model": {**model_kw, "parameters": n_params}, "weights_dtype": {k: str(v) for k, v in WEIGHT_DTYPE.items()},
        "lora": LORA, "goal": "calculator within 5% of measured peak on every point",
        "goal_met": bool(judged) and len(judged) == len(rows) and all(r["within_5pct"] for r in judged),
        "worst_ratio": max((r["ratio"] for r in judged), key=lambda x: abs(x - 1), default=None)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
