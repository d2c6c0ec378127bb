"""contrastive_loss: hand-computed references, label layout, distillation, and 2 gloo ranks == 1 process."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from ropebert.pipelines.train.loss import contrastive_loss
from tests.conftest import padded_batch, tiny_config


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _reference(q, p, n=None, tau=0.01, teacher=None, alpha=0.2, symmetric=False):
    """Loops, no batching tricks: each query's candidates are all passages then all negatives."""
    B = q.shape[0]
    cands = [p[j] for j in range(B)]
    if n is not None:
        cands += [n[j, k] for j in range(B) for k in range(n.shape[1])]
    total = 0.0
    for i in range(B):
        s = torch.stack([q[i] @ c for c in cands]) / tau
        total += -(s[i] - torch.logsumexp(s, 0))
    loss = total / B
    if symmetric:
        tot2 = 0.0
        for i in range(B):
            s = torch.stack([p[i] @ q[j] for j in range(B)]) / tau
            tot2 += -(s[i] - torch.logsumexp(s, 0))
        loss = 0.5 * (loss + tot2 / B)
    if teacher is not None:
        kl = 0.0
        for i in range(B):
            own = torch.stack([q[i] @ p[i]] + [q[i] @ n[i, k] for k in range(n.shape[1])]) / tau
            pt = torch.softmax(teacher[i], 0)
            kl += (pt * (torch.log(pt) - torch.log_softmax(own, 0))).sum()
        loss = alpha * loss + kl / B
    return loss


def test_pairs_match_reference():
    q, p = _unit(6, 16, seed=1), _unit(6, 16, seed=2)
    got = contrastive_loss(q, p, temperature=0.05)
    assert torch.allclose(got, _reference(q, p, tau=0.05), atol=1e-5)
    got_sym = contrastive_loss(q, p, temperature=0.05, symmetric=True)
    assert torch.allclose(got_sym, _reference(q, p, tau=0.05, symmetric=True), atol=1e-5)


def test_hard_negatives_and_distillation_match_reference():
    B, K, D = 4, 7, 16
    q, p, n = _unit(B, D, seed=1), _unit(B, D, seed=2), _unit(B, K, D, seed=3)
    teacher = torch.randn(B, 1 + K, generator=torch.Generator().manual_seed(4)) * 3
    got = contrastive_loss(q, p, n, temperature=0.02)
    assert torch.allclose(got, _reference(q, p, n, tau=0.02), atol=1e-4)
    got = contrastive_loss(q, p, n, temperature=0.02, teacher_scores=teacher, alpha=0.2)
    assert torch.allclose(got, _reference(q, p, n, tau=0.02, teacher=teacher, alpha=0.2), atol=1e-4)


def test_label_layout_positive_never_scored_as_negative():
    """Query i's own hard negatives are near-copies of the query: the loss must be high (they are negatives),
    and a perfect positive with orthogonal negatives gives ~0 loss (the label is the positive)."""
    B, K, D = 3, 7, 24
    q = F.normalize(torch.eye(D)[:B] + 0.0, dim=-1)
    p = q.clone()  # perfect positives
    far = torch.zeros(B, K, D)
    far[:, :, -1] = 1.0  # orthogonal to every query
    low = contrastive_loss(q, p, far, temperature=0.01)
    assert low.item() < 1e-6
    n_close = q[:, None, :].expand(B, K, D).clone()  # negatives identical to the query (and to its positive)
    high = contrastive_loss(q, p, n_close, temperature=0.01)
    assert math.isclose(high.item(), math.log(1 + K), rel_tol=1e-4)  # the positive ties with its K copies
    _, stats = contrastive_loss(q, p, far, temperature=0.01, return_stats=True)
    assert stats["accuracy"].item() == 1.0 and stats["pos_sim"].item() == pytest.approx(1.0)


