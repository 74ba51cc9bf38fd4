"""Mixture-of-experts training: the load-balancing loss over the global batch, and the
experts' load.

The loss is the Switch Transformer's, as transformers defines it for the Qwen MoE
families (`load_balancing_loss_func`), pooled over the MoE layers:

    aux = E x sum_e f_e x P_e

with E experts, f_e the share of the (token, layer) pairs whose top-k choice includes
expert e (summed over the k choices), and P_e the mean router probability of expert e
over the same pairs. The model's own term sees one forward's batch, with the pads in it
when there is no attention mask (packing). ft computes it over the whole global batch
instead, as Qwen's own MoE training balances: counts and probability sums are added over
micro-batches and ranks before the product is taken, and only the tokens of samples
count (not the pads, the pad segment of a pack, or the collator's dummy image). The
result is the same at any world size and accumulation that keep the global batch.

Exactly, not only in value: f is a count (no gradient), so the loss is linear in the
probability sums, and each micro-batch's share `E x sum_e f_e x S_e / N` (S_e its own
sum, N all pairs of the step) has exactly the global loss's gradient. It needs the
step's global f before the first backward: with one micro-batch per rank, one
all-reduce between forward and backward gives it; with gradient accumulation, a counting
pass (a forward without gradients over the step's micro-batches) gives it first. That
costs one more forward per micro-batch, and is said at start-up.

The routers' outputs are read by a forward hook on the family's `router` role
(`ft.families`): the hook only keeps the outputs (the router logits and the chosen
experts); everything is computed from them after the forward returns, outside any
checkpointed region, so activation checkpointing recomputes nothing of it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ft import watchdog
from ft.backends import backend_of
from ft.dist import DistInfo, all_reduce_tensor_sum
from ft.families import MoeShape, family_of
from ft.model import loss_sum

__all__ = ["Routing", "Balancer", "balancer_for", "tap_routers", "load_metrics"]


@dataclass
class Routing:
    """One forward's routing of the sample tokens, over its MoE layers."""

    prob_sums: torch.Tensor  # [E] router probabilities summed over tokens and layers (carries the gradient)
    counts: torch.Tensor  # [layers, E] top-k choices per layer (float64, no gradient)


@contextlib.contextmanager
def tap_routers(model: torch.nn.Module, real: torch.Tensor):
    """While the block runs, keep every router call's (logits, chosen experts); on exit,
    the yielded list holds one :class:`Routing` per forward (empty if the model ran
    none). `real` is the [rows, length] mask of sample tokens, in the order the router
    sees them (flattened rows)."""
    family = family_of(model)
    router_cls = family.cls("router")
    routers = [m for m in model.modules() if isinstance(m, router_cls)]
    layer_of = {id(m): i for i, m in enumerate(routers)}
    calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def keep(module, args, output):
        logits, _scores, chosen = output
        calls.append((layer_of[id(module)], logits, chosen))

    handles = [m.register_forward_hook(keep) for m in routers]
    found: list[Routing] = []
    try:
        yield found
    finally:
        for h in handles:
            h.remove()
    if calls:
        found.append(_routing(calls, real.reshape(-1), len(routers), routers[0].num_experts))


def _routing(calls, mask: torch.Tensor, layers: int, experts: int) -> Routing:
    prob_sums = torch.zeros(experts, dtype=torch.float32, device=mask.device)
    counts = torch.zeros(layers, experts, dtype=torch.float64, device=mask.device)
    for layer, logits, chosen in calls:
        keep = mask.to(logits.device)
        probs = torch.softmax(logits[keep].float(), dim=-1)
        prob_sums = prob_sums + probs.sum(0)
        counts[layer] += torch.bincount(chosen[keep].reshape(-1), minlength=experts).to(counts.dtype)
    return Routing(prob_sums, counts)


