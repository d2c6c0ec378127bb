"""GradCache: same parameter gradients as no cache; dropout masks replayed; hard negatives kept; NaN handling."""

from __future__ import annotations

import pytest
import torch

from ropebert.model import RopeBertModel
from ropebert.pipelines.train.gradcache import allreduce_gradients, contrastive_step, split_batch
from ropebert.pipelines.train.loss import contrastive_loss
from tests.conftest import padded_batch, tiny_config

B, K = 6, 3


def _groups(with_negatives=True):
    q = padded_batch([4, 9, 3, 7, 5, 8], seed=1)
    p = padded_batch([12, 5, 7, 10, 3, 6], seed=2)
    g = {"query": {"input_ids": q[0], "attention_mask": q[1]}, "passage": {"input_ids": p[0], "attention_mask": p[1]}}
    if with_negatives:
        n = padded_batch([3 + (i * 5) % 11 for i in range(B * K)], seed=3)
        g["negatives"] = {"input_ids": n[0], "attention_mask": n[1]}
    return g


def _loss_fn(embs):
    n = embs["negatives"].view(B, K, -1) if "negatives" in embs else None
    return contrastive_loss(embs["query"], embs["passage"], n, temperature=0.05, return_stats=True)


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _model(dropout=0.0):
    torch.manual_seed(0)
    return RopeBertModel(tiny_config(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)).train()


@pytest.mark.parametrize("with_negatives", [False, True])
def test_gradcache_equals_no_cache(with_negatives):
    ref = _model()
    r0 = contrastive_step(ref.embed, _groups(with_negatives), _loss_fn, chunk_size=None)
    gc = _model()
    r1 = contrastive_step(gc.embed, _groups(with_negatives), _loss_fn, chunk_size=2)
    assert r0.finite and r1.finite
    torch.testing.assert_close(r1.loss, r0.loss, rtol=1e-6, atol=1e-6)
    g0, g1 = _grads(ref), _grads(gc)
    assert set(g0) == set(g1) and len(g0) == len(list(ref.parameters()))
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_hard_negatives_contribute_gradient():
    """The negatives group is embedded and receives gradient (contrastors' GradCache drops it)."""
    m = _model()
    seen = []

    def embed(ids, mask):
        seen.append(ids.shape[0])
        return m.embed(ids, mask)

    contrastive_step(embed, _groups(True), _loss_fn, chunk_size=4)
    # 1st pass: query 6 -> 4+2, passage 4+2, negatives 18 -> 4*4+2; replay: the same again
    assert sum(seen) == 2 * (B + B + B * K)
    without = _model()
    contrastive_step(without.embed, _groups(False), _loss_fn, chunk_size=4)
    diff = max((m.get_parameter(k).grad - without.get_parameter(k).grad).abs().max().item() for k, _ in m.named_parameters())
    assert diff > 1e-6  # the negatives changed the gradient


