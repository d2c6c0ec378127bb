# Copyright ropebert contributors. Apache-2.0.
"""The contrastive loss: InfoNCE over the global batch, with explicit gather semantics.

Gather semantics (one place, used by every training path):

* Every rank holds B local queries, B local positives and optionally B*K local hard negatives.
* `gather=True` all-gathers passages and negatives from every rank WITH gradient (`all_gather_with_grad`):
  forward concatenates the ranks' tensors in rank order, backward all-reduces (sums) the incoming gradient and
  returns this rank's slice.
* Each LOCAL query scores against all W*B global passages and all W*B*K global negatives; its label is its own
  positive's global index `rank * B + i`. The loss is the mean over the local queries.

Why no extra x world-size factor is needed: the per-rank loss is L_r = mean over r's queries. Data-parallel
training averages parameter gradients over ranks, i.e. it optimises (1/W) sum_r L_r, which is exactly the
mean cross-entropy over all W*B queries, the single-process loss on the concatenated batch. The gradient of
that objective w.r.t. rank s's passage embeddings is (1/W) sum_r dL_r/dp_s; the all-gather backward delivers
sum_r dL_r/dp_s to rank s (the all-reduce sum), and the data-parallel average supplies the 1/W. Queries only
enter their own rank's loss, so their gradient needs no communication. Multiplying by W would only be needed
if the backward did NOT sum the other ranks' contributions (a plain, gradient-less all_gather plus a "local
loss"). tests/pipelines/test_loss.py checks loss and every parameter gradient of 2 gloo ranks x B against a
single process on the same 2B examples.

False negatives: with text hashes (`query_hashes` (B,), `passage_hashes` (B,), `negative_hashes` (B, K); 64-bit
hashes of the normalised texts, see ropebert.shards.hashing) gathered like the embeddings, a query's candidate
column is removed from its softmax (its logit set to -inf, so the loss is exactly that of the row without it) when

* it is a passage or hard negative (any rank) whose text hash equals the hash of the query's own positive, other
  than the query's label column; or
* it is the in-batch positive of another query whose QUERY text hash equals this query's.

The same columns leave every distribution over the row: the InfoNCE softmax, the passage->query direction
(a passage's other queries are masked under the same two rules, read from the passage side), the shard
teacher-score KL over the query's own 1+K candidates, and the global teacher-score KL (masked out of both the
teacher's and the student's softmax, then renormalised), at every Matryoshka dim.

Logits, log-softmax and the loss are computed in fp32 with autocast disabled, whatever the caller's precision.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ropebert.errors import InputError

__all__ = ["all_gather_no_grad", "all_gather_with_grad", "contrastive_loss", "ContrastiveStats", "dist_info",
           "false_negative_mask", "hidden_alignment", "layered_contrastive_loss"]


def dist_info() -> tuple[int, int]:
    """(world_size, rank) of the default process group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _AllGatherWithGrad(torch.autograd.Function):
    """(N, ...) per rank -> (W*N, ...) in rank order; backward: all-reduce(sum) the gradient, keep own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist_info()
        ctx.rank, ctx.n = rank, x.shape[0]
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
        if any(int(s) != x.shape[0] for s in sizes):
            raise RuntimeError(
                f"all_gather_with_grad: ranks hold different batch sizes {[int(s) for s in sizes]}; the shard plan "
                "gives every rank equal batches — a custom loader must too")
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 with gradient (identity without a process group)."""
    world, _ = dist_info()
    if world == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 without gradient (teacher embeddings); identity without a process group."""
    world, _ = dist_info()
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


HIDDEN_KINDS = ("cos", "mse")


def hidden_alignment(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor,
                     layer_map: list[tuple[int, int]], kind: str = "cos") -> torch.Tensor:
    """Token-level alignment of hidden states, per example: (N,) losses.

    student / teacher: hidden_states lists ((N, L, C) each, index 0 = embeddings); the teacher's may be shorter
    in L (truncated to its position range): only the first L' positions are compared. mask: (N, L) real tokens of
    the student. For each (s, t) in layer_map and each real token: kind="cos": 1 - cos(h_s, h_t); kind="mse":
    mean over channels of (h_s - h_t)^2 / mean over channels of h_t^2 (scale-free). Averaged over the example's
    real tokens, then over the mapped layers. fp32 whatever the inputs' dtype."""
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"hidden_alignment: kind must be one of {HIDDEN_KINDS}, got {kind!r}")
    Lt = teacher[0].shape[1]
    m = mask[:, :Lt].to(torch.float32)  # (N, L')
    n_tok = m.sum(-1).clamp(min=1.0)  # (N,)
    total = mask.new_zeros(mask.shape[0], dtype=torch.float32)
    with torch.autocast(device_type=mask.device.type, enabled=False):
        for s, t in layer_map:
            hs = student[s][:, :Lt].float()  # (N, L', C)
            ht = teacher[t].float()
            if kind == "cos":
                per_tok = 1.0 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-6)  # (N, L')
            else:
                per_tok = (hs - ht).pow(2).mean(-1) / ht.pow(2).mean(-1).clamp(min=1e-6)
            total = total + (per_tok * m).sum(-1) / n_tok
    return total / max(1, len(layer_map))