class Balancer:
    """The step's load-balancing loss over the global batch (see the module's doc)."""

    def __init__(self, shape: MoeShape, coef: float, device: torch.device):
        self.shape, self.coef, self.device = shape, coef, device
        self.counts: torch.Tensor | None = None  # [layers, E] summed over the step's micro-batches and ranks

    def agree(self, counts: list[torch.Tensor]) -> None:
        """Sum the step's per-forward counts over the micro-batches and the ranks. A
        collective: every rank calls it at the same point of the step."""
        self.counts = all_reduce_tensor_sum(torch.stack(counts).sum(0).to(self.device))

    def counting_pass(self, model, inputs: list[dict], real: list[torch.Tensor], chunk_size: int) -> None:
        """With gradient accumulation: a forward without gradients over each of the
        step's micro-batches, whose routing counts, summed over the micro-batches and the
        ranks, weight every micro-batch's share of the loss. Collectives: FSDP's
        all-gathers in each forward, then the counts' sum."""
        counts = []
        with torch.no_grad():
            for i, batch in enumerate(inputs):
                with watchdog.at(f"step/route-count {i}"), tap_routers(model, real[i]) as routed:
                    loss_sum(model, batch, chunk_size)  # SYNC step/route-count (all-gathers)
                counts.append(routed[0].counts)
        with watchdog.at("step/route"):
            self.agree(counts)  # SYNC step/route

    def loss(self, routing: Routing) -> torch.Tensor:
        """This forward's share of the step's loss (unweighted: `aux_loss`). The
        shares of all micro-batches on all ranks add up to the global loss. A step has
        sample tokens (every micro-batch holds a sample), so `pairs` is never 0."""
        pooled = self.counts.sum(0)  # [E] choices over all layers
        pairs = pooled.sum() / self.shape.top_k  # (token, layer) pairs of the step
        share = (pooled / pairs).to(routing.prob_sums.dtype)  # f_e
        return self.shape.experts * (share * routing.prob_sums).sum() / pairs.to(routing.prob_sums.dtype)


def balancer_for(model: torch.nn.Module, train_cfg, info: DistInfo, log) -> Balancer | None:
    """The run's load-balancing loss (None for a dense model, or a weight of 0), and a
    line at start-up on the experts, their kernel and the loss."""
    hf_model = backend_of(model).unwrap(model)
    text = hf_model.config.text_config
    shape = family_of(hf_model).moe_shape(text)
    if shape is None:
        return None
    kernel = getattr(text, "_experts_implementation", None) or "eager"
    coef = train_cfg.router_aux_loss_coef if train_cfg.router_aux_loss_coef >= 0 else shape.aux_coef
    line = (f"MoE: {shape.experts} experts, top-{shape.top_k}, in {len(shape.layers)} of "
            f"{text.num_hidden_layers} layers; experts kernel {kernel} ({_KERNELS.get(kernel, 'transformers')})")
    if coef == 0:
        log(f"{line}; no load-balancing loss (train.router_aux_loss_coef=0)")
        return None
    accum = train_cfg.gradient_accumulation_steps
    log(f"{line}; load-balancing loss x {coef:g} over the global batch, pads left out"
        + (f", with a counting pass (one more forward per micro-batch: accumulation {accum})" if accum > 1 else ""))
    return Balancer(shape, coef, info.device)


_KERNELS = {
    "grouped_mm": "all experts in one grouped matrix multiply, torch._grouped_mm",
    "batched_mm": "a batched matrix multiply over the chosen experts' weights, copied per token",
    "eager": "a Python loop over the experts that got tokens",
}


def load_metrics(counts: torch.Tensor) -> dict[str, float]:
    """What a logging window's [layers, E] counts say of the experts' load: each
    expert's share of the choices (over all MoE layers), and the most loaded expert's
    count over the mean, in the worst layer (1 is perfect balance, E a collapse onto
    one expert)."""
    counts = counts.double().cpu()
    total = counts.sum()
    if total == 0:
        return {}
    per_layer = counts.max(1).values / counts.mean(1).clamp_min(1e-12)
    shares = counts.sum(0) / total
    return {"expert_load_max_over_mean": float(per_layer.max()),
            **{f"expert_share/{e}": float(s) for e, s in enumerate(shares)}}
