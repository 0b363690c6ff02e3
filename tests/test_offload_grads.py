"""p.grad under CPUOffloadAdamW: the standard torch idioms give torch AdamW's result, or raise.

torch.nn.utils.clip_grad_norm_ between backward and step, GradScaler's unscale_, gradient
accumulation, zero_grad(set_to_none=False), reading p.grad, and transformers.Trainer with
max_grad_norm. Each runs on three paths: fp32 parameters in host memory (p.grad is a view of the
host pages), bf16 parameters (p.grad is a HostGrad), and the CUDA path's logic with host tensors
standing in for the GPU (ThroughStaging: p.grad is a HostGrad, every copy goes through staging).
"""
import pytest
import torch

from minilora.optim.host_grad import HostGrad
from minilora.optim.offload import CPUOffloadAdamW
from test_offload import batch, equal_params, in_pages, loss_fn, mlp, offload, torch_adamw

STEPS = 12


def idiom_step(model, opt, sched, step, clip=0.5):
    """The loop as people write it (and as transformers.Trainer runs it)."""
    x, y = batch(step, 0)
    loss_fn(model, x, y).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step(), sched.step(), opt.zero_grad()
    return norm


def schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * (1 - s / (2 * STEPS)))


@pytest.mark.parametrize("fused,staging,page_size", [
    (False, False, 7), (False, True, 5), (True, False, 2**20), (True, False, 48), (True, True, 64)])
def test_torch_clip_grad_norm_idiom_bit_identical_to_torch_adamw_over_12_steps_and_a_resume(fused, staging,
                                                                                            page_size):
    """fused=False against AdamW(foreach=False), fused=True against AdamW(fused=True): the same norms
    and parameters bit for bit, with weight decay and a schedule, and across a state_dict resume at
    step 6. Pages of 48 and 64 cut the 377-element weight at multiples of 16."""
    ref, ours = mlp(), mlp()
    ref_opt = torch_adamw(ref.parameters(), fused, lr=1e-2, weight_decay=0.1)
    opt = offload(ours.parameters(), staging, lr=1e-2, weight_decay=0.1, page_size=page_size, fused=fused)
    ref_sched, sched = schedule(ref_opt), schedule(opt)
    clipped = 0
    for step in range(STEPS):
        if step == STEPS // 2:   # resume: a new model, optimizer and scheduler from the saved states
            saved = ours.state_dict(), opt.state_dict(), sched.state_dict()
            ours = mlp(seed=1)
            ours.load_state_dict(saved[0])
            opt = offload(ours.parameters(), staging, lr=1e-2, weight_decay=0.1, page_size=page_size, fused=fused)
            sched = schedule(opt)
            opt.load_state_dict(saved[1])
            sched.load_state_dict(saved[2])
        want = idiom_step(ref, ref_opt, ref_sched, step)
        got = idiom_step(ours, opt, sched, step)
        assert torch.equal(got, want), step
        assert equal_params(ref, ours), f"step {step}"
        clipped += bool(want > 0.5)
    assert clipped >= STEPS // 2   # the clip did bite


def test_torch_clip_grad_norm_on_bf16_params_clips_the_host_gradient():
    """bf16 parameters with an fp32 master copy: p.grad is a HostGrad; torch's clip_grad_norm_ on
    them equals torch AdamW on an fp32 copy given the same gradients, clipped, then rounded."""
    ours, twin, master = mlp(dtype=torch.bfloat16), mlp(dtype=torch.bfloat16), mlp()
    with torch.no_grad():
        for m, p in zip(master.parameters(), ours.parameters()):
            m.copy_(p.float())
    ref_opt = torch.optim.AdamW(master.parameters(), lr=1e-2, foreach=False)
    opt = CPUOffloadAdamW(ours.parameters(), lr=1e-2, page_size=50, master_weights="fp32", fused=False)
    for step in range(6):
        for micro in range(2):
            x, y = batch(step, micro, dtype=torch.bfloat16)
            loss_fn(ours, x, y).backward()
            loss_fn(twin, x, y).backward()
        assert all(isinstance(p.grad, HostGrad) and p.grad.dtype == torch.bfloat16 for p in ours.parameters())
        for m, t in zip(master.parameters(), twin.parameters()):
            m.grad, t.grad = t.grad.float(), None   # bf16 sums of two bf16 micro-batch gradients...
        for m, p in zip(master.parameters(), ours.parameters()):   # ...are summed in fp32 on the host
            m.grad = opt.host_grad(p)
        want = torch.nn.utils.clip_grad_norm_(master.parameters(), 0.5)
        assert torch.equal(torch.nn.utils.clip_grad_norm_(ours.parameters(), 0.5), want)
        assert want > 0.5
        ref_opt.step(), opt.step()
        ref_opt.zero_grad(), opt.zero_grad()
        with torch.no_grad():
            for m, t, p in zip(master.parameters(), twin.parameters(), ours.parameters()):
                t.copy_(m)
                assert torch.equal(p, m.to(torch.bfloat16)), f"step {step}"