def test_fp32_under_bf16_autocast():
    q, p = _unit(4, 8, seed=5).bfloat16(), _unit(4, 8, seed=6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = contrastive_loss(q, p)
    assert got.dtype == torch.float32
    assert torch.allclose(got, _reference(q.float(), p.float()), atol=1e-4)


def test_bad_shapes_are_errors():
    q, p = _unit(4, 8), _unit(4, 8)
    with pytest.raises(ValueError, match="negative_emb"):
        contrastive_loss(q, p, _unit(3, 7, 8))
    with pytest.raises(ValueError, match="teacher_scores"):
        contrastive_loss(q, p, _unit(4, 7, 8), teacher_scores=torch.zeros(4, 7))
    with pytest.raises(ValueError, match="teacher_scores need negative_emb"):
        contrastive_loss(q, p, teacher_scores=torch.zeros(4, 8))
    with pytest.raises(ValueError, match="temperature"):
        contrastive_loss(q, p, temperature=0.0)


# -- Matryoshka: the sum of the single-dim losses, each on renormalised prefixes ---------------------------------


def _norm_prefix(x, d):
    return F.normalize(x[..., :d], dim=-1)


@pytest.mark.parametrize("mode", ["prefix", "full"])
def test_matryoshka_equals_weighted_sum_of_single_dim_losses(mode):
    """Every term (InfoNCE both ways, shard-score KL, teacher embed and teacher score KL) per dim, summed with the
    weights; the teacher score target stays the teacher's full-dim score row. matryoshka_teacher_embed="full":
    the teacher embed term at the largest dim only."""
    B, K, D = 4, 3, 16
    q, p, n = _unit(B, D, seed=1), _unit(B, D, seed=2), _unit(B, K, D, seed=3)
    tq, tp, tn = _unit(B, D, seed=4), _unit(B, D, seed=5), _unit(B, K, D, seed=6)
    scores = torch.randn(B, 1 + K, generator=torch.Generator().manual_seed(7))
    dims, weights = [16, 8, 4], [1.0, 0.5, 0.25]
    kw = dict(temperature=0.05, teacher_scores=scores, alpha=0.3, symmetric=True)
    got, stats = contrastive_loss(q, p, n, **kw, teacher_query=tq, teacher_passage=tp, teacher_negative=tn,
                                  teacher_embed_weight=0.7, teacher_score_weight=0.4, teacher_score_temperature=0.1,
                                  matryoshka_dims=dims, matryoshka_weights=weights, matryoshka_teacher_embed=mode,
                                  return_stats=True)
    t_cands = torch.cat([tp, tn.reshape(B * K, D)])
    t_logp = torch.log_softmax(tq @ t_cands.T / 0.1, dim=-1)  # full-dim teacher rows
    want = 0.0
    for d, w in zip(dims, weights):
        qd, pd, nd = _norm_prefix(q, d), _norm_prefix(p, d), _norm_prefix(n, d)
        single = _reference(qd, pd, nd, tau=0.05, teacher=scores, alpha=0.3, symmetric=True)
        embed = 1 - torch.cat([(qd * _norm_prefix(tq, d)).sum(-1), (pd * _norm_prefix(tp, d)).sum(-1),
                               (nd * _norm_prefix(tn, d)).sum(-1).reshape(-1)]).mean()
        s_logp = torch.log_softmax(qd @ torch.cat([pd, nd.reshape(B * K, d)]).T / 0.05, dim=-1)
        tkl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        total_d = single + (0.7 * embed if mode == "prefix" or d == 16 else 0.0) + 0.4 * tkl
        assert stats[f"loss@{d}"].item() == pytest.approx(total_d.item(), rel=1e-4), d
        want = want + w * total_d
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    # the plain call at d = D is the first term; the prefixes really differ from it
    full = contrastive_loss(q, p, n, **kw, teacher_query=tq, teacher_passage=tp, teacher_negative=tn,
                            teacher_embed_weight=0.7, teacher_score_weight=0.4, teacher_score_temperature=0.1)
    assert full.item() == pytest.approx(stats["loss@16"].item(), rel=1e-6)
    assert abs(stats["loss@4"].item() - stats["loss@16"].item()) > 1e-3
    assert stats["infonce"].item() == pytest.approx(contrastive_loss(q, p, n, temperature=0.05, symmetric=True).item(),
                                                    rel=1e-6)  # the diagnostics are the largest dim's


def test_matryoshka_bad_arguments_are_errors():
    q, p = _unit(4, 8), _unit(4, 8)
    with pytest.raises(ValueError, match=r"\[16\] outside 1..8"):
        contrastive_loss(q, p, matryoshka_dims=[16, 4])
    with pytest.raises(ValueError, match="strictly ordered"):
        contrastive_loss(q, p, matryoshka_dims=[4, 8, 2])
    with pytest.raises(ValueError, match="2 matryoshka_weights"):
        contrastive_loss(q, p, matryoshka_dims=[8, 4, 2], matryoshka_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="without matryoshka_dims"):
        contrastive_loss(q, p, matryoshka_weights=[1.0])
    with pytest.raises(ValueError, match="matryoshka_teacher_embed must be 'prefix' or 'full'"):
        contrastive_loss(q, p, matryoshka_dims=[8, 4], matryoshka_teacher_embed="top")


# -- false negatives: duplicates removed from the candidates, exactly --------------------------------------------

# B=5 queries, K=2 negatives; candidate columns: passages 0..4, then negative [j, k] at 5 + 2j + k
FN_PH = torch.tensor([10, 11, 12, 11, 14])  # passage 3 is passage 1's text
FN_QH = torch.tensor([20, 21, 22, 23, 20])  # query 4 is query 0's text
FN_NH = torch.tensor([[10, 30], [31, 32], [33, 10], [34, 35], [11, 36]])  # n[0,0], n[2,1] = p0; n[4,0] = p1
# what each query loses, by hand: q0 the positive of q4 (same query) and both copies of p0 among the negatives;
# q1 / q3 each other's positive and n[4,0]; q4 the positive of q0 (same query); q2 nothing
FN_DROP = {0: {4, 5, 10}, 1: {3, 13}, 2: set(), 3: {1, 13}, 4: {0}}
FN_DROP_SYM = {0: {4}, 1: {3}, 2: set(), 3: {1}, 4: {0}}  # passage i against the queries


def _masked_reference(q, p, n, drop, drop_sym, tau, symmetric=False, teacher=None, alpha=0.2, tq=None, tp=None,
                      tn=None, t_weight=0.0, t_temp=0.05):
    """Loops over explicit candidate lists: query i's row WITHOUT the columns in drop[i]."""
    B, K = q.shape[0], n.shape[1]
    cands = [p[j] for j in range(B)] + [n[j, k] for j in range(B) for k in range(K)]
    t_cands = None if tq is None else [tp[j] for j in range(B)] + [tn[j, k] for j in range(B) for k in range(K)]
    loss, loss_p, kl, tkl = 0.0, 0.0, 0.0, 0.0
    for i in range(B):
        keep = [c for c in range(len(cands)) if c not in drop[i]]
        s = torch.stack([q[i] @ cands[c] for c in keep]) / tau
        loss += -(s[keep.index(i)] - torch.logsumexp(s, 0))
        if symmetric:
            keep_q = [j for j in range(B) if j not in drop_sym[i]]
            sp = torch.stack([p[i] @ q[j] for j in keep_q]) / tau
            loss_p += -(sp[keep_q.index(i)] - torch.logsumexp(sp, 0))
        if teacher is not None:  # own candidates: positive + own negatives not dropped
            own = [0] + [1 + k for k in range(K) if B + i * K + k not in drop[i]]
            st = torch.log_softmax(torch.stack([q[i] @ (p[i] if c == 0 else n[i, c - 1]) for c in own]) / tau, 0)
            tt = torch.log_softmax(teacher[i, own], 0)
            kl += (tt.exp() * (tt - st)).sum()
        if t_weight:
            t_logp = torch.log_softmax(torch.stack([tq[i] @ t_cands[c] for c in keep]) / t_temp, 0)
            tkl += (t_logp.exp() * (t_logp - torch.log_softmax(s, 0))).sum()
    total = loss / B
    if symmetric:
        total = 0.5 * (total + loss_p / B)
    if teacher is not None:
        total = alpha * total + kl / B
    return total + t_weight * tkl / B


def test_false_negative_mask_by_hand():
    from ropebert.pipelines.train.loss import false_negative_mask

    m = false_negative_mask(FN_QH, FN_PH, FN_NH, B=5, K=2, gather=False)
    assert m.shape == (5, 15)
    assert {i: set(m[i].nonzero().flatten().tolist()) for i in range(5)} == FN_DROP
    only_p = false_negative_mask(None, FN_PH, None, B=5, K=2, gather=False)  # no query rule, no negative rule
    assert {i: set(only_p[i].nonzero().flatten().tolist()) for i in range(5)} == {0: set(), 1: {3}, 2: set(),
                                                                                    3: {1}, 4: set()}


def test_duplicated_passage_gives_the_loss_without_that_column():
    """Pairs: passage 3 is passage 1's text (different embeddings: only the hash decides). The masked loss is the
    loss of the batch with column 3 removed from query 1's candidates and column 1 from query 3's."""
    B, D = 5, 16
    q, p = _unit(B, D, seed=1), _unit(B, D, seed=2)
    ph = torch.tensor([10, 11, 12, 11, 14])
    got, stats = contrastive_loss(q, p, temperature=0.05, passage_hashes=ph, return_stats=True)
    drop = {0: set(), 1: {3}, 2: set(), 3: {1}, 4: set()}
    want = _masked_reference(q, p, torch.zeros(B, 0, D), drop, drop, tau=0.05)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert stats["false_negatives_masked"].item() == 2.0
    # exactly the batch without the duplicate column, seen from query 1: the same rows, column 3 gone
    keep = [0, 1, 2, 4]
    l1 = -torch.log_softmax(q[1] @ p[keep].T / 0.05, 0)[1]
    row1 = F.cross_entropy((q[1:2] @ p.T / 0.05).masked_fill(torch.tensor([[0, 0, 0, 1, 0]], dtype=torch.bool),
                                                             float("-inf")), torch.tensor([1]))
    assert row1.item() == pytest.approx(l1.item(), rel=1e-6)
    plain = contrastive_loss(q, p, temperature=0.05)
    assert abs(plain.item() - got.item()) > 1e-3  # the duplicate really counted as a negative before
    # no duplicates: bit for bit the unmasked loss, 0 masked
    g2, st2 = contrastive_loss(q, p, temperature=0.05, passage_hashes=torch.arange(5), query_hashes=torch.arange(5),
                               return_stats=True)
    assert g2.item() == plain.item() and st2["false_negatives_masked"].item() == 0.0


@pytest.mark.parametrize("symmetric", [False, True])
def test_false_negatives_with_hard_negatives_teacher_and_matryoshka(symmetric):
    """Every term drops the same columns: InfoNCE (both directions), the shard-score KL over the own 1+K
    candidates, the teacher score KL over the global row (out of both distributions), at every Matryoshka dim."""
    B, K, D = 5, 2, 16
    q, p, n = _unit(B, D, seed=1), _unit(B, D, seed=2), _unit(B, K, D, seed=3)
    tq, tp, tn = _unit(B, D, seed=4), _unit(B, D, seed=5), _unit(B, K, D, seed=6)
    scores = torch.randn(B, 1 + K, generator=torch.Generator().manual_seed(7))
    hashes = dict(query_hashes=FN_QH, passage_hashes=FN_PH, negative_hashes=FN_NH)
    kw = dict(temperature=0.05, symmetric=symmetric, teacher_scores=scores, alpha=0.3)
    tkw = dict(teacher_query=tq, teacher_passage=tp, teacher_negative=tn, teacher_score_weight=0.4,
               teacher_score_temperature=0.1)
    got, stats = contrastive_loss(q, p, n, **kw, **tkw, **hashes, return_stats=True)
    want = _masked_reference(q, p, n, FN_DROP, FN_DROP_SYM, 0.05, symmetric, scores, 0.3, tq, tp, tn, 0.4, 0.1)
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-5)
    assert stats["false_negatives_masked"].item() == 8.0
    assert stats["accuracy"].item() in {0.0, 0.2, 0.4, 0.6, 0.8, 1.0} and math.isfinite(stats["neg_sim"].item())
    # gradients are finite (no NaN from the -inf columns)
    qq = q.clone().requires_grad_(True)
    contrastive_loss(qq, p, n, **kw, **tkw, **hashes).backward()
    assert torch.isfinite(qq.grad).all() and qq.grad.abs().sum() > 0

    dims, weights = [16, 8, 4], [1.0, 0.5, 0.25]
    got_m = contrastive_loss(q, p, n, **kw, **tkw, **hashes, matryoshka_dims=dims, matryoshka_weights=weights)
    want_m = 0.0
    for d, w in zip(dims, weights):
        qd, pd, nd = _norm_prefix(q, d), _norm_prefix(p, d), _norm_prefix(n, d)
        at_d = _masked_reference(qd, pd, nd, FN_DROP, FN_DROP_SYM, 0.05, symmetric, scores, 0.3)
        # + 0.4 * the teacher score KL: the teacher's full-dim row against the student's prefix row
        with_t = _masked_reference(qd, pd, nd, FN_DROP, FN_DROP_SYM, 0.05, False, None, 0.3, tq, tp, tn, 0.4, 0.1)
        without_t = _masked_reference(qd, pd, nd, FN_DROP, FN_DROP_SYM, 0.05, False)
        want_m = want_m + w * (at_d + with_t - without_t)
    assert got_m.item() == pytest.approx(want_m.item(), rel=1e-5)


