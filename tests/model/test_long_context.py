"""Long-context config keys: validation and round trip, each method against an independent formulation,
SelfExtend fused vs eager three-map reference (600-2,048 tokens), PCW, and the exported-directory acceptance test."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from ropebert.model import RopeBertConfig, RopeBertModel
from ropebert.model.modeling_ropebert import (
    SELF_EXTEND_IMPLS,
    AttentionContext,
    rope_inv_freq,
    rope_torch,
    self_extend_eager,
)
from ropebert.model.verify import run_fresh_reload
from tests.conftest import padded_batch, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _model(**kw):
    torch.manual_seed(0)
    return RopeBertModel(tiny_config(**kw)).eval()


@torch.no_grad()
def _hidden(model, ids, mask, **kw):
    return model(ids, mask, **kw).last_hidden_state


# ---- configuration ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(self_extend={"group_size": 3, "window": 512}), "window"),
        (dict(self_extend={"group_size": 0, "window": 64}), "group_size"),
        (dict(self_extend={"group_size": 3}), "self_extend"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "unknown type 'yarn'"),
        (dict(rope_scaling={"type": "pi", "factor": -2.0}), "factor"),
        (dict(rope_scaling={"type": "dynamic_ntk", "factor": 0}), "factor"),
        (dict(position_mode="grouped"), "position_mode"),
        (dict(position_scale=0), "position_scale"),
        (dict(position_scale="half"), "position_scale"),
        (dict(rope_scaling={"type": "dynamic_ntk", "factor": "auto"}), "factor"),
        (dict(rope_scaling={"type": "pi", "factor": "Auto"}), "factor"),
        (dict(attn_scale_base=1), "attn_scale_base"),
        (dict(original_max_position_embeddings=0), "original_max_position_embeddings"),
        (dict(rope_theta=-5.0), "rope_theta"),
    ],
)
def test_bad_long_context_config_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        RopeBertConfig(max_position_embeddings=512, **bad)


# config.json edits that must fail when the model is loaded: (edit, expected message)
BAD_EDITS = [
    ({"self_extend": {"group_size": 4, "window": 600}}, "self_extend.window"),
    ({"self_extend": {"group_size": 9, "window": 512}}, "self_extend.window"),
    ({"self_extend": {"group_size": 0, "window": 64}}, "self_extend.group_size"),
    ({"rope_scaling": {"type": "pi", "factor": -2.0}}, "rope_scaling.factor"),
    ({"rope_scaling": {"type": "dynamic_ntk", "factor": -4.0}}, "rope_scaling.factor"),
    ({"position_scale": -3}, "position_scale"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "unknown type 'yarn'"),
]


@pytest.mark.parametrize("edit, match", BAD_EDITS, ids=lambda x: str(x)[:40] if isinstance(x, dict) else None)
def test_bad_config_json_fails_at_load(tmp_path, edit, match):
    torch.manual_seed(0)
    RopeBertModel(tiny_config(max_position_embeddings=512)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        RopeBertConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        RopeBertModel.from_pretrained(tmp_path)


def test_config_edited_after_load_is_checked_before_forward(tiny_model):
    tiny_model.config.self_extend = {"group_size": 2, "window": 64}  # window == original length 64
    with pytest.raises(ValueError, match="self_extend.window"):
        tiny_model(torch.ones(1, 3, dtype=torch.long))


def test_keys_round_trip_through_config_json(tmp_path):
    keys = dict(
        rope_theta=50000.0, rope_scaling={"type": "dynamic_ntk", "factor": 4.0}, position_mode="gp", position_scale=2,
        original_max_position_embeddings=512, self_extend={"group_size": 5, "window": 128}, attn_scale_base=None,
    )
    RopeBertConfig(**keys).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    rope = ("rope_theta", "rope_scaling")  # written in transformers 5's rope_parameters convention
    assert {k: saved[k] for k in keys if k not in rope} == {k: v for k, v in keys.items() if k not in rope}
    assert saved["rope_parameters"] == {"rope_type": "dynamic", "rope_theta": 50000.0, "factor": 4.0}
    loaded = RopeBertConfig.from_pretrained(tmp_path)
    assert {k: getattr(loaded, k) for k in keys} == keys
    assert RopeBertConfig().attn_scale_base == 512 and RopeBertConfig().rope_scaling is None
    auto = dict(rope_scaling={"type": "pi", "factor": "auto"}, position_mode="gp", position_scale="auto")
    RopeBertConfig(**auto).save_pretrained(tmp_path)  # "auto" factors are valid and round-trip
    loaded = RopeBertConfig.from_pretrained(tmp_path)
    assert {k: getattr(loaded, k) for k in auto} == auto


# ---- each method against an independent formulation ----------------------------------------------------------


def test_position_remaps_equal_explicit_position_ids():
    ids, mask = padded_batch([40, 27])
    plain = _model()
    base_pos = torch.arange(40)[None].expand(2, -1)
    for kw, pos in [
        (dict(rope_scaling={"type": "pi", "factor": 4.0}), base_pos.float() / 4.0),
        (dict(position_mode="gp", position_scale=3), base_pos // 3),
        (dict(position_mode="rp", original_max_position_embeddings=16), base_pos % 16),
    ]:
        got = _hidden(_model(**kw), ids, mask)
        want = _hidden(plain, ids, mask, position_ids=pos)
        assert (got - want)[mask.bool()].abs().max() <= 1e-5, kw
        assert (got - _hidden(plain, ids, mask))[mask.bool()].abs().max() > 1e-4, kw  # the remap did something


def test_dynamic_ntk_uses_each_sequences_length():
    orig, f = 16, 2.0
    ids, mask = padded_batch([40, 12])
    m = _model(original_max_position_embeddings=orig, rope_scaling={"type": "dynamic_ntk", "factor": f})
    got = _hidden(m, ids, mask)
    D = 32 // 4
    theta = 10000.0 * (f * 40 / orig - (f - 1)) ** (D / (D - 2))
    want_long = _hidden(_model(rope_theta=theta), ids[:1], mask[:1])
    want_short = _hidden(_model(), ids[1:, :12], mask[1:, :12])  # within the original length: theta unchanged
    assert (got[:1] - want_long).abs().max() <= 1e-5
    assert (got[1:, :12] - want_short).abs().max() <= 1e-5
    m.config.attn_backend = "sdpa_packed"  # per-token inv_freq on the packed path
    assert (_hidden(m, ids, mask) - got)[mask.bool()].abs().max() <= 1e-5


def test_attn_scale_base_scales_queries_of_long_sequences():
    ids, mask = padded_batch([40, 10])
    got = _hidden(_model(attn_scale_base=16), ids, mask)
    ref = _model(attn_scale_base=None)
    with torch.no_grad():
        for layer in ref.encoder.layer:  # q * c after rotary == (W_q x + b_q) * c before it (rotation is linear)
            layer.attention.self.query.weight.mul_(math.log(40) / math.log(16))
            layer.attention.self.query.bias.mul_(math.log(40) / math.log(16))
    assert (got[:1] - _hidden(ref, ids[:1], mask[:1])).abs().max() <= 1e-5
    short = _hidden(_model(attn_scale_base=None), ids[1:, :10], mask[1:, :10])
    assert (got[1:, :10] - short).abs().max() <= 1e-5  # 10 <= 16: no effect


def test_self_extend_eager_matches_the_three_map_formula_elementwise():
    """self_extend_eager against a per-(i, j) loop of LongEmbed's bidirectional SelfExtend."""
    torch.manual_seed(0)
    L, H, D, g, w, orig = 14, 2, 8, 3, 4, 8
    q, k, v = (torch.randn(1, L, H, D, dtype=torch.float64) for _ in range(3))
    inv = rope_inv_freq(D, 10000.0).double()
    pos = torch.arange(L)[None] + 5  # offsets are fine: the maps use positions, the window token distance
    ctx = AttentionContext(
        packed=False, positions=pos, inv_freq=inv, seqlens=torch.tensor([L], dtype=torch.int32), scale=D**-0.5,
        dropout_p=0.0, attention_mask=torch.ones(1, L, dtype=torch.bool), self_extend=(g, w), original_length=orig,
    )
    got = self_extend_eager(q, k, v, ctx)[0]  # (L, H, D)

    def rot(x, p):  # x (H, D) at position p, rotate-half
        a = p * inv
        c, s = torch.cat((a.cos(), a.cos())), torch.cat((a.sin(), a.sin()))
        return x * c + torch.cat((-x[:, D // 2 :], x[:, : D // 2]), -1) * s

    p = pos[0].tolist()
    want = torch.zeros(L, H, D, dtype=torch.float64)
    for i in range(L):
        s = torch.zeros(H, L, dtype=torch.float64)
        for j in range(L):
            if abs(i - j) < w:
                qp, kp = p[i], p[j]
            elif i > j:
                qp, kp = p[i] // g + w - w // g, p[j] // g
            else:
                qp, kp = p[i] // g, p[j] // g + w - w // g
            s[:, j] = (rot(q[0, i], qp) * rot(k[0, j], kp)).sum(-1) * D**-0.5
        want[i] = torch.einsum("hj,jhd->hd", s.softmax(-1), v[0])
    assert (got - want).abs().max() <= 1e-5  # the model rotates and scores in fp32


def test_self_extend_group_size_one_is_plain_attention():
    ids, mask = padded_batch([600])
    plain = _hidden(_model(max_position_embeddings=512, num_hidden_layers=1), ids, mask)
    se = _model(max_position_embeddings=512, num_hidden_layers=1, self_extend={"group_size": 1, "window": 32})
    assert (_hidden(se, ids, mask) - plain).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "lengths, backend",
    [([600, 300, 650], "sdpa"), ([1100, 512], "sdpa_packed"), ([2048], "sdpa")],
)
def test_self_extend_fused_matches_eager_reference(lengths, backend):
    ids, mask = padded_batch(lengths)
    m = _model(max_position_embeddings=512, num_hidden_layers=1, initializer_range=0.2,
               self_extend={"group_size": 3, "window": 64})
    m.config.attn_backend = "eager"
    ref = _hidden(m, ids, mask)
    m.config.attn_backend = backend
    got = _hidden(m, ids, mask)
    mk = mask.bool()
    assert (got - ref)[mk].abs().max() <= 1e-4
    m.config.self_extend = None
    plain = _hidden(m, ids, mask)
    assert (plain - ref)[mk].abs().max() > 100 * (got - ref)[mk].abs().max()  # SelfExtend really changed it
    for b, n in enumerate(lengths):  # sequences within the original length: plain attention, exactly
        if n <= 512:
            assert (plain[b, :n] - ref[b, :n]).abs().max() <= 1e-5


@pytest.mark.parametrize("packed", [False, True])
def test_self_extend_partials_match_eager_at_attention_level(packed):
    """The FlexAttention (LSE-merged partials), query-chunked and split (CPU flash partials) implementations vs the eager
    reference, on a batch mixing a long sequence, a short one (plain attention) and padding."""
    torch.manual_seed(0)
    lengths, H, D = [700, 300], 2, 16
    L = max(lengths)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    common = dict(inv_freq=rope_inv_freq(D, 10000.0), seqlens=seqlens, scale=D**-0.5, dropout_p=0.0,
                  rope_fn=rope_torch, self_extend=(5, 48), original_length=512)
    if packed:
        ctx = AttentionContext(packed=True, positions=pos[mask], max_seqlen=L,
                               cu_seqlens=torch.tensor([0, 700, 1000], dtype=torch.int32), **common)
        shape = (sum(lengths), H, D)
    else:
        ctx = AttentionContext(packed=False, positions=pos, attention_mask=mask, has_padding=True, **common)
        shape = (2, L, H, D)
    q, k, v = (torch.randn(*shape) * 3 for _ in range(3))
    ref = SELF_EXTEND_IMPLS["eager"](q, k, v, ctx)
    valid = slice(None) if packed else mask
    impls = {
        "flex": SELF_EXTEND_IMPLS["flex"],
        "chunked": SELF_EXTEND_IMPLS["chunked"],
        "chunked-37": lambda *a: SELF_EXTEND_IMPLS["chunked"](*a, chunk=37),  # blocks not aligned to w
        "split": SELF_EXTEND_IMPLS["split"],
    }
    for impl, fn in impls.items():
        got = fn(q, k, v, ctx)
        assert got.shape == ref.shape
        assert (got - ref)[valid].abs().max() <= 5e-5, impl  # fp32, |v| ~ 3, sharp softmax


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_self_extend_flex_matches_eager_reference():
    """On CUDA the fused path is compiled FlexAttention partials merged by log-sum-exp (never L x L); it equals
    the eager three-map reference at 2,048 tokens (plus a short sequence that keeps plain attention)."""
    from ropebert.model.modeling_ropebert import FLEX_COMPILE_DEVICES

    assert "cuda" in FLEX_COMPILE_DEVICES
    ids, mask = padded_batch([2048, 300])
    ids, mask = ids.cuda(), mask.cuda()
    m = _model(max_position_embeddings=512, num_hidden_layers=1, initializer_range=0.2,
               self_extend={"group_size": 9, "window": 64}).cuda()
    m.config.attn_backend = "eager"
    ref = _hidden(m, ids, mask)
    for backend in ("sdpa", "sdpa_packed"):
        m.config.attn_backend = backend
        got = _hidden(m, ids, mask)
        assert (got - ref)[mask.bool()].abs().max() <= 1e-3, backend  # fp32; room for TF32 in compiled kernels


# ---- PCW --------------------------------------------------------------------------------------------------


def test_pcw_chunks_and_averages(minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    m = _model(vocab_size=tok.vocab_size, max_position_embeddings=16)
    text = " ".join(f"word{i}" for i in range(20))
    body = tok(text, add_special_tokens=False)["input_ids"]
    pre = tok("passage: ", add_special_tokens=False)["input_ids"]
    c = 16 - 2 - len(pre)  # body tokens per chunk: [CLS] prefix chunk [SEP] fills the 16 trained positions
    n = len(body)
    assert n > 2 * c and n % c != 0
    starts = list(range(0, n - c, c)) + [n - c]
    chunks = [[tok.cls_token_id] + pre + body[s : s + c] + [tok.sep_token_id] for s in starts]
    assert {len(x) for x in chunks} == {16}
    with torch.no_grad():
        embs = [m.embed(torch.tensor([c]), normalize=False)[0] for c in chunks]
    want = torch.nn.functional.normalize(torch.stack(embs).mean(0), dim=-1)
    got = m.encode([text, "short"], tokenizer=tok, prefix="passage: ", pcw=True)
    assert got.shape == (2, 32)
    assert (got[0] - want).abs().max() <= 1e-5
    short = m.encode(["short"], tokenizer=tok, prefix="passage: ")
    assert (got[1] - short[0]).abs().max() <= 1e-5  # one chunk == the plain encoding


def test_pcw_chunks_fit_the_trained_length_of_a_512_model(minilm_dir):
    """PCW for a model trained at 512 tokens: each chunk, [CLS] passage: chunk [SEP], is at most 512 tokens
    (512 - 2 - prefix body tokens), the last chunk the final such tokens, unnormalised chunk embeddings averaged,
    then L2-normalised."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    m = _model(vocab_size=tok.vocab_size, max_position_embeddings=512, num_hidden_layers=1, initializer_range=0.2)
    # varied words, then one word repeated: chunk embeddings with clearly different norms
    text = " ".join(f"token{i % 97} word{i}" for i in range(100)) + " same" * 700
    body = tok(text, add_special_tokens=False)["input_ids"]
    n = len(body)
    ids_list, owner = m._pcw_chunks([text], tok, "passage: ")
    pre = tok("passage: ", add_special_tokens=False)["input_ids"]
    c = 512 - 2 - len(pre)
    assert len(pre) >= 1 and 2 * c < n and n % c != 0, n
    assert max(len(x) for x in ids_list) == 512  # everything included, a chunk fits the trained length
    starts = list(range(0, n - c, c)) + [n - c]
    assert len(starts) == 3 and starts[-1] < 2 * c  # the last chunk overlaps the previous one
    want_chunks = [[tok.cls_token_id] + pre + body[s0 : s0 + c] + [tok.sep_token_id] for s0 in starts]
    assert ids_list == want_chunks and owner.tolist() == [0, 0, 0]
    assert ids_list[-1][1 + len(pre) : -1] == body[-c:]
    no_prefix, _ = m._pcw_chunks([text], tok, "")
    assert {len(x) for x in no_prefix} == {512}
    with torch.no_grad():
        embs = torch.stack([m.embed(torch.tensor([c]), normalize=False)[0] for c in want_chunks])
    want = torch.nn.functional.normalize(embs.mean(0), dim=-1)
    got = m.encode([text], tokenizer=tok, prefix="passage: ", pcw=True)[0]
    assert (got - want).abs().max() <= 1e-5
    of_normalised = torch.nn.functional.normalize(torch.nn.functional.normalize(embs, dim=-1).mean(0), dim=-1)
    assert (of_normalised - want).abs().max() > 1e-4  # the test tells the two averaging orders apart


# ---- acceptance: an exported directory applies edited long-context keys under plain transformers ------------

@pytest.fixture(scope="module")
def exported_tiny(minilm_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    from ropebert.model.export import export_model

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    torch.manual_seed(0)
    model = RopeBertModel(
        tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=512, num_hidden_layers=1, initializer_range=0.2)
    ).eval()
    out = tmp_path_factory.mktemp("export") / "tiny-rope"
    export_model(model, out, tokenizer=tok)
    return model, out


@pytest.mark.parametrize(
    "edit", [{"rope_theta": 100000.0}, {"self_extend": {"group_size": 9, "window": 64}}], ids=["ntk", "self_extend"]
)
def test_exported_dir_applies_edited_long_context_keys(exported_tiny, edit, tmp_path):
    import shutil

    model, src = exported_tiny
    d = tmp_path / "edited"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (1, 2048), generator=g)
    ids[0, 0], ids[0, -1] = 101, 102  # [CLS] ... [SEP]
    bad_edits = BAD_EDITS if "rope_theta" in edit else []  # load-time config errors: checked once
    res = run_fresh_reload(d, {"input_ids": ids.tolist(), "bad_config_edits": [e for e, _ in bad_edits]})
    assert res["ropebert_imported"] is False
    theta = cfg.get("rope_theta", cfg["rope_parameters"]["rope_theta"])  # an edited old key wins
    assert res["theta"] == theta and res["self_extend"] == cfg["self_extend"]
    assert len(res["bad_config_errors"]) == len(bad_edits)
    for (bad, match), err in zip(bad_edits, res["bad_config_errors"]):
        assert err is not None and re.search(match, err), (bad, err)
    got = torch.tensor(res["hidden"])  # (2048, C)

    # the in-repo eager reference with the same edit
    ref_model = RopeBertModel(RopeBertConfig(**{**model.config.to_dict(), **edit, "attn_backend": "eager"})).eval()
    ref_model.load_state_dict(model.state_dict())
    ref = _hidden(ref_model, ids, torch.ones_like(ids))[0]
    unedited = _hidden(model, ids, torch.ones_like(ids))[0]
    err = (got - ref).abs().max().item()
    assert err <= 1e-4
    assert (unedited - ref).abs().max().item() > 100 * max(err, 1e-7)  # the edit was applied, not ignored


def test_self_extend_split_slices_left_padding_and_falls_back_on_a_holed_row(monkeypatch):
    """split (CPU flash partials) slices each row's one run of real tokens: a left-padded row equals the eager
    reference; a row whose real tokens are not one run goes through the query-chunked formula instead."""
    import ropebert.model.modeling_ropebert as mr

    torch.manual_seed(0)
    H, D, L = 2, 16, 640
    left = torch.arange(L)[None] >= torch.tensor([L - 600, 0])[:, None]  # row 0 left-padded, row 1 full
    holed = left.clone()
    holed[1, 100:110] = False  # ten padding tokens inside row 1's text
    real, calls = mr.self_extend_chunked, []
    monkeypatch.setattr(mr, "self_extend_chunked", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for mask, want_fallback in ((left, False), (holed, True)):
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        ctx = AttentionContext(packed=False, positions=pos, attention_mask=mask, has_padding=True,
                               inv_freq=rope_inv_freq(D, 10000.0), seqlens=mask.sum(-1).to(torch.int32),
                               scale=D**-0.5, dropout_p=0.0, rope_fn=rope_torch, self_extend=(5, 48),
                               original_length=512)
        q, k, v = (torch.randn(2, L, H, D) * 3 for _ in range(3))
        calls.clear()
        got = mr.self_extend_split(q, k, v, ctx)
        assert bool(calls) == want_fallback
        ref = SELF_EXTEND_IMPLS["eager"](q, k, v, ctx)
        assert (got - ref)[mask].abs().max() <= 5e-5
