"""APE BERT -> RoPE BERT conversion: folding positions, the first token, and the rotary-aware q/k basis."""

from __future__ import annotations

import pytest
import torch

from ropebert.errors import InputError
from ropebert.model import modeling_ropebert as M
from ropebert.model.load.convert import align_rotary_basis, from_bert, random_token_sequences


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    bert = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # a table with a real signal (BertModel initialises it at std 0.02)
        bert.embeddings.position_embeddings.weight.normal_(0, 0.5)
    return bert


@pytest.fixture
def no_rotary(monkeypatch):
    """Rotary switched off: the converted model is then exactly the APE model with a position-free table."""
    monkeypatch.setitem(M.ROPE_IMPLS, "identity", lambda q, k, ctx: (q, k))

    def off(model):
        model.config.rope_impl = "identity"
        return model
    return off


def _ids(n=3, length=9, first=101):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 1200, (n, length), generator=g)
    ids[:, 0] = first
    return ids


def _run_bert(bert, ids, table):
    with torch.no_grad():
        old = bert.embeddings.position_embeddings.weight.clone()
        bert.embeddings.position_embeddings.weight.copy_(table)
        try:
            return bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        finally:
            bert.embeddings.position_embeddings.weight.copy_(old)


def _run(model, ids):
    with torch.no_grad():
        return model.eval()(ids, torch.ones_like(ids)).last_hidden_state


def test_fold_positions_and_first_token_are_exact(no_rotary):
    """Without rotary, fold N == the APE model with every position at the mean of the first N; adding the first
    token == that model with position 0 kept at its own vector (for sequences that start with that token)."""
    bert = _bert()
    table = bert.embeddings.position_embeddings.weight.detach()
    mean = table[:16].mean(0)
    ids = _ids()
    folded = no_rotary(from_bert(bert, fold_positions=16))
    expect = _run_bert(bert, ids, mean.expand_as(table))
    assert (_run(folded, ids) - expect).abs().max() < 1e-5
    first = no_rotary(from_bert(bert, fold_positions=16, first_token_id=101))
    keep0 = mean.expand_as(table).clone()
    keep0[0] = table[0]
    expect0 = _run_bert(bert, ids, keep0)
    assert (_run(first, ids) - expect0).abs().max() < 1e-5
    assert (expect0 - expect).abs().max() > 1e-2  # position 0 does matter in this model
    # without folding, the first token gets the whole position-0 vector
    plain = no_rotary(from_bert(bert, first_token_id=101))
    zero0 = torch.zeros_like(table)
    zero0[0] = table[0]
    assert (_run(plain, ids) - _run_bert(bert, ids, zero0)).abs().max() < 1e-5


def test_keep_positions_is_exact_for_the_leading_tokens(no_rotary):
    """Without rotary, fold N + keep K == the APE model with positions 0..K-1 at their own vectors and the rest at
    the mean; with the first token folded too (row 0 then zero); the whole table kept == the APE model itself."""
    bert = _bert()
    table = bert.embeddings.position_embeddings.weight.detach()
    mean = table[:16].mean(0)
    ids = _ids(length=12)
    keep = mean.expand_as(table).clone()
    keep[:4] = table[:4]
    for first in (None, 101):
        m = no_rotary(from_bert(bert, fold_positions=16, first_token_id=first, keep_positions=4))
        assert m.config.leading_positions == 4
        lead = m.embeddings.leading_position_embeddings.weight
        assert (lead[0].abs().max() == 0) == (first is not None)
        assert (_run(m, ids) - _run_bert(bert, ids, keep)).abs().max() < 1e-5
    whole = no_rotary(from_bert(bert, keep_positions=table.shape[0]))
    assert (_run(whole, ids) - _run_bert(bert, ids, table)).abs().max() < 1e-5
    # with rotary on, the padded and packed layouts agree, and a left-padded batch indexes its real tokens
    m = from_bert(bert, fold_positions=16, keep_positions=4).eval()
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        out = {b: m.set_attn_backend(b) or m(ids, mask).last_hidden_state for b in ("sdpa", "sdpa_packed", "eager")}
        for b in ("sdpa_packed", "eager"):
            assert (out[b] - out["sdpa"])[mask.bool()].abs().max() < 1e-5, b
        left_ids, left_mask = ids[1:2].clone(), mask[1:2].clone()
        left_ids = torch.cat([left_ids[:, 7:], left_ids[:, :7]], dim=1)
        left_mask = torch.cat([left_mask[:, 7:], left_mask[:, :7]], dim=1)
        m.set_attn_backend("sdpa")
        left = m(left_ids, left_mask).last_hidden_state[0, 5:]
        assert (left - out["sdpa"][1, :7]).abs().max() < 1e-5