def test_bad_hashes_are_errors():
    from ropebert.errors import InputError

    q, p, n = _unit(4, 8), _unit(4, 8), _unit(4, 2, 8)
    with pytest.raises(InputError, match=r"passage_hashes must be an int64 tensor of shape \(4,\)"):
        contrastive_loss(q, p, passage_hashes=torch.arange(5))
    with pytest.raises(InputError, match="query_hashes must be an int64"):
        contrastive_loss(q, p, query_hashes=torch.arange(4).float())
    with pytest.raises(InputError, match="negative_hashes need passage_hashes"):
        contrastive_loss(q, p, n, negative_hashes=torch.zeros(4, 2, dtype=torch.long))


# -- 2 gloo ranks x B == 1 process x 2B (loss and every parameter gradient) -------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scenario_inputs(K: int):
    """8 queries/positives (+ 8*K negatives) of random ids, fixed by seed."""
    q = padded_batch([5, 9, 3, 7, 6, 4, 8, 2], seed=1)
    p = padded_batch([11, 4, 6, 9, 3, 12, 5, 7], seed=2)
    n = padded_batch([(3 + i % 9) for i in range(8 * K)], seed=3) if K else None
    return q, p, n


# duplicates across the two ranks (rows 0-3 on rank 0, 4-7 on rank 1): passage 4 = passage 1, passage 6 =
# passage 0, query 7 = query 2, negative [3, 0] = passage 5, negative [6, 1] = passage 0 (= passage 6, its own)
SC_PH = torch.tensor([100, 101, 102, 103, 101, 105, 100, 107])
SC_QH = torch.tensor([200, 201, 202, 203, 204, 205, 206, 202])