@pytest.mark.parametrize("staging", [False, True])
def test_grad_scaler_unscale_clip_and_skipped_step_match_torch(staging):
    """torch.amp.GradScaler: scale, unscale_ (the host gradient through a HostGrad on the staging
    path), clip, step (skipped at the step whose gradients are not finite), update."""
    ref, ours = mlp(), mlp()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    opt = offload(ours.parameters(), staging, lr=1e-2, page_size=37, fused=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2) for _ in range(2)]
    scales, before = [], None
    for step in range(6):
        if step == 3:
            before = [p.detach().clone() for p in ours.parameters()]
        x, y = batch(step, 0)
        for model, o, scaler in ((ref, ref_opt, scalers[0]), (ours, opt, scalers[1])):
            loss = loss_fn(model, x, y) * (float("inf") if step == 3 else 1.0)
            scaler.scale(loss).backward()
            scaler.unscale_(o)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(o), scaler.update(), o.zero_grad()
            if model is ref:
                want = norm
        assert torch.equal(norm, want) or (norm.isnan() and want.isnan()), step
        assert scalers[0].get_scale() == scalers[1].get_scale(), step
        assert equal_params(ref, ours), f"step {step}"
        scales.append(scalers[1].get_scale())
        if step == 3:   # the infinite step was skipped and the scale backed off
            assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), before))
            assert scales[3] == scales[2] / 2


def staging_grads(staging):
    """A model whose p.grad are HostGrads after one backward, its optimizer, and torch's gradients."""
    dtype = torch.float32 if staging else torch.bfloat16
    model, twin = mlp(dtype=dtype), mlp(dtype=torch.float32)
    opt = offload(model.parameters(), staging, page_size=50, master_weights="fp32")
    with torch.no_grad():
        for p, q in zip(model.parameters(), twin.parameters()):
            q.copy_(p.float())
    x, y = batch(0, 0, dtype=dtype)
    loss_fn(model, x, y).backward()
    return model, opt


@pytest.mark.parametrize("staging", [False, True])
def test_host_grad_reads_and_in_place_ops_act_on_the_host_gradient(staging):
    model, opt = staging_grads(staging)
    params = list(model.parameters())
    p = params[0]
    host = opt.host_grad(p)
    assert isinstance(p.grad, HostGrad) and p.grad.shape == p.shape and p.grad.dtype == p.dtype
    assert torch.equal(p.grad.clone(), host.to(p.dtype))
    assert torch.equal(p.grad.float(), host.to(p.dtype).float())
    assert torch.equal(torch.linalg.vector_norm(p.grad), torch.linalg.vector_norm(host))   # on the fp32 values
    assert torch.equal(p.grad.data.clone(), p.grad.detach().clone())
    p.grad.mul_(2.0)
    assert torch.equal(opt.host_grad(p), host * 2)
    p.grad.div_(torch.tensor(4.0))
    assert torch.equal(opt.host_grad(p), host * 2 / 4)
    p.grad.clamp_(min=-1e-3, max=1e-3)
    assert torch.equal(opt.host_grad(p), (host * 2 / 4).clamp(-1e-3, 1e-3))
    p.grad.copy_(torch.ones_like(p))
    p.grad.add_(torch.full_like(p, 2.0))   # what autograd does when a second backward accumulates
    assert torch.equal(opt.host_grad(p), torch.full(p.shape, 3.0))
    torch._foreach_mul_([q.grad for q in params], 0.5)
    assert torch.equal(opt.host_grad(p), torch.full(p.shape, 1.5))
    norms = torch._foreach_norm([q.grad for q in params])
    assert all(torch.equal(n, torch.linalg.vector_norm(opt.host_grad(q))) for n, q in zip(norms, params))
    total = torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True)   # _foreach_norm, _foreach_mul_
    assert torch.equal(total, torch.nn.utils.clip_grad_norm_(params, 1e9))
    torch.nn.utils.clip_grad_value_(params, 1.0)
    assert torch.equal(opt.host_grad(p), torch.ones(p.shape))
    model.zero_grad(set_to_none=False)   # nn.Module's: requires_grad_(False) then zero_()
    assert all(isinstance(q.grad, HostGrad) and not opt.host_grad(q).any() for q in params)
    model.zero_grad()
    assert all(q.grad is None and opt.host_grad(q) is None for q in params)


