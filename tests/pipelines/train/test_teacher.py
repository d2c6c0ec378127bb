"""Distillation from a frozen teacher: hand-computed loss terms, GradCache == uncached, 2 gloo ranks == 1 process,
the teacher is never trained nor checkpointed, and bad teachers are clear errors before training."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ropebert.pipelines.train.gradcache import contrastive_step
from ropebert.pipelines.train.loss import contrastive_loss, hidden_alignment
from ropebert.pipelines.train.teacher import Teacher, content_hash
from tests.conftest import padded_batch

# ---- the loss terms, by hand --------------------------------------------------------------------------------


def test_hidden_alignment_by_hand():
    torch.manual_seed(0)
    N, L, C = 2, 4, 3
    s = [torch.randn(N, L, C) for _ in range(3)]  # embeddings + 2 layers
    t = [torch.randn(N, L - 1, C) for _ in range(3)]  # the teacher saw one position less (its range)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    lm = [(1, 1), (2, 2)]
    got = hidden_alignment(s, t, mask, lm, "cos")
    want = []
    for i in range(N):
        per_layer = []
        for a, b in lm:
            toks = [j for j in range(L - 1) if mask[i, j]]
            vals = [1 - torch.dot(s[a][i, j], t[b][i, j]) / (s[a][i, j].norm() * t[b][i, j].norm()) for j in toks]
            per_layer.append(sum(vals) / len(toks))
        want.append(sum(per_layer) / len(lm))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)
    mse = hidden_alignment(s, t, mask, [(2, 1)], "mse")
    i, toks = 1, range(3)
    ref = sum(((s[2][i, j] - t[1][i, j]) ** 2).mean() / (t[1][i, j] ** 2).mean() for j in toks) / 3
    torch.testing.assert_close(mse[1], ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="kind must be"):
        hidden_alignment(s, t, mask, lm, "l1")


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_teacher_embed_and_score_terms_by_hand():
    B, K, D, tau, tt = 3, 2, 5, 0.05, 0.1
    q, p, n = _unit(B, D, seed=1), _unit(B, D, seed=2), _unit(B, K, D, seed=3)
    tq, tp, tn = _unit(B, D, seed=4), _unit(B, D, seed=5), _unit(B, K, D, seed=6)
    base = contrastive_loss(q, p, n, temperature=tau)
    emb_only = contrastive_loss(q, p, n, temperature=tau, teacher_query=tq, teacher_passage=tp, teacher_negative=tn,
                                teacher_embed_weight=0.5)
    cos = torch.cat([(q * tq).sum(-1), (p * tp).sum(-1), (n * tn).sum(-1).reshape(-1)])
    torch.testing.assert_close(emb_only, base + 0.5 * (1 - cos).mean())
    score_only, stats = contrastive_loss(q, p, n, temperature=tau, teacher_query=tq, teacher_passage=tp,
                                         teacher_negative=tn, teacher_score_weight=2.0, teacher_score_temperature=tt,
                                         return_stats=True)
    cands, tcands = torch.cat([p, n.reshape(B * K, D)]), torch.cat([tp, tn.reshape(B * K, D)])
    pt = torch.softmax(tq @ tcands.T / tt, -1)  # (B, B(1+K)): every in-batch passage and hard negative
    ls = torch.log_softmax(q @ cands.T / tau, -1)
    kl = (pt * (pt.log() - ls)).sum(-1).mean()
    torch.testing.assert_close(score_only, base + 2.0 * kl)
    torch.testing.assert_close(stats["teacher_kl"], kl)
    # contrastive_weight scales InfoNCE only; 0 leaves the teacher terms alone (pure distillation)
    both = dict(teacher_query=tq, teacher_passage=tp, teacher_negative=tn, teacher_embed_weight=0.5,
                teacher_score_weight=2.0, teacher_score_temperature=tt)
    full = contrastive_loss(q, p, n, temperature=tau, **both)
    torch.testing.assert_close(full, base + 0.5 * (1 - cos).mean() + 2.0 * kl)
    torch.testing.assert_close(contrastive_loss(q, p, n, temperature=tau, contrastive_weight=0.25, **both),
                               full - 0.75 * base)
    pure, pure_stats = contrastive_loss(q, p, n, temperature=tau, contrastive_weight=0.0, return_stats=True, **both)
    torch.testing.assert_close(pure, 0.5 * (1 - cos).mean() + 2.0 * kl)
    torch.testing.assert_close(pure_stats["infonce"], base)  # still reported
    with pytest.raises(ValueError, match="contrastive_weight must be >= 0"):
        contrastive_loss(q, p, n, contrastive_weight=-1.0)
    with pytest.raises(ValueError, match="teacher terms need"):
        contrastive_loss(q, p, n, teacher_query=tq, teacher_embed_weight=1.0)
    with pytest.raises(ValueError, match="dim 4, the student's 5"):
        contrastive_loss(q, p, teacher_query=tq[:, :4], teacher_passage=tp[:, :4], teacher_embed_weight=1.0)


# ---- through the training module ----------------------------------------------------------------------------


def _module(tiny_bert_dir, teacher, chunk, **weights):
    from ropebert.pipelines.train.module import RopeBertContrastive

    torch.manual_seed(0)
    m = RopeBertContrastive(str(tiny_bert_dir), teacher=str(teacher), gradcache_chunk=chunk, temperature=0.05,
                            gather=False, **weights)
    return m.eval()  # dropout off: the two paths are then the same function


def _groups():
    q, p = padded_batch([4, 9, 3, 7, 5, 8], vocab=1000, seed=1), padded_batch([12, 5, 7, 10, 3, 6], vocab=1000, seed=2)
    return {"query": {"input_ids": q[0], "attention_mask": q[1]}, "passage": {"input_ids": p[0], "attention_mask": p[1]}}


WEIGHTS = dict(teacher_hidden_weight=1.0, teacher_embed_weight=0.5, teacher_score_weight=0.7)


def _step(m):
    groups = _groups()
    embed, loss_fn, _ = m._step_functions({}, groups)
    return contrastive_step(embed, groups, loss_fn, chunk_size=m.hparams.gradcache_chunk)


@pytest.mark.parametrize("contrastive_weight", [1.0, 0.0], ids=["infonce", "pure-distillation"])
def test_gradcache_equals_uncached_with_teacher(tiny_bert_dir, contrastive_weight):
    w = dict(WEIGHTS, contrastive_weight=contrastive_weight)
    ref, gc = _module(tiny_bert_dir, tiny_bert_dir, None, **w), _module(tiny_bert_dir, tiny_bert_dir, 2, **w)
    r0, r1 = _step(ref), _step(gc)
    assert r0.finite and r1.finite and float(r0.stats["aux"]) > 0  # the hidden term is there (converted: not 0)
    torch.testing.assert_close(r1.loss, r0.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r1.stats["aux"], r0.stats["aux"], rtol=1e-5, atol=1e-6)
    g0 = {k: p.grad for k, p in ref.model.named_parameters() if p.grad is not None}
    g1 = {k: p.grad for k, p in gc.model.named_parameters() if p.grad is not None}
    assert set(g0) == set(g1) and len(g0) == len([p for p in ref.model.parameters() if p.requires_grad])
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=lambda msg: f"{k}: {msg}")
    # the teacher is frozen, not a sub-module: no gradient, not in the optimizer or the state dict
    assert all(p.grad is None and not p.requires_grad for p in gc._teacher.parameters())
    assert not any("teacher" in k for k in gc.state_dict())
    params = {id(p) for p in gc.parameters()}
    assert not any(id(p) in params for p in gc._teacher.parameters())


@pytest.mark.parametrize("chunk", [None, 2], ids=["uncached", "gradcache"])
def test_teacher_runs_once_per_text(tiny_bert_dir, chunk):
    """Uncached: one teacher forward per group gives the hidden states and the pooled embeddings; GradCache: the
    pooled embeddings chunk by chunk before the step and the hidden states in each chunk's replay."""
    m = _module(tiny_bert_dir, tiny_bert_dir, chunk, **WEIGHTS)
    rows = []
    enc = m._teacher.encoder
    handle = enc.register_forward_hook(lambda mod, args, kwargs, out: rows.append(int(kwargs["input_ids"].shape[0])),
                                       with_kwargs=True)
    try:
        assert _step(m).finite
    finally:
        handle.remove()
    n = sum(g["input_ids"].shape[0] for g in _groups().values())
    assert sum(rows) == (n if chunk is None else 2 * n), rows
    assert len(rows) == (2 if chunk is None else 2 * (n // chunk)), rows


def test_each_term_changes_the_gradient(tiny_bert_dir):
    """Each weight switches on its own term (none is silently ignored)."""
    base = _step(_module(tiny_bert_dir, tiny_bert_dir, 2)).loss
    for name in WEIGHTS:
        r = _step(_module(tiny_bert_dir, tiny_bert_dir, 2, **{name: 1.0}))
        assert float(r.loss) > float(base) + 1e-4, name


# ---- 2 gloo ranks == 1 process ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _terms(q, p, n, tq, tp, tn, gather):
    return contrastive_loss(q, p, n, temperature=0.05, teacher_query=tq, teacher_passage=tp, teacher_negative=tn,
                            teacher_embed_weight=0.3, teacher_score_weight=1.5, teacher_score_temperature=0.1,
                            gather=gather)


def _tensors():
    B2, K, D = 8, 2, 6
    return (_unit(B2, D, seed=1), _unit(B2, D, seed=2), _unit(B2, K, D, seed=3), _unit(B2, D, seed=4),
            _unit(B2, D, seed=5), _unit(B2, K, D, seed=6))


def _gloo_worker(rank, world, port, out):
    torch.set_num_threads(1)  # forked: no OpenMP pool inherited from the parent (GNU OpenMP is not fork-safe)
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    q, p, n, tq, tp, tn = _tensors()
    sl = slice(rank * 4, rank * 4 + 4)
    leaves = [x[sl].clone().requires_grad_(True) for x in (q, p, n)]
    loss = _terms(*leaves, tq[sl], tp[sl], tn[sl], gather=True)
    loss.backward()
    grads = [x.grad for x in leaves]  # all_gather_with_grad's backward has summed every rank's contribution
    torch.save({"loss": loss.detach(), "grads": grads}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_with_teacher_terms(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_gloo_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    q, p, n, tq, tp, tn = _tensors()
    leaves = [x.clone().requires_grad_(True) for x in (q, p, n)]
    loss = _terms(*leaves, tq, tp, tn, gather=False)
    loss.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / 2, loss.detach(), rtol=1e-5, atol=1e-6)
    for i, leaf in enumerate(leaves):
        # rank r holds d(sum_s L_s)/d(its slice); one process optimises mean_s L_s: half of it (the data-parallel
        # average of parameter gradients supplies that 1/2 in training)
        got = torch.cat([ranks[r]["grads"][i] for r in range(2)]) / 2
        torch.testing.assert_close(got, leaf.grad, rtol=1e-4, atol=1e-6)


# ---- bad teachers: clear errors before training -------------------------------------------------------------


def test_bad_teachers_are_clear_errors(tiny_bert_dir, tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast, GPT2Config, GPT2Model

    from ropebert.errors import InputError

    with pytest.raises(FileNotFoundError, match="is not a directory"):
        _module(tiny_bert_dir, tmp_path / "nope", None)
    gpt = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(str(gpt))
    with pytest.raises(InputError, match="'gpt2' model, not a text encoder"):
        _module(tiny_bert_dir, gpt, None)
    other = tmp_path / "other-vocab"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(other))
    BertModel(BertConfig(vocab_size=7, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(str(other))
    with pytest.raises(InputError, match="another tokenizer vocabulary"):
        _module(tiny_bert_dir, other, None)
    wide = tmp_path / "wide"
    BertModel(BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(str(wide))
    for f in Path(tiny_bert_dir).iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special")):
            (wide / f.name).write_bytes(f.read_bytes())
    with pytest.raises(InputError, match="hidden size 48, the student 32"):
        _module(tiny_bert_dir, wide, None, teacher_embed_weight=1.0)
    with pytest.raises(InputError, match="needs model.teacher"):
        from ropebert.pipelines.train.module import RopeBertContrastive

        RopeBertContrastive(str(tiny_bert_dir), teacher_hidden_weight=1.0)
    with pytest.raises(InputError, match="contrastive_weight=0 leaves no loss"):
        RopeBertContrastive(str(tiny_bert_dir), contrastive_weight=0.0)
    with pytest.raises(InputError, match="contrastive_weight must be >= 0"):
        RopeBertContrastive(str(tiny_bert_dir), contrastive_weight=-0.5)


def test_teacher_truncated_to_its_position_range_and_hash(tiny_bert_dir, tmp_path):
    t = Teacher(str(tiny_bert_dir))
    assert t.max_positions == 128 and t.kind == "hf" and t.pooling == "mean"
    ids, mask = padded_batch([200, 50], vocab=1000, seed=3)
    pooled, hidden, seen = t(ids, mask, hidden=True)
    assert seen.shape == (2, 128) and hidden[0].shape[1] == 128 and pooled.shape == (2, 32)
    assert t.layer_map(2) == [(1, 1), (2, 2)] and t.layer_map(4) == [(1, 1), (2, 1), (3, 2), (4, 2)]
    h = content_hash(tiny_bert_dir)
    cfg = json.loads((Path(tiny_bert_dir) / "config.json").read_text())
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in Path(tiny_bert_dir).iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert content_hash(copy) == h
    (copy / "config.json").write_text(json.dumps(dict(cfg, layer_norm_eps=1e-5)))
    assert content_hash(copy) != h
