"""Mixture of experts: the sparse MLP block of Mixtral, Qwen2-MoE and Qwen3-MoE (families.py says
which family routes how), as transformers 5 runs it.

    x (N tokens, C) --gate--> router logits (N, E) --softmax, top k--> for each token: k experts
    and their weights;  out[t] = sum over its k experts e of weight(t, e) * expert_e(x[t])
                                 (+ Qwen2-MoE: sigmoid(shared_expert_gate(x[t])) * shared_expert(x[t]))

Each expert is a gated MLP (SwiGLU). The experts of a layer are stored as transformers 5 stores
them in memory: two 3-D tensors, `experts.gate_up_proj` (E, 2I, C) holding expert e's gate and up
projections stacked along dim 1, and `experts.down_proj` (E, C, I). Expert e's matrices are
(out, in), like nn.Linear weights stacked along a new first dim (a checkpoint stores them one
expert at a time; checkpoint_keys.py fuses and splits them). The router (`gate`) is a `Gate`, an
nn.Linear without bias that tools can recognise: minilora's "all-linear" does not adapt it and
quantize_model keeps it in the compute dtype.

The router's auxiliary loss (Switch Transformer's load balancing, Fedus et al. 2021, eqs. 4-6) is
`load_balancing_loss`; the model returns it when asked (Llama.forward(aux_loss=True)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MoEConfig", "Gate", "Experts", "SparseMoE", "load_balancing_loss"]


@dataclass(frozen=True)
class MoEConfig:
    # transformers' names (Mixtral calls num_experts num_local_experts, and its expert size intermediate_size)
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int              # I of each routed expert
    norm_topk_prob: bool = True             # the k kept weights renormalised to sum to 1 (Mixtral: always)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one more expert every token goes through (0: none)
    decoder_sparse_step: int = 1            # Qwen: every step-th layer is sparse ...
    mlp_only_layers: tuple = ()             # ... except these, which keep a dense MLP
    router_aux_loss_coef: float = 0.001     # weight of the auxiliary loss in the training loss, when asked for
    router_jitter_noise: float = 0.0        # Mixtral, training only: the block's input times U(1 - j, 1 + j)

    def __post_init__(self):
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be at most num_experts "
                             f"({self.num_experts}): a token is routed to that many distinct experts")
        shared = self.shared_expert_intermediate_size
        if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
            raise ValueError(f"shared_expert_intermediate_size must be an int >= 0 (0: no shared expert), "
                             f"got {shared!r}")
        if not 0 <= self.router_jitter_noise < 1:
            raise ValueError(f"router_jitter_noise must be in [0, 1), got {self.router_jitter_noise!r}")
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))

    def is_sparse(self, layer: int) -> bool:
        """Does decoder layer `layer` route to experts (else it has a dense MLP)? transformers' rule."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


class Gate(nn.Linear):
    """A gating projection (no bias): the router's (C -> E) logits, or Qwen2-MoE's shared_expert_gate (C -> 1).
    An nn.Linear in every respect; its own class says "this decides where tokens go"."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)


class Experts(nn.Module):
    """E gated MLPs in two 3-D tensors (see the module docstring). forward(x, e) runs expert e on the
    tokens routed to it; each projection goes through `project`, which a wrapper can replace (LoRA on
    the expert tensors, a 4-bit copy of them) without a second copy of the expert's MLP."""

    TENSORS = ("gate_up_proj", "down_proj")  # each (E, out, in)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act, device=None, dtype=None):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        E, C, inter = num_experts, hidden_size, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, C, device=device, dtype=dtype))  # (E, 2I, C)
        self.down_proj = nn.Parameter(torch.empty(E, C, inter, device=device, dtype=dtype))  # (E, C, I)
        self.act = act
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02), transformers' initializer_range, as the model's linear layers."""
        for p in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(p, mean=0.0, std=0.02)

    def tensor_shape(self, name: str) -> tuple[int, int, int]:
        """(E, out, in) of expert tensor `name`."""
        return tuple(getattr(self, name).shape)

    def project(self, name: str, x: torch.Tensor, expert: int) -> torch.Tensor:
        # x (n, in) -> (n, out) through expert `expert`'s (out, in) slice of the 3-D tensor `name`
        return F.linear(x, getattr(self, name)[expert])

    def forward(self, x: torch.Tensor, expert: int, project=None) -> torch.Tensor:
        project = project or self.project
        gate, up = project("gate_up_proj", x, expert).chunk(2, dim=-1)  # (n, I) each
        return project("down_proj", self.act(gate) * up, expert)  # (n, C)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, " \
               f"intermediate_size={self.intermediate_size}"


class SparseMoE(nn.Module):
    """The MoE block in a decoder layer's MLP slot. `weights_fp32`: Mixtral scales the experts' outputs
    by fp32 routing weights, Qwen casts the weights to the compute dtype first (in bf16 the products
    round differently). `shared_expert` (Qwen2-MoE) is a dense MLP every token also goes through,
    scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(self, hidden_size: int, moe: MoEConfig, act, weights_fp32: bool,
                 shared_expert: nn.Module | None = None):
        super().__init__()
        self.top_k, self.num_experts = moe.num_experts_per_tok, moe.num_experts
        self.norm_topk_prob, self.weights_fp32 = moe.norm_topk_prob, weights_fp32
        self.jitter_noise = moe.router_jitter_noise
        self.gate = Gate(hidden_size, moe.num_experts)
        self.experts = Experts(moe.num_experts, hidden_size, moe.moe_intermediate_size, act)
        self.shared_expert = shared_expert
        self.shared_expert_gate = Gate(hidden_size, 1) if shared_expert is not None else None
        self.router_logits: torch.Tensor | None = None  # of the last forward, for the auxiliary loss

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits (N, E) -> (weights, experts), each (N, k): softmax over all E experts in fp32,
        keep the k largest, optionally renormalise them to sum to 1."""
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (N, k) each, largest first
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights if self.weights_fp32 else weights.to(logits.dtype)), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        x = x.reshape(B * T, C)  # (N, C): tokens are routed one by one
        self.router_logits = logits = self.gate(x)  # (N, E)
        weights, experts = self.route(logits)  # (N, k) each
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():  # each expert once, on the tokens routed to it
            # (n,) each: the tokens routed to e and which of their k picks it is; first-pick tokens first,
            # as transformers orders them (a matmul over the same rows in another order rounds differently)
            slot, token = torch.where(experts.T == e)
            y = self.experts(x[token], e) * weights[token, slot, None]  # (n, C)
            out.index_add_(0, token, y.to(out.dtype))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(B, T, C)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob}"


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss over every sparse layer's router logits (each (N, E)), as
    transformers' load_balancing_loss_func computes it (no padding mask):
        E * sum_e f_e * P_e,  f_e = routed (token, pick) pairs that go to e / rows,  P_e = mean probability of e
    where rows counts tokens over all layers. Balanced routing gives top_k; it grows as load concentrates."""
    if not router_logits:
        raise ValueError("load_balancing_loss needs the router logits of at least one sparse layer")
    probs = torch.cat([F.softmax(logits, dim=-1) for logits in router_logits]).float()  # (L * N, E)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    tokens_per_expert = torch.bincount(chosen.reshape(-1), minlength=num_experts).float() / probs.shape[0]
    return (tokens_per_expert * probs.mean(dim=0)).sum() * num_experts