@pytest.mark.parametrize("staging", [False, True])
@pytest.mark.parametrize("use", [
    lambda g: g.view(-1), lambda g: g[0], lambda g: g.t(), lambda g: g.flatten(),
    lambda g: g.index_fill_(0, torch.tensor([0]), 1.0), lambda g: torch.add(g, 1, out=g),
    lambda g: g.mul_(torch.ones(3)),
])
def test_host_grad_refuses_views_and_writes_it_cannot_carry_to_the_host(staging, use):
    """A view could be written and the write would not reach the host; a non-elementwise write
    cannot be applied page by page: both raise, naming HostGrad and what to do instead."""
    model, opt = staging_grads(staging)
    p = next(model.parameters())
    before = opt.host_grad(p)
    with pytest.raises(RuntimeError, match=r"HostGrad.*p\.grad\.clone\(\)"):
        use(p.grad)
    assert torch.equal(opt.host_grad(p), before)


def test_fp32_params_in_host_memory_get_a_plain_view_of_the_pages():
    """fp32 parameters in host memory: p.grad is an ordinary tensor that views the host pages, so
    every idiom works unchanged (torch's foreach clip, GradScaler, in-place edits through views)."""
    model = mlp()
    opt = CPUOffloadAdamW(model.parameters(), page_size=7)   # every parameter straddles pages
    loss_fn(model, *batch(0, 0)).backward()
    p = next(model.parameters())
    assert type(p.grad) is torch.Tensor and in_pages(opt, p.grad) and p.grad.is_contiguous()
    p.grad.view(-1)[:3] = 5.0
    assert torch.equal(opt.host_grad(p).view(-1)[:3], torch.full((3,), 5.0))


@pytest.mark.parametrize("staging,fused", [(False, True), (True, False)])
def test_transformers_trainer_with_max_grad_norm_trains_like_torch_adamw(tmp_path, staging, fused):
    """transformers.Trainer clips with torch.nn.utils.clip_grad_norm_ (through accelerate) between
    backward and step: with optimizers=(CPUOffloadAdamW(...), scheduler) it trains a tiny random
    Llama to the same parameters as with torch AdamW, bit for bit, logging the same norms (also
    with p.grad as HostGrads, on the staging path)."""
    import transformers

    from hf_factories import tiny_hf_model

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    def train(name, make_opt):
        model = tiny_hf_model("llama").train()
        opt = make_opt(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 8)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, max_grad_norm=0.5, save_strategy="no", report_to=[],
            logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, sched))
        trainer.train()
        norms = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
        return model, norms

    ref, ref_norms = train("torch", lambda p: torch_adamw(p, fused, lr=1e-2, weight_decay=0.1))
    ours, norms = train("ours", lambda p: offload(p, staging, lr=1e-2, weight_decay=0.1, page_size=4096, fused=fused))
    assert len(norms) == 4 and norms == ref_norms
    assert min(norms) > 0.5   # every step clipped
    assert equal_params(ref, ours)