def test_rotary_basis_is_exact_without_rotary_and_orders_layer0(no_rotary):
    bert = _bert()
    ids = _ids()
    calib = random_token_sequences(1200, num=32, length=16, first_token_id=101)
    base = from_bert(bert, fold_positions=16)
    aligned = from_bert(bert, fold_positions=16, rotary_basis=True, calibration=calib)
    # with rotary, q/k weights changed ...
    assert not torch.allclose(aligned.encoder.layer[0].attention.self.query.weight,
                              base.encoder.layer[0].attention.self.query.weight)
    assert torch.equal(aligned.encoder.layer[0].attention.self.value.weight,
                       base.encoder.layer[0].attention.self.value.weight)
    # ... but the model without rotary is the same function
    assert (_run(no_rotary(aligned), ids) - _run(no_rotary(base), ids)).abs().max() < 1e-4

    # layer 0's input does not depend on attention: recompute its q/k moments in the new basis. They are
    # diagonal, with the importance non-increasing from the slowest rotary pair (P-1, 2P-1) down to pair 0.
    aligned.config.rope_impl = "torch"
    cfg = aligned.config
    H, C = cfg.num_attention_heads, cfg.hidden_size
    D, P = C // H, C // H // 2
    xs = []
    h = aligned.encoder.layer[0].attention.self.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, C)))
    for seq in calib:
        t = torch.tensor(seq)[None]
        _run(aligned, t)
    h.remove()
    x = torch.cat(xs).double()
    sa = aligned.encoder.layer[0].attention.self
    q = (x @ sa.query.weight.double().T + sa.query.bias.double()).view(-1, H, D)
    k = (x @ sa.key.weight.double().T + sa.key.bias.double()).view(-1, H, D)
    slots = [d for p in range(P - 1, -1, -1) for d in (p, p + P)]
    for head in range(H):
        cq = q[:, head].T @ q[:, head] / len(q)
        ck = k[:, head].T @ k[:, head] / len(k)
        s = cq / cq.trace() + ck / ck.trace()
        s = s[slots][:, slots]
        d = torch.diagonal(s)
        assert (d[:-1] >= d[1:] - 1e-9).all(), d
        assert (s - torch.diag(d)).abs().max() < 1e-6 * d.max()


def test_rotary_basis_lifts_the_converted_minilm(minilm_dir):
    """On real text, the re-based conversion is closer to its APE parent than the plain one (pooled cosine)."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    texts = ["how do I reverse a list in python", "The cat sat on the mat while the dog slept by the door.",
             "Return the number of items in a container.", "what is the capital of france"]
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    parent = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, convert_to_tensor=True,
                                                                       normalize_embeddings=True)
    cos = {}
    for name, kw in {"fold": {}, "fold+first+basis": dict(first_token_id=tok.cls_token_id, rotary_basis=True)}.items():
        m = from_bert(str(minilm_dir), fold_positions=128, **kw).eval()
        e = m.encode(texts, tokenizer=tok, prefix="", show_progress_bar=False)
        cos[name] = (e * parent).sum(-1).mean().item()
    assert cos["fold+first+basis"] > cos["fold"] + 0.03, cos


def test_random_calibration_is_seeded_and_skips_reserved_ids():
    a = random_token_sequences(1200, num=4, length=8, special_ids=[1100], first_token_id=101)
    assert a == random_token_sequences(1200, num=4, length=8, special_ids=[1100], first_token_id=101)
    assert a != random_token_sequences(1200, num=4, length=8, seed=1, first_token_id=101)
    flat = [t for s in a for t in s[1:]]
    assert all(s[0] == 101 for s in a) and min(flat) >= 1000 and 1100 not in flat


def test_conversion_bad_input():
    bert = _bert()
    with pytest.raises(InputError, match="first_token_id 5000 is not in"):
        from_bert(bert, first_token_id=5000)
    with pytest.raises(InputError, match=r"keep_positions must be in 0\.\.64"):
        from_bert(bert, keep_positions=65)
    with pytest.raises(InputError, match="keep_positions must be an int >= 0"):
        from_bert(bert, keep_positions=-1)
    from ropebert.model import RopeBertConfig
    with pytest.raises(ValueError, match="leading_positions must be an int >= 0"):
        RopeBertConfig(hidden_size=32, num_attention_heads=4, leading_positions=-2)
    with pytest.raises(InputError, match="no tokens"):
        align_rotary_basis(from_bert(bert), [[]])