def test_dropout_masks_replayed():
    """With dropout on, GradCache's gradients equal autograd through the same chunked forwards (same RNG order):
    the replay pass must reproduce the first pass's masks exactly."""
    groups = _groups(True)
    torch.manual_seed(123)
    gc = _model(dropout=0.3)
    torch.manual_seed(123)
    rgc = contrastive_step(gc.embed, groups, _loss_fn, chunk_size=4)

    ref = _model(dropout=0.3)
    torch.manual_seed(123)
    embs = {}
    for name, b in groups.items():
        embs[name] = torch.cat([ref.embed(c["input_ids"], c["attention_mask"]) for c in split_batch(b, 4)])
    loss, _ = _loss_fn(embs)
    loss.backward()
    torch.testing.assert_close(rgc.loss, loss.detach())
    for k, p in ref.named_parameters():
        torch.testing.assert_close(gc.get_parameter(k).grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # and dropout really was active: another seed gives another loss
    torch.manual_seed(7)
    other = contrastive_step(_model(dropout=0.3).embed, groups, _loss_fn, chunk_size=4)
    assert other.loss.item() != rgc.loss.item()


def test_rng_state_after_step_is_that_of_the_first_pass():
    m = _model(dropout=0.3)
    torch.manual_seed(5)
    contrastive_step(m.embed, _groups(False), _loss_fn, chunk_size=2)
    after_gc = torch.rand(3)
    m2 = _model(dropout=0.3)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, b in _groups(False).items():
            for c in split_batch(b, 2):
                m2.embed(c["input_ids"], c["attention_mask"])
    torch.testing.assert_close(torch.rand(3), after_gc)


def test_nonfinite_loss_produces_no_gradient():
    m = _model()

    def nan_loss(embs):
        loss, stats = _loss_fn(embs)
        return loss * float("nan"), stats

    for chunk in (None, 2):
        res = contrastive_step(m.embed, _groups(True), nan_loss, chunk_size=chunk)
        assert not res.finite
        assert all(p.grad is None for p in m.parameters())


def test_split_batch_trims_each_chunk():
    ids, mask = padded_batch([2, 9, 3, 3], seed=0)
    parts = split_batch({"input_ids": ids, "attention_mask": mask}, 2)
    assert [tuple(p["input_ids"].shape) for p in parts] == [(2, 9), (2, 3)]
    assert allreduce_gradients(_model().parameters()) == 0  # no process group: no collective


@pytest.mark.parametrize("with_negatives", [False, True])
def test_matryoshka_gradcache_equals_no_cache(with_negatives):
    """The Matryoshka loss reads only the cached full embeddings: GradCache gives the uncached gradients."""
    def loss_fn(embs):
        n = embs["negatives"].view(B, K, -1) if "negatives" in embs else None
        return contrastive_loss(embs["query"], embs["passage"], n, temperature=0.05, symmetric=True,
                                matryoshka_dims=[32, 16, 8, 4], matryoshka_weights=[1.0, 1.0, 0.5, 0.5],
                                return_stats=True)

    ref = _model()
    r0 = contrastive_step(ref.embed, _groups(with_negatives), loss_fn, chunk_size=None)
    gc = _model()
    r1 = contrastive_step(gc.embed, _groups(with_negatives), loss_fn, chunk_size=2)
    plain = contrastive_step(_model().embed, _groups(with_negatives), _loss_fn, chunk_size=None)
    assert r0.finite and r1.finite and r0.loss.item() > plain.loss.item()  # three more weighted terms
    torch.testing.assert_close(r1.loss, r0.loss, rtol=1e-6, atol=1e-6)
    assert set(r1.stats) >= {"loss@32", "loss@16", "loss@8", "loss@4"}
    g0, g1 = _grads(ref), _grads(gc)
    assert set(g0) == set(g1) and len(g0) == len(list(ref.parameters()))
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("with_negatives", [False, True])
def test_false_negative_masking_gradcache_equals_no_cache(with_negatives):
    """Masking reads hashes, not embeddings: GradCache still gives the uncached loss and gradients."""
    ph = torch.tensor([7, 8, 7, 9, 10, 8])  # passages 0/2 and 1/5 are duplicates
    qh = torch.tensor([1, 2, 3, 1, 5, 6])  # queries 0/3 are duplicates
    nh = torch.arange(100, 100 + B * K).view(B, K)
    nh[4, 1] = 9  # a hard negative of query 4 is query 3's positive

    def loss_fn(embs):
        n = embs["negatives"].view(B, K, -1) if "negatives" in embs else None
        return contrastive_loss(embs["query"], embs["passage"], n, temperature=0.05, symmetric=True,
                                passage_hashes=ph, query_hashes=qh, negative_hashes=nh if n is not None else None,
                                return_stats=True)

    ref = _model()
    r0 = contrastive_step(ref.embed, _groups(with_negatives), loss_fn, chunk_size=None)
    gc = _model()
    r1 = contrastive_step(gc.embed, _groups(with_negatives), loss_fn, chunk_size=2)
    plain = contrastive_step(_model().embed, _groups(with_negatives), _loss_fn, chunk_size=None)
    assert r0.finite and r1.finite and abs(r0.loss.item() - plain.loss.item()) > 1e-4
    # 0/2, 1/5 (4) + the positives of 0/3 for each other (2) [+ n[4,1] for query 3]
    assert r1.stats["false_negatives_masked"].item() == (7.0 if with_negatives else 6.0)
    torch.testing.assert_close(r1.loss, r0.loss, rtol=1e-6, atol=1e-6)
    g0, g1 = _grads(ref), _grads(gc)
    assert set(g0) == set(g1) and len(g0) == len(list(ref.parameters()))
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