def _scenario_hashes(K):
    nh = torch.arange(8 * K).view(8, K) + 1000 if K else None
    if K:
        nh[3, 0], nh[6, 1] = 105, 100
    return SC_PH, SC_QH, nh


def _run_scenario(model, rows, K, distill, symmetric, gradcache_chunk, gather, dims=None, hashes=False):
    """Embeds the selected rows and runs one contrastive step; returns the loss (param grads accumulate)."""
    from ropebert.pipelines.train.gradcache import contrastive_step

    q, p, n = _scenario_inputs(K)
    sel = lambda b, r: {"input_ids": b[0][r], "attention_mask": b[1][r]}  # noqa: E731
    groups = {"query": sel(q, rows), "passage": sel(p, rows)}
    if K:
        nrows = torch.cat([torch.arange(i * K, (i + 1) * K) for i in rows.tolist()])
        groups["negatives"] = sel(n, nrows)
    B = len(rows)
    teacher = None
    if distill:
        teacher = torch.linspace(-1, 1, 8 * (1 + K)).view(8, 1 + K)[rows] * 2

    hk = {}
    if hashes:
        ph, qh, nh = _scenario_hashes(K)
        hk = dict(passage_hashes=ph[rows], query_hashes=qh[rows], negative_hashes=None if nh is None else nh[rows])

    def loss_fn(embs):
        neg = embs["negatives"].view(B, K, -1) if K else None
        return contrastive_loss(embs["query"], embs["passage"], neg, temperature=0.05, teacher_scores=teacher,
                                symmetric=symmetric, gather=gather, matryoshka_dims=dims,
                                matryoshka_weights=None if dims is None else [1.0, 0.5, 2.0][: len(dims)],
                                return_stats=True, **hk)

    res = contrastive_step(lambda i, m: model.embed(i, m), groups, loss_fn, chunk_size=gradcache_chunk)
    return (res.loss, res.stats.get("false_negatives_masked")) if hashes else res.loss