class ContrastiveStats(dict):
    """Detached diagnostics of one loss call: pos_sim, neg_sim (mean cosine), hardest_neg_sim, accuracy,
    infonce, kl (when distilling), false_negatives_masked (with text hashes)."""


def _check_hashes(name: str, h: Optional[torch.Tensor], shape: tuple) -> Optional[torch.Tensor]:
    if h is None:
        return None
    if not torch.is_tensor(h) or h.dtype != torch.int64 or tuple(h.shape) != shape:
        raise InputError(f"contrastive_loss: {name} must be an int64 tensor of shape {shape}, got "
                         f"{getattr(h, 'dtype', type(h).__name__)} {tuple(getattr(h, 'shape', ()))}")
    return h


def false_negative_mask(query_hashes: Optional[torch.Tensor], passage_hashes: Optional[torch.Tensor],
                        negative_hashes: Optional[torch.Tensor], *, B: int, K: int,
                        gather: bool) -> Optional[torch.Tensor]:
    """(B, W*B*(1+K)) bool: True where a local query's candidate column (all passages, then all negatives, in
    global order) is a false negative (see the module docstring); never its own label column. None without
    hashes. The hashes are gathered (no gradient) when `gather` and a process group is up."""
    qh = _check_hashes("query_hashes", query_hashes, (B,))
    ph = _check_hashes("passage_hashes", passage_hashes, (B,))
    nh = _check_hashes("negative_hashes", negative_hashes, (B, K))
    if nh is not None and ph is None:
        raise InputError("contrastive_loss: negative_hashes need passage_hashes (a negative is masked when it "
                         "equals the query's own positive)")
    if qh is None and ph is None:
        return None
    world, rank = dist_info() if gather else (1, 0)
    gat = (lambda x: all_gather_no_grad(x)) if world > 1 else (lambda x: x)
    ref = ph if ph is not None else qh
    mask_p = torch.zeros(B, world * B, dtype=torch.bool, device=ref.device)
    if ph is not None:
        mask_p |= ph[:, None] == gat(ph)[None, :]  # another copy of my positive
    if qh is not None:
        mask_p |= qh[:, None] == gat(qh)[None, :]  # the positive of another copy of my query
    rows = torch.arange(B, device=ref.device)
    mask_p[rows, rows + rank * B] = False  # the label column stays
    if not K:
        return mask_p
    if nh is None:
        mask_n = torch.zeros(B, world * B * K, dtype=torch.bool, device=ref.device)
    else:
        mask_n = ph[:, None] == gat(nh.reshape(B * K))[None, :]  # a hard negative that is my positive's text
    return torch.cat([mask_p, mask_n], dim=1)


