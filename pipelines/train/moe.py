# Copyright ropebert contributors. Apache-2.0.
"""The load-balancing loss of a mixture-of-experts student, exact under GradCache.

The Switch loss of one MoE layer over the step's T real tokens (every group: queries, passages, negatives) is

    aux_l = E * sum_e f_e * P_e,   f_e = (slots routed to e) / (T k)  (no gradient: it comes from top-k),
                                   P_e = (1 / T) sum_t p_te           (the router probabilities, with gradient)

and the step adds coef * mean_l aux_l (coef = config.moe.aux_loss_coef). With f fixed, aux_l is a sum of per-token
terms, so it splits exactly over GradCache chunks: the graph-less pass 1 counts the routed slots of every chunk
(f and T of the whole step), and each chunk's replay adds its own share E * sum_e f_e * (sum over its tokens of
p_te) / T, backpropagated through the router inside the chunk. Without GradCache the same total is added to the
loss once every group is embedded. Both give the same loss and gradients (tests/pipelines/train/test_moe_train.py);
routing is deterministic, so the replay routes exactly as pass 1 did (checked: a mismatch is an error).

Data parallel (W ranks, `ropebert_ddp`): the term is per rank. Rank r computes aux_r from its own tokens only (its
own f_e, P_e and T; nothing of the routing is all-reduced) and adds it to its local loss; the one gradient
all-reduce then averages, so a W-rank step computes the gradient of

    mean_r InfoNCE_r + coef * mean_r mean_l aux_{l,r}  =  InfoNCE(global batch) + mean_r (rank r's MoE term)

-- the mean of the ranks' Switch losses, not the Switch loss of the global batch (a product of means is not the
mean of the products). A single process reproduces a W-rank step exactly by adding the mean of the MoE terms of
the W row slices to the whole batch's loss (tests/pipelines/train/test_moe_train.py, 2 gloo ranks == 1 process).
The logged train/loss, train/moe_aux and per-layer stats are rank 0's own.

Routing is observed with forward hooks on the model's MoE blocks (they recompute the router's probabilities from
the block input, a (T, C) x (C, E) product): the model itself is not changed, whatever embed function runs it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Optional, Union

import torch

from ropebert.errors import InputError
from ropebert.model.configuration_ropebert import MOE_DEFAULTS
from ropebert.model.modeling_ropebert import RopeBertModel, RopeBertMoE


@dataclass
class MoESettings:
    """`model.moe` of `ropebert fit` (the `moe` block of RopeBertConfig; `--model.moe.num_experts 8` ...).

    Args:
        num_experts: experts per MoE layer (>= 1).
        top_k: experts per token (1..num_experts).
        every_n_layers: the MoE layers are the 0-based i with i % every_n_layers == 1 (2: layers 1, 3, 5, ...).
        normalize_weights: renormalise each token's top-k router weights to sum to 1.
        aux_loss_coef: weight of the load-balancing loss added to the training loss (>= 0).
    """

    num_experts: int = MOE_DEFAULTS["num_experts"]
    top_k: int = MOE_DEFAULTS["top_k"]
    every_n_layers: int = MOE_DEFAULTS["every_n_layers"]
    normalize_weights: bool = MOE_DEFAULTS["normalize_weights"]
    aux_loss_coef: float = MOE_DEFAULTS["aux_loss_coef"]


def moe_settings(moe: Union[None, MoESettings, dict[str, Any]]) -> Optional[dict]:
    """`model.moe` as the config's plain dict (every key filled in); None stays None. Unknown keys, wrong types and
    bad values are InputErrors naming the setting."""
    if moe is None:
        return None
    if isinstance(moe, MoESettings):
        d = asdict(moe)
    elif isinstance(moe, dict):
        known = {f.name for f in fields(MoESettings)}
        unknown = sorted(set(moe) - known)
        if unknown:
            raise InputError(f"model.moe: unknown keys {unknown}; the keys are {sorted(known)}")
        d = asdict(MoESettings(**moe))
    else:
        raise InputError(f"model.moe must be null or a mapping with keys {sorted(MOE_DEFAULTS)}, got {moe!r}")
    for k in ("num_experts", "top_k", "every_n_layers"):
        if not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] < 1:
            raise InputError(f"model.moe.{k} must be an integer >= 1, got {d[k]!r}")
    if d["top_k"] > d["num_experts"]:
        raise InputError(f"model.moe.top_k={d['top_k']} exceeds model.moe.num_experts={d['num_experts']}")
    if not isinstance(d["normalize_weights"], bool):
        raise InputError(f"model.moe.normalize_weights must be true or false, got {d['normalize_weights']!r}")
    c = d["aux_loss_coef"]
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not (0 <= c < float("inf")):
        raise InputError(f"model.moe.aux_loss_coef must be a finite number >= 0, got {c!r}")
    d["aux_loss_coef"] = float(c)
    return d


def apply_moe(model: RopeBertModel, moe: Optional[dict], *, seed: int, init_from: str = "model.init_from") -> RopeBertModel:
    """The model a run trains under `model.moe` (a moe_settings dict): unchanged without it; a dense init upcycled
    exactly as `ropebert upcycle --seed seed` does (experts = copies of each MoE layer's dense FFN, router
    normal(0, 1e-3) from the seeded generator; in training mode); an MoE init returned as it is when its `moe`
    block equals the setting, else an InputError naming both."""
    if moe is None:
        return model
    have = getattr(model.config, "moe", None)
    if have is not None:
        have = {**MOE_DEFAULTS, **have}
        if {**have, "aux_loss_coef": float(have["aux_loss_coef"])} != moe:
            raise InputError(f"model.moe {moe} does not match the mixture of experts of model.init_from {init_from!r} "
                             f"(its config's moe: {have}); set model.moe to the init's block, or leave it null to "
                             "train the init as it is")
        return model
    from ropebert.model.upcycle import upcycle

    try:
        return upcycle(model, seed=seed, **moe).train()
    except InputError as e:
        raise InputError(f"model.moe {moe} over model.init_from {init_from!r}: {e}") from None


class MoEAux:
    """Step-level load-balancing loss and routing stats of `model`'s MoE layers (inactive for a dense model)."""

    def __init__(self, model: torch.nn.Module):
        moe = getattr(model.config, "moe", None)
        self.blocks = [m for m in model.modules() if isinstance(m, RopeBertMoE)]
        self.active = moe is not None and bool(self.blocks)
        self.coef = float(moe["aux_loss_coef"]) if self.active else 0.0
        self.layers = list(model.config.moe_layers) if self.active else []
        self._collect: Optional[list] = None
        for j, m in enumerate(self.blocks):
            m.register_forward_hook(self._hook(j))
        self.begin_step()

    def _hook(self, j: int):
        def hook(module: RopeBertMoE, args, output):
            if self._collect is None and not torch.is_grad_enabled():
                return
            x, mask = args[0], (args[1] if len(args) > 1 else None)
            flat = x.reshape(-1, x.shape[-1]) if mask is None else x[mask]  # (T, C)
            probs, _, index = module.route(flat)  # (T, E), (T, k)
            counts = torch.bincount(index.reshape(-1), minlength=module.num_experts).to(torch.float32)  # (E,)
            ent = -(probs * probs.clamp_min(1e-30).log()).sum()
            if self._collect is None:
                # an activation-checkpointing recompute (already counted): computed all the same, so that it
                # saves the tensors the original forward saved
                return
            self._collect.append((j, counts, probs.sum(dim=0), ent.detach(), flat.shape[0]))
        return hook

    def begin_step(self) -> None:
        n, E = len(self.blocks), (self.blocks[0].num_experts if self.blocks else 0)
        self.counts = torch.zeros(n, E)  # pass-1 (or only-pass) routed slots per layer and expert
        self.replay_counts = torch.zeros(n, E)
        self.prob_sum = torch.zeros(n, E)  # detached, for the logged values
        self.entropy_sum = torch.zeros(n)
        self.tokens = 0
        self.pending: list = []  # uncached: (prob_sum with graph (n, E)) per embed call
        self.replay_aux = 0.0

    def _record(self, embed_call: Callable):
        self._collect = []
        try:
            out = embed_call()
        finally:
            recs, self._collect = self._collect, None
        recs.sort(key=lambda r: r[0])
        counts = torch.stack([r[1].cpu() for r in recs])  # (n, E)
        prob_sum = torch.stack([r[2] for r in recs])  # (n, E), with graph when grad is enabled
        ent = torch.stack([r[3].cpu().float() for r in recs])
        return out, counts, prob_sum, ent, int(recs[0][4]) if recs else 0

    def _aux(self, prob_sum: torch.Tensor) -> torch.Tensor:
        """coef * mean_l E * sum_e f_le * prob_sum_le / T, with f and T of the whole step."""
        E = prob_sum.shape[-1]
        k = self.blocks[0].top_k
        f = (self.counts / max(1, self.tokens * k)).to(prob_sum.device)
        return self.coef * (E * (f * prob_sum).sum(dim=-1) / max(1, self.tokens)).mean()

    def wrap_embed(self, embed: Callable, cached: bool) -> Callable:
        """The embed function with the MoE term: pass 1 (no grad) counts, a cached replay adds its chunk's share,
        an uncached call keeps its probabilities for wrap_loss."""
        if not self.active:
            return embed

        def fn(ids, mask):
            out, counts, prob_sum, ent, T = self._record(lambda: embed(ids, mask))
            if not torch.is_grad_enabled():  # GradCache pass 1
                self.counts += counts
                self.tokens += T
                self.entropy_sum += ent
                return out
            self.prob_sum += prob_sum.detach().cpu().float()
            if not cached:
                self.counts += counts
                self.tokens += T
                self.entropy_sum += ent
                self.pending.append(prob_sum)
                return out
            self.replay_counts += counts
            share = self._aux(prob_sum)
            self.replay_aux += float(share.detach())
            emb, aux = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
            return emb, share if aux is None else aux + share

        return fn

    def wrap_loss(self, loss_fn: Callable) -> Callable:
        """The loss function plus, without GradCache, the step's whole MoE term (every group is embedded by then)."""
        if not self.active:
            return loss_fn

        def fn(embs):
            loss, stats = loss_fn(embs)
            if self.pending:
                aux = self._aux(torch.stack(self.pending).sum(dim=0))
                self.pending = []
                loss = loss + aux
                stats = dict(stats, moe_aux=aux.detach())
            return loss, stats

        return fn

    def check_replay(self) -> None:
        """After a GradCache step: the replay routed every slot as pass 1 did."""
        if self.replay_counts.sum() > 0 and not torch.equal(self.replay_counts, self.counts):
            raise RuntimeError("MoE: the GradCache replay routed tokens differently from pass 1 (routing must be "
                               "deterministic given the replayed RNG state)")

    def summary(self) -> dict[str, torch.Tensor]:
        """The step's values to log: train/moe_aux, and per MoE layer aux, min / max token share, router entropy."""
        if not self.active or self.tokens == 0:
            return {}
        E = self.counts.shape[-1]
        k = self.blocks[0].top_k
        f = self.counts / (self.tokens * k)  # (n, E)
        per_layer = E * (f * self.prob_sum / self.tokens).sum(dim=-1)  # (n,)
        out = {"train/moe_aux": self.coef * per_layer.mean()}
        for j, layer in enumerate(self.layers):
            out[f"train/moe/layer{layer}/aux"] = per_layer[j]
            out[f"train/moe/layer{layer}/min_share"] = f[j].min()
            out[f"train/moe/layer{layer}/max_share"] = f[j].max()
            out[f"train/moe/layer{layer}/entropy"] = self.entropy_sum[j] / self.tokens
        return out
