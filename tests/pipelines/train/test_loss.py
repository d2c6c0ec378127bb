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


def test_matryoshka_equals_weighted_sum_of_single_dim_losses():
    """Every term (InfoNCE both ways, shard-score KL, teacher embed and teacher score KL) per dim, summed with the
    weights; the teacher score target stays the teacher's full-dim score row."""
    B, K, D = 4, 3, 16
    q, p, n = _unit(B, D, seed=1), _unit(B, D, seed=2), _unit(B, K, D, seed=3)
    tq, tp, tn = _unit(B, D, seed=4), _unit(B, D, seed=5), _unit(B, K, D, seed=6)
    scores = torch.randn(B, 1 + K, generator=torch.Generator().manual_seed(7))
    dims, weights = [16, 8, 4], [1.0, 0.5, 0.25]
    kw = dict(temperature=0.05, teacher_scores=scores, alpha=0.3, symmetric=True)
    got, stats = contrastive_loss(q, p, n, **kw, teacher_query=tq, teacher_passage=tp, teacher_negative=tn,
                                  teacher_embed_weight=0.7, teacher_score_weight=0.4, teacher_score_temperature=0.1,
                                  matryoshka_dims=dims, matryoshka_weights=weights, return_stats=True)
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
        total_d = single + 0.7 * embed + 0.4 * tkl
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


def _run_scenario(model, rows, K, distill, symmetric, gradcache_chunk, gather, dims=None):
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

    def loss_fn(embs):
        neg = embs["negatives"].view(B, K, -1) if K else None
        return contrastive_loss(embs["query"], embs["passage"], neg, temperature=0.05, teacher_scores=teacher,
                                symmetric=symmetric, gather=gather, matryoshka_dims=dims,
                                matryoshka_weights=None if dims is None else [1.0, 0.5, 2.0][: len(dims)],
                                return_stats=True)

    res = contrastive_step(lambda i, m: model.embed(i, m), groups, loss_fn, chunk_size=gradcache_chunk)
    return res.loss


SCENARIOS = [  # (K, distill, symmetric, gradcache_chunk, matryoshka_dims)
    (0, False, False, None, None),
    (0, False, True, 3, None),
    (7, True, False, None, None),
    (7, False, True, 2, None),
    (7, True, True, 3, [32, 16, 8]),
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
    for si, (K, distill, symmetric, chunk, dims) in enumerate(SCENARIOS):
        torch.manual_seed(0)
        model = RopeBertModel(tiny_config()).train()
        rows = torch.arange(rank * 4, (rank + 1) * 4)
        calls.clear()
        calls["n"] = 0
        gradcache.dist.all_reduce = counting_all_reduce
        loss = _run_scenario(model, rows, K, distill, symmetric, chunk, gather=True, dims=dims)
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
    for si, (K, distill, symmetric, chunk, dims) in enumerate(SCENARIOS):
        torch.manual_seed(0)
        model = RopeBertModel(tiny_config()).train()
        loss = _run_scenario(model, torch.arange(8), K, distill, symmetric, None, gather=False, dims=dims)
        for r in range(2):
            got = ranks[r][si]
            assert got["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-6), (si, r)
            # exactly one gradient all-reduce per step, and none before it (no per-chunk sync)
            assert got["grad_allreduce_calls"] == 1 and got["returned"] == 1 and got["full_size_before"] == 0, (si, got)
            for name, p in model.named_parameters():
                torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{si} {name}: {m}")
