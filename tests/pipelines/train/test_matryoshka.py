"""Matryoshka training through the LightningModule: settings checked before training, the module's own embed and
loss functions under GradCache."""

from __future__ import annotations

import pytest
import torch

from ropebert.errors import InputError
from ropebert.pipelines.train.gradcache import contrastive_step
from ropebert.pipelines.train.module import RopeBertContrastive
from tests.conftest import padded_batch


def _module(init, **kw):
    torch.manual_seed(0)
    return RopeBertContrastive(init_from=str(init), hidden_dropout=0.0, attention_dropout=0.0, gather=False, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(matryoshka_dims=[64, 16]), r"\[64\] larger than the model's hidden size 32"),
    (dict(matryoshka_dims=[32, 8, 16]), r"\[32, 8, 16\] must be strictly ordered"),
    (dict(matryoshka_dims=[16, 16]), "strictly ordered"),
    (dict(matryoshka_dims=[32, 16], matryoshka_weights=[1.0]), r"1 entries \[1.0\] for 2 model.matryoshka_dims"),
    (dict(matryoshka_weights=[1.0]), "needs model.matryoshka_dims"),
    (dict(matryoshka_dims=[]), "is empty"),
    (dict(matryoshka_dims=[32, 0]), r"\[0\] must be >= 1"),
    (dict(matryoshka_dims=[32, 16], matryoshka_teacher_embed="all"), "must be 'prefix' or 'full'"),
])
def test_bad_matryoshka_settings_are_clear_errors(tiny_bert_dir, kw, match):
    with pytest.raises(InputError, match=match):
        _module(tiny_bert_dir, **kw)


def _groups(vocab):
    q = padded_batch([4, 9, 3, 7, 5, 8], vocab=vocab, seed=1)
    p = padded_batch([12, 5, 7, 10, 3, 6], vocab=vocab, seed=2)
    return {"query": {"input_ids": q[0], "attention_mask": q[1]}, "passage": {"input_ids": p[0], "attention_mask": p[1]}}


def _step(m, chunk):
    groups = _groups(m.model.config.vocab_size)
    res = contrastive_step(m._embed_fn(12), groups, m._loss_fn({}), chunk_size=chunk)
    grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    return res, grads


def test_module_matryoshka_loss_gradcache_equals_uncached(tiny_bert_dir):
    kw = dict(matryoshka_dims=[32, 16, 8], matryoshka_weights=[1.0, 0.5, 0.5])
    r0, g0 = _step(_module(tiny_bert_dir, **kw), None)
    r1, g1 = _step(_module(tiny_bert_dir, **kw), 2)
    torch.testing.assert_close(r1.loss, r0.loss, rtol=1e-6, atol=1e-6)
    assert {"loss@32", "loss@16", "loss@8"} <= set(r0.stats)
    want = r0.stats["loss@32"] + 0.5 * r0.stats["loss@16"] + 0.5 * r0.stats["loss@8"]
    assert r0.loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert set(g0) == set(g1) and len(g0) > 10
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=lambda msg: f"{k}: {msg}")


# -- 2-D (layers x dims) -----------------------------------------------------------------------------------------


def test_bad_matryoshka_layers_are_clear_errors(tiny_bert_dir):
    with pytest.raises(InputError, match=r"\[3\] out of range; the model has 2 layers, numbered 1..2"):
        _module(tiny_bert_dir, matryoshka_layers=[1, 3])
    with pytest.raises(InputError, match=r"\[0\] out of range"):
        _module(tiny_bert_dir, matryoshka_layers=[0, 2])
    with pytest.raises(InputError, match="strictly increasing"):
        _module(tiny_bert_dir, matryoshka_layers=[2, 1])
    assert _module(tiny_bert_dir, matryoshka_layers=[1])._layers == [1, 2]  # the last layer is always trained


def test_module_2d_matryoshka_gradcache_equals_uncached_and_sums_every_pair(tiny_bert_dir):
    import torch.nn.functional as F

    from ropebert.pipelines.train.loss import contrastive_loss

    kw = dict(matryoshka_dims=[32, 8], matryoshka_weights=[1.0, 0.5], matryoshka_layers=[1, 2])
    r0, g0 = _step(_module(tiny_bert_dir, **kw), None)
    r1, g1 = _step(_module(tiny_bert_dir, **kw), 2)
    torch.testing.assert_close(r1.loss, r0.loss, rtol=1e-6, atol=1e-6)
    assert set(g0) == set(g1) and len(g0) > 10
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=lambda msg: f"{k}: {msg}")
    # independently: pool each layer's hidden states by hand, one plain loss per (layer, dim) pair
    m = _module(tiny_bert_dir, **kw)
    groups = _groups(m.model.config.vocab_size)
    want = 0.0
    with torch.no_grad():
        hs = {g: m.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True,
                         return_dict=True).hidden_states for g, b in groups.items()}
        for layer in (1, 2):
            emb = {}
            for g, b in groups.items():
                msk = b["attention_mask"][..., None].float()
                emb[g] = (hs[g][layer] * msk).sum(1) / msk.sum(1)  # (N, D) masked mean
            for d, w in ((32, 1.0), (8, 0.5)):
                qd, pd = F.normalize(emb["query"][:, :d], dim=-1), F.normalize(emb["passage"][:, :d], dim=-1)
                term = contrastive_loss(qd, pd, temperature=m.hparams.temperature)
                assert r0.stats[f"loss@L{layer}:{d}"].item() == pytest.approx(term.item(), rel=1e-5)
                want += w * term.item()
    assert r0.loss.item() == pytest.approx(want, rel=1e-5)
    # the last layer's full-dim diagnostics are the step's; layer 1 is a different embedding
    assert r0.stats["loss@L1"].item() != pytest.approx(r0.stats["loss@L2"].item(), rel=1e-3)
    # and the 1-D module (last layer only) is the layer-2 part of it
    r_1d, _ = _step(_module(tiny_bert_dir, matryoshka_dims=[32, 8], matryoshka_weights=[1.0, 0.5]), None)
    assert r_1d.loss.item() == pytest.approx(r0.stats["loss@L2"].item(), rel=1e-5)


def test_config_records_the_trained_dims_and_layers(tiny_bert_dir, tmp_path):
    import json

    from ropebert.model.export import export_model

    m = _module(tiny_bert_dir, matryoshka_dims=[32, 16], matryoshka_layers=[1])
    assert m.model.config.matryoshka_dims == [32, 16] and m.model.config.matryoshka_layers == [1, 2]
    out = export_model(m.model, tmp_path / "e")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["matryoshka_dims"] == [32, 16] and cfg["matryoshka_layers"] == [1, 2]
    plain = _module(tiny_bert_dir)
    assert plain.model.config.matryoshka_dims is None and plain.model.config.matryoshka_layers is None