def _masked_kl(t_logp: torch.Tensor, s_logp: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """KL(teacher || student) per row, batch mean, of two log-distributions over the same columns; masked
    columns (both -inf) contribute nothing (and no NaN to the gradient)."""
    if mask is None:
        return F.kl_div(s_logp, t_logp, reduction="batchmean", log_target=True)
    t_c, s_c = t_logp.masked_fill(mask, 0.0), s_logp.masked_fill(mask, 0.0)
    return (t_c.exp() * (t_c - s_c)).masked_fill(mask, 0.0).sum() / t_logp.shape[0]


def _matryoshka_plan(dims, weights, D: int) -> list[tuple[int, float]]:
    """[(dim, weight)] of a Matryoshka loss; checks every dim is in 1..D, the list strictly ordered (either way),
    the weights one per dim. Without dims: [(D, 1.0)], the plain loss."""
    if dims is None:
        if weights is not None:
            raise ValueError("contrastive_loss: matryoshka_weights given without matryoshka_dims")
        return [(D, 1.0)]
    dims = [int(d) for d in dims]
    if not dims:
        raise ValueError("contrastive_loss: matryoshka_dims is empty (omit it for the plain loss)")
    bad = [d for d in dims if not 1 <= d <= D]
    if bad:
        raise ValueError(f"contrastive_loss: matryoshka_dims {dims}: {bad} outside 1..{D} (the embedding dim)")
    steps = [b - a for a, b in zip(dims, dims[1:])]
    if not (all(s < 0 for s in steps) or all(s > 0 for s in steps)):
        raise ValueError(f"contrastive_loss: matryoshka_dims {dims} must be strictly ordered, e.g. [384, 256, 128, 64]")
    if weights is None:
        weights = [1.0] * len(dims)
    weights = [float(w) for w in weights]
    if len(weights) != len(dims):
        raise ValueError(f"contrastive_loss: {len(weights)} matryoshka_weights {weights} for {len(dims)} "
                         f"matryoshka_dims {dims}; give one weight per dim")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"contrastive_loss: matryoshka_weights {weights} must be finite and >= 0")
    return list(zip(dims, weights))


def _prefix(x: Optional[torch.Tensor], d: int, full: int) -> Optional[torch.Tensor]:
    """The first d channels of x (..., D), L2-renormalised; x itself when d is the whole vector."""
    if x is None or d == full:
        return x
    return F.normalize(x[..., :d], p=2, dim=-1)


