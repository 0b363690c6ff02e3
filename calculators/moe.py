"""Mixture-of-experts arithmetic: which config keys size the experts, the parameters a token activates,
and how many tokens each expert sees.

Families (families.Family.moe), as transformers 5.24's configuration classes read them:
  mixtral    num_local_experts experts of intermediate_size on every layer; no shared expert
  qwen       num_experts experts of moe_intermediate_size; a layer keeps a dense MLP of intermediate_size
             when it is in mlp_only_layers or (layer + 1) % decoder_sparse_step != 0; qwen2_moe adds a
             shared expert of shared_expert_intermediate_size scaled by a sigmoid gate (Linear h -> 1)
  deepseek   n_routed_experts experts of moe_intermediate_size; the first first_k_dense_replace layers
             are dense; n_shared_experts shared experts, built as one MLP of n_shared x moe_intermediate_size
Every expert is a gated MLP: 3 * hidden * I parameters (gate_up_proj (E, 2I, h), down_proj (E, h, I)).

Active parameters per token: all of them but the routed experts a token is not sent to, E - k per
sparse layer. Embeddings and the head count whole, as Mixtral's "12.9B active of 46.7B" and
Qwen3-30B-A3B's "3.3B activated" are stated.

Routed tokens: a batch of N tokens makes N * k (token, expert) pairs per sparse layer. What autograd
keeps for the experts grows with that sum only (each expert's saved tensors are linear in its
tokens), so the routing does not change the activations; it changes the transient memory of the
busiest expert. Balanced routing gives each expert N * k / E tokens; `expert_imbalance` f > 1 gives
the busiest one f times that (at most N: a token picks an expert once).
"""
from __future__ import annotations

import math

from .parameters import count_parameters
from .spec import ModelSpec

__all__ = ["moe_sizes", "expert_parameters", "active_parameters", "routed_tokens", "busiest_expert_tokens"]


def moe_sizes(r, num_layers: int, intermediate: int) -> dict:
    """ModelSpec's expert fields from a config read through models' reader `r` (its family's rule)."""
    rule = r.family.moe
    key = {"mixtral": "num_local_experts", "qwen": "num_experts", "deepseek": "n_routed_experts"}[rule]
    if r.config.get(key) is None and r.config.get("num_local_experts") is not None:
        key = "num_local_experts"  # transformers' attribute_map: what 5.x writes for qwen3_moe / deepseek_v3
    experts, per_token = r.positive_int(key), r.positive_int("num_experts_per_tok")
    if per_token > experts:
        r.refuse(f"num_experts_per_tok ({per_token}) must be at most {key} ({experts})")
    sizes = dict(num_experts=experts, experts_per_token=per_token,
                 moe_intermediate_size=intermediate if rule == "mixtral" else r.positive_int("moe_intermediate_size"),
                 norm_topk_prob=rule == "mixtral" or bool(r.get("norm_topk_prob", rule == "deepseek")))
    if rule == "qwen":
        step = r.positive_int("decoder_sparse_step")
        only = r.get("mlp_only_layers") or []
        if not isinstance(only, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
            r.refuse(f"mlp_only_layers must be a list of layer indices, got {only!r}")
        sizes["dense_layers"] = tuple(i for i in range(num_layers) if i in only or (i + 1) % step)
        if r.model_type == "qwen2_moe":
            sizes.update(shared_expert_size=r.positive_int("shared_expert_intermediate_size"), shared_expert_gate=True)
    elif rule == "deepseek":
        first = r.positive_int("first_k_dense_replace", minimum=0)
        sizes.update(dense_layers=tuple(range(min(first, num_layers))),
                     shared_expert_size=sizes["moe_intermediate_size"] * r.positive_int("n_shared_experts", minimum=0))
    return sizes


def expert_parameters(spec: ModelSpec) -> int:
    """One routed expert's parameters: gate, up and down projections, hidden x I each."""
    return 3 * spec.hidden_size * spec.moe_intermediate_size


def active_parameters(spec: ModelSpec) -> int:
    """Parameters a token passes through: the total minus the E - k routed experts it skips in every
    sparse layer (equal to the total for a dense model)."""
    sparse = sum(spec.is_sparse(i) for i in range(spec.num_layers))
    return count_parameters(spec) - sparse * (spec.num_experts - spec.experts_per_token) * expert_parameters(spec)


def routed_tokens(spec: ModelSpec, tokens: int) -> int:
    """(token, expert) pairs one sparse layer runs for `tokens` tokens: tokens * k."""
    return tokens * spec.experts_per_token


def busiest_expert_tokens(spec: ModelSpec, tokens: int, imbalance: float = 1.0) -> int:
    """Tokens the busiest expert gets: imbalance x the balanced share N * k / E, rounded up, at most N."""
    limit = spec.num_experts / spec.experts_per_token
    if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)) or not 1 <= imbalance <= limit:
        raise ValueError(f"expert_imbalance must be between 1 (balanced) and num_experts / experts_per_token "
                         f"= {limit:g} (the busiest expert sees every token), got {imbalance!r}")
    return min(tokens, math.ceil(imbalance * tokens * spec.experts_per_token / spec.num_experts))