SCENARIOS = [  # (K, distill, symmetric, gradcache_chunk, matryoshka_dims, hashes)
    (0, False, False, None, None, False),
    (0, False, True, 3, None, False),
    (7, True, False, None, None, False),
    (7, False, True, 2, None, False),
    (7, True, True, 3, [32, 16, 8], False),
    (0, False, True, 3, None, True),
    (7, True, True, 2, [32, 16, 8], True),
]


def _dist_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)  # forked: no OpenMP pool inherited from the parent (GNU OpenMP is not fork-safe)
    import torch.distributed as dist

    from ropebert.model import RopeBertModel
    from ropebert.pipelines.train import gradcache

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    calls = {"n": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(t, *a, **kw):
        calls["n"] += 1
        calls.setdefault("sizes", []).append(t.numel())
        return real_all_reduce(t, *a, **kw)

    results = []
    for si, (K, distill, symmetric, chunk, dims, hashes) in enumerate(SCENARIOS):
        torch.manual_seed(0)
        model = RopeBertModel(tiny_config()).train()
        rows = torch.arange(rank * 4, (rank + 1) * 4)
        calls.clear()
        calls["n"] = 0
        gradcache.dist.all_reduce = counting_all_reduce
        loss = _run_scenario(model, rows, K, distill, symmetric, chunk, gather=True, dims=dims, hashes=hashes)
        masked = None
        if hashes:
            loss, masked = loss
            masked = masked.clone()
            real_all_reduce(masked)
        before = list(calls.get("sizes", []))
        n_grad_reduce = gradcache.allreduce_gradients(model.parameters())
        gradcache.dist.all_reduce = real_all_reduce
        total = sum(p.numel() for p in model.parameters())
        grad_reduces = [s for s in calls.get("sizes", []) if s == total]
        lsum = loss.clone()
        real_all_reduce(lsum)
        results.append({
            "loss": (lsum / world).item(),
            "grads": {k: v.grad.clone() for k, v in model.named_parameters()},
            "grad_allreduce_calls": len(grad_reduces), "returned": n_grad_reduce,
            "full_size_before": sum(1 for s in before if s == total),
            "masked": None if masked is None else masked.item(),
        })
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    from ropebert.model import RopeBertModel

    # fork: the workers inherit this process's modules (the test module is not importable by name: the repository
    # root is never put on sys.path)
    mp.start_processes(_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for si, (K, distill, symmetric, chunk, dims, hashes) in enumerate(SCENARIOS):
        torch.manual_seed(0)
        model = RopeBertModel(tiny_config()).train()
        loss = _run_scenario(model, torch.arange(8), K, distill, symmetric, None, gather=False, dims=dims,
                             hashes=hashes)
        if hashes:
            loss, masked = loss
            # by hand: p1/p4 and p0/p6 each mask each other (4), q2/q7 mask each other's positive (2); with
            # negatives also n[3,0] for q5 and n[6,1] for q0 and q6 (3)
            assert masked.item() == (9.0 if K else 6.0)
        for r in range(2):
            got = ranks[r][si]
            if hashes:
                assert got["masked"] == masked.item(), (si, r)  # the ranks' counts add up to the global one
            assert got["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-6), (si, r)
            # exactly one gradient all-reduce per step, and none before it (no per-chunk sync)
            assert got["grad_allreduce_calls"] == 1 and got["returned"] == 1 and got["full_size_before"] == 0, (si, got)
            for name, p in model.named_parameters():
                torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{si} {name}: {m}")