def contrastive_loss(
    query_emb: torch.Tensor,
    passage_emb: torch.Tensor,
    negative_emb: Optional[torch.Tensor] = None,
    *,
    temperature: Union[float, torch.Tensor] = 0.01,
    teacher_scores: Optional[torch.Tensor] = None,
    alpha: float = 0.2,
    contrastive_weight: float = 1.0,
    teacher_temperature: float = 1.0,
    symmetric: bool = False,
    gather: bool = False,
    teacher_query: Optional[torch.Tensor] = None,
    teacher_passage: Optional[torch.Tensor] = None,
    teacher_negative: Optional[torch.Tensor] = None,
    teacher_embed_weight: float = 0.0,
    teacher_score_weight: float = 0.0,
    teacher_score_temperature: float = 0.05,
    matryoshka_dims: Optional[Sequence[int]] = None,
    matryoshka_weights: Optional[Sequence[float]] = None,
    matryoshka_teacher_embed: Literal["prefix", "full"] = "prefix",
    query_hashes: Optional[torch.Tensor] = None,
    passage_hashes: Optional[torch.Tensor] = None,
    negative_hashes: Optional[torch.Tensor] = None,
    return_stats: bool = False,
):
    """InfoNCE with in-batch (and hard) negatives, optional distillation; returns the scalar loss.

    Args:
        query_emb: (B, D) L2-normalised query embeddings (this rank's).
        passage_emb: (B, D) L2-normalised positives; row i is query i's positive.
        negative_emb: optional (B, K, D) L2-normalised hard negatives; [i, k] belongs to query i.
        temperature: tau (float, or a 0-d tensor for a learnable temperature); logits = cosine / tau.
        teacher_scores: optional (B, 1+K) teacher logits over each query's own candidates, positive first.
            With them: loss = alpha * InfoNCE + KL(softmax(teacher / teacher_temperature) || softmax(student)),
            where the student logits are the query's cosines to its own 1+K candidates / tau; batch mean.
        alpha: weight of InfoNCE when distilling (LongEmbed / E5 stage 2: 0.2).
        contrastive_weight: weight of InfoNCE without teacher_scores (stage 1): loss = contrastive_weight *
            InfoNCE + the teacher terms. 0 = pure distillation from a frozen teacher (the caller's teacher terms
            are the whole loss); the InfoNCE value is still computed and reported.
        teacher_temperature: divides teacher_scores before the softmax (1.0: the scores are logits as given).
        symmetric: add the passage->query direction (each local positive against all global queries) and
            average the two directions.
        gather: score each local query against the GLOBAL batch's passages and negatives (all ranks), gathered
            with gradient; labels are offset by rank. No-op without an initialised process group.
        teacher_query / teacher_passage / teacher_negative: optional (B, D) / (B, D) / (B, K, D) L2-normalised
            embeddings of the same texts by a frozen teacher (no gradient). With them two terms can be added:
            teacher_embed_weight * mean over this rank's queries, passages (and negatives) of
            (1 - cos(student, teacher)) -- dims must match; and
            teacher_score_weight * KL(softmax(teacher scores / teacher_score_temperature) || softmax(student
            logits)) over each local query's row of the GLOBAL score matrix: the teacher's passages and negatives
            are gathered like the student's (without gradient), so both rows have the same W*B*(1+K) columns.
        teacher_score_temperature: divides the teacher's cosine scores (a cosine teacher: e.g. 0.05).
        matryoshka_dims: optional strictly ordered prefix sizes, e.g. [384, 256, 128, 64] (each in 1..D). The
            loss above is computed on each prefix of every embedding, L2-renormalised (x[..., :d] / |x[..., :d]|),
            and the per-dim losses are summed with matryoshka_weights. Every term is per dim: InfoNCE, the
            teacher_scores KL, the teacher embed term (student prefix vs the teacher's prefix, renormalised) and
            the teacher score KL (the student's prefix logits against the teacher's full-dim scores: the target
            does not shrink with the student). Embeddings are gathered once at full D and cut after, so this is
            exact under gather and GradCache (it only reads the cached full embeddings).
        matryoshka_weights: one weight per matryoshka_dims entry (default: all 1.0).
        matryoshka_teacher_embed: where the teacher embed term is computed with matryoshka_dims: "prefix" (at
            every dim, as above) or "full" (at the largest of matryoshka_dims only). A teacher that was not
            Matryoshka-trained has weak prefixes, and "prefix" pulls the student's prefixes to them; "full" leaves
            the small dims to InfoNCE and the score KL (whose target is the teacher's full-dim scores at every dim).
        query_hashes / passage_hashes / negative_hashes: optional int64 (B,) / (B,) / (B, K) hashes of the
            normalised query, positive and hard-negative texts (the loader's `hashes`), gathered like the
            embeddings: false negatives are removed from every query's candidates (module docstring). Each is
            optional; negative_hashes need passage_hashes.
        return_stats: also return a ContrastiveStats dict (detached): the diagnostics of the largest dim, plus
            `loss@<d>` (the unweighted loss of each Matryoshka dim) with matryoshka_dims, and with hashes
            `false_negatives_masked` (masked query->candidate entries of this rank's rows).

    Each query's candidates are all (W*)B passages followed by all (W*)B*K negatives; its label is its own
    positive. A query's own hard negatives are therefore scored as negatives, never as its positive.
    """
    if query_emb.dim() != 2 or passage_emb.shape != query_emb.shape:
        raise ValueError(f"contrastive_loss: query_emb {tuple(query_emb.shape)} and passage_emb "
                         f"{tuple(passage_emb.shape)} must both be (B, D)")
    B, D = query_emb.shape
    if B == 0:
        raise ValueError("contrastive_loss: empty batch")
    K = 0
    if negative_emb is not None:
        if negative_emb.dim() != 3 or negative_emb.shape[0] != B or negative_emb.shape[2] != D:
            raise ValueError(f"contrastive_loss: negative_emb must be (B={B}, K, D={D}), got {tuple(negative_emb.shape)}")
        K = negative_emb.shape[1]
    if teacher_scores is not None:
        if negative_emb is None:
            raise ValueError("contrastive_loss: teacher_scores need negative_emb (distillation is over 1+K candidates)")
        if tuple(teacher_scores.shape) != (B, 1 + K):
            raise ValueError(f"contrastive_loss: teacher_scores must be (B={B}, 1+K={1 + K}), got {tuple(teacher_scores.shape)}")
    if (teacher_embed_weight or teacher_score_weight) and (teacher_query is None or teacher_passage is None
                                                           or (K and teacher_negative is None)):
        raise ValueError("contrastive_loss: teacher terms need teacher_query, teacher_passage (and teacher_negative "
                         "with hard negatives)")
    if teacher_query is not None and teacher_query.shape[-1] != D:
        raise ValueError(f"contrastive_loss: teacher embeddings have dim {teacher_query.shape[-1]}, the student's {D}")
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"contrastive_loss: temperature must be > 0, got {temperature}")
    if contrastive_weight < 0:
        raise ValueError(f"contrastive_loss: contrastive_weight must be >= 0, got {contrastive_weight}")
    plan = _matryoshka_plan(matryoshka_dims, matryoshka_weights, D)
    d_top = max(d for d, _ in plan)  # the largest trained dim
    if matryoshka_teacher_embed not in ("prefix", "full"):
        raise ValueError(f"contrastive_loss: matryoshka_teacher_embed must be 'prefix' or 'full', "
                         f"got {matryoshka_teacher_embed!r}")
    fn_mask = false_negative_mask(query_hashes, passage_hashes, negative_hashes, B=B, K=K, gather=gather)
    own_mask = None  # (B, 1+K): the query's own hard negatives that are its positive's text
    if fn_mask is not None and K and negative_hashes is not None:
        own_mask = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=fn_mask.device),
                              negative_hashes == passage_hashes[:, None]], dim=1)
        if not own_mask.any():
            own_mask = None
    if fn_mask is not None and not fn_mask.any():
        fn_mask = None  # nothing to remove: the unmasked computation, bit for bit

    device_type = query_emb.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        q_full = query_emb.float()  # (B, D)
        p_full = passage_emb.float()  # (B, D)
        n_full = negative_emb.float().reshape(B * K, D) if K else None  # (B*K, D)
        world, rank = dist_info() if gather else (1, 0)
        # gathered once at full D; every Matryoshka prefix is cut from the gathered tensors
        p_all_full = all_gather_with_grad(p_full) if world > 1 else p_full  # (W*B, D)
        n_all_full = (all_gather_with_grad(n_full) if world > 1 else n_full) if K else None  # (W*B*K, D)
        q_all_full = (all_gather_with_grad(q_full) if world > 1 else q_full) if symmetric else None  # (W*B, D)
        tau = temperature.float() if torch.is_tensor(temperature) else float(temperature)
        labels = torch.arange(B, device=q_full.device) + rank * B  # (B,)
        t_score_logp = None
        if teacher_score_weight:  # the teacher's full-dim score rows: the same target at every Matryoshka dim
            tq = teacher_query.float()
            tp_all = all_gather_no_grad(teacher_passage.float()) if world > 1 else teacher_passage.float()
            t_cands = tp_all
            if K:
                tn = teacher_negative.float().reshape(B * K, D)
                t_cands = torch.cat([tp_all, all_gather_no_grad(tn) if world > 1 else tn], dim=0)
            t_logits = tq @ t_cands.T / teacher_score_temperature  # (B, W*B*(1+K))
            if fn_mask is not None:
                t_logits = t_logits.masked_fill(fn_mask, float("-inf"))
            t_score_logp = F.log_softmax(t_logits, dim=-1)

        def at_dim(d: int) -> dict:
            """Every term of the loss on the d-channel prefixes (renormalised; the inputs as given when d == D)."""
            q, p, n = _prefix(q_full, d, D), _prefix(p_full, d, D), _prefix(n_full, d, D)  # (B, d) (B, d) (B*K, d)
            p_all, n_all = _prefix(p_all_full, d, D), _prefix(n_all_full, d, D)
            cands = p_all if n_all is None else torch.cat([p_all, n_all], dim=0)  # (W*B*(1+K), d)
            logits = q @ cands.T / tau  # (B, W*B*(1+K))
            if fn_mask is not None:
                logits = logits.masked_fill(fn_mask, float("-inf"))
            infonce = F.cross_entropy(logits, labels)
            if symmetric:
                logits_p = p @ _prefix(q_all_full, d, D).T / tau  # (B, W*B)
                if fn_mask is not None:  # the two rules are symmetric: the passage-side mask is mask_p
                    logits_p = logits_p.masked_fill(fn_mask[:, : logits_p.shape[1]], float("-inf"))
                infonce = 0.5 * (infonce + F.cross_entropy(logits_p, labels))
            out = {"q": q, "p": p, "n": n, "logits": logits, "infonce": infonce,
                   "loss": infonce if contrastive_weight == 1.0 else contrastive_weight * infonce,
                   "kl": None, "teacher_embed": None, "teacher_kl": None}
            if teacher_scores is not None:
                own = torch.cat([p[:, None, :], n.view(B, K, d)], dim=1)  # (B, 1+K, d)
                student = torch.einsum("bd,bkd->bk", q, own) / tau  # (B, 1+K)
                t_own = teacher_scores.float() / teacher_temperature
                if own_mask is not None:
                    student = student.masked_fill(own_mask, float("-inf"))
                    t_own = t_own.masked_fill(own_mask, float("-inf"))
                t_logp = F.log_softmax(t_own, dim=-1)
                s_logp = F.log_softmax(student, dim=-1)
                out["kl"] = _masked_kl(t_logp, s_logp, own_mask)  # KL(teacher || student)
                out["loss"] = alpha * infonce + out["kl"]
            if teacher_embed_weight and (matryoshka_teacher_embed == "prefix" or d == d_top):
                tq_d, tp_d = _prefix(teacher_query.float(), d, D), _prefix(teacher_passage.float(), d, D)
                cos = [(q * tq_d).sum(-1), (p * tp_d).sum(-1)]
                if K:
                    tn_d = _prefix(teacher_negative.float(), d, D)  # (B, K, d)
                    cos.append((n.view(B, K, d) * tn_d).sum(-1).reshape(-1))
                out["teacher_embed"] = (1.0 - torch.cat(cos)).mean()
                out["loss"] = out["loss"] + teacher_embed_weight * out["teacher_embed"]
            if teacher_score_weight:
                out["teacher_kl"] = _masked_kl(t_score_logp, F.log_softmax(logits, dim=-1), fn_mask)
                out["loss"] = out["loss"] + teacher_score_weight * out["teacher_kl"]
            return out

        per_dim, loss, top = {}, None, None
        for d, w in plan:
            r = at_dim(d)
            per_dim[d] = r["loss"]
            term = r["loss"] if w == 1.0 else w * r["loss"]
            loss = term if loss is None else loss + term
            if d == d_top:
                top = r
    if not return_stats:
        return loss
    q, p, n, logits, labels_ = top["q"], top["p"], top["n"], top["logits"], labels
    with torch.no_grad():  # at most one extra (B, N) buffer: cheap next to the loss at a 16k batch
        pos = (q * p).sum(-1)  # (B,)
        lg = logits.detach()  # (B, N) = cosine / tau
        rows = torch.arange(B, device=lg.device)
        n_cands = lg.shape[1]
        own = lg[rows, labels_]  # (B,)
        if fn_mask is None:
            neg_mean = (lg.sum() - own.sum()) / max(1, B * (n_cands - 1))
        else:  # false negatives are not negatives: out of the mean (their logits are -inf)
            kept = lg.masked_fill(fn_mask, 0.0)
            neg_mean = (kept.sum() - own.sum()) / max(1, B * (n_cands - 1) - int(fn_mask.sum()))
            del kept
        masked = lg.clone()
        masked[rows, labels_] = float("-inf")
        hardest = masked.amax(-1) if n_cands > 1 else own
        hardest = torch.where(torch.isfinite(hardest), hardest, own)  # a row whose negatives were all removed
        correct = (masked.amax(-1) < own) if n_cands > 1 else torch.ones_like(own, dtype=torch.bool)
        del masked
        stats = ContrastiveStats(
            infonce=top["infonce"].detach(),
            pos_sim=pos.mean(),
            neg_sim=neg_mean * tau,
            hardest_neg_sim=(hardest * tau).mean(),
            accuracy=correct.float().mean(),
        )
        if K:
            stats["hard_neg_sim"] = torch.einsum("bd,bkd->bk", q, n.view(B, K, d_top)).mean()
        for key in ("kl", "teacher_embed", "teacher_kl"):
            if top[key] is not None:
                stats[key] = top[key].detach()
        if query_hashes is not None or passage_hashes is not None:
            stats["false_negatives_masked"] = (torch.zeros((), device=lg.device) if fn_mask is None
                                               else fn_mask.sum().float())
        if matryoshka_dims is not None:
            for d, v in per_dim.items():
                stats[f"loss@{d}"] = v.detach()
    return loss, stats


def layered_contrastive_loss(
    query_emb: torch.Tensor,
    passage_emb: torch.Tensor,
    negative_emb: Optional[torch.Tensor] = None,
    *,
    layers: Sequence[int],
    return_stats: bool = False,
    **kwargs,
):
    """2-D Matryoshka (Starbucks): contrastive_loss on the embedding of each of several layers, summed.

    query_emb / passage_emb: (B, S, D) and negative_emb (B, K, S, D): the pooled, L2-normalised embeddings of the
    S = len(layers) layers (1-based encoder layer indices, small to large). kwargs go to contrastive_loss for every
    layer (matryoshka_dims / matryoshka_weights, teacher terms, gather...): the fixed list of (layer, dim) pairs is
    layers x dims, every pair used in every step. Returns the summed loss; with return_stats the diagnostics of
    the last (largest) layer, `loss@L<l>` per layer and, with matryoshka_dims, `loss@L<l>:<d>` per pair.
    """
    S = len(layers)
    if query_emb.dim() != 3 or query_emb.shape[1] != S or passage_emb.shape != query_emb.shape:
        raise ValueError(f"layered_contrastive_loss: query_emb {tuple(query_emb.shape)} and passage_emb "
                         f"{tuple(passage_emb.shape)} must both be (B, S={S}, D) for layers {list(layers)}")
    if negative_emb is not None and (negative_emb.dim() != 4 or negative_emb.shape[2] != S):
        raise ValueError(f"layered_contrastive_loss: negative_emb must be (B, K, S={S}, D), got "
                         f"{tuple(negative_emb.shape)}")
    total, stats = None, ContrastiveStats()
    for s, layer in enumerate(layers):
        n = None if negative_emb is None else negative_emb[:, :, s]  # (B, K, D)
        loss, st = contrastive_loss(query_emb[:, s], passage_emb[:, s], n, return_stats=True, **kwargs)
        total = loss if total is None else total + loss
        stats[f"loss@L{layer}"] = loss.detach()
        for k, v in st.items():
            if k.startswith("loss@"):
                stats[f"loss@L{layer}:{k[5:]}"] = v
            elif s == S - 1:
                stats[k] = v
    return (total, stats) if return_stats else total
