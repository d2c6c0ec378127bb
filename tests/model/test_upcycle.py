"""`ropebert upcycle`: experts start as copies of the dense FFN; with --normalize-weights the upcycled model embeds
like its source, without it each MoE layer's FFN output is scaled by the top-k weight sum; the export reloads
without ropebert."""

from __future__ import annotations

import json

import pytest
import torch

from ropebert.errors import InputError
from ropebert.model import RopeBertModel
from ropebert.model.load import load_source
from ropebert.model.upcycle import upcycle
from ropebert.model.verify import verify_export
from tests.conftest import padded_batch, tiny_config

TEXTS = ["query: how do mixture of experts encoders route tokens?",
         "passage: Each token picks its top two experts; the router is a single linear layer. " * 6]


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return RopeBertModel(tiny_config(num_hidden_layers=4)).eval()


def test_experts_copy_the_dense_ffn_and_the_router_is_small_and_seeded(dense):
    m = upcycle(dense, num_experts=4, top_k=2, every_n_layers=2, seed=3)
    assert m.config.moe_layers == [1, 3] and dense.config.moe is None
    sd, src = m.state_dict(), dense.state_dict()
    for i in (1, 3):
        for e in range(4):
            assert torch.equal(sd[f"encoder.layer.{i}.moe.experts.intermediate_weight"][e],
                               src[f"encoder.layer.{i}.intermediate.dense.weight"])
            assert torch.equal(sd[f"encoder.layer.{i}.moe.experts.output_bias"][e],
                               src[f"encoder.layer.{i}.output.dense.bias"])
        r = sd[f"encoder.layer.{i}.moe.router.weight"]
        assert r.shape == (4, 32) and 5e-4 < r.std().item() < 2e-3
    for k in ("encoder.layer.0.intermediate.dense.weight", "encoder.layer.1.attention.self.query.weight",
              "encoder.layer.1.output.LayerNorm.weight", "embeddings.word_embeddings.weight"):
        assert torch.equal(sd[k], src[k])
    again = upcycle(dense, num_experts=4, top_k=2, every_n_layers=2, seed=3).state_dict()
    other = upcycle(dense, num_experts=4, top_k=2, every_n_layers=2, seed=4).state_dict()
    assert torch.equal(again["encoder.layer.1.moe.router.weight"], sd["encoder.layer.1.moe.router.weight"])
    assert not torch.equal(other["encoder.layer.1.moe.router.weight"], sd["encoder.layer.1.moe.router.weight"])


def test_normalized_upcycle_embeds_like_the_source_and_unnormalized_scales_the_ffn(dense):
    ids, mask = padded_batch([9, 14, 5])
    ref = dense.embed(ids, mask)
    norm = upcycle(dense, num_experts=4, top_k=2, every_n_layers=2, normalize_weights=True)
    assert (norm.embed(ids, mask) - ref).abs().max().item() <= 1e-5
    plain = upcycle(dense, num_experts=4, top_k=2, every_n_layers=2)
    assert (plain.embed(ids, mask) - ref).abs().max().item() > 1e-3
    # the documented relation, layer by layer: MoE FFN(x) = (sum of the top-k weights) * dense FFN(x)
    x = torch.randn(7, 32)
    layer, moe = dense.encoder.layer[1], plain.encoder.layer[1].moe
    ffn = layer.output.dense(layer.intermediate(x))  # (7, C)
    s = moe.route(x)[1].sum(-1, keepdim=True)  # (7, 1), about k / E = 0.5 with a fresh router
    assert ((s - 0.5).abs() < 0.01).all()
    torch.testing.assert_close(moe(x)[0], s * ffn, atol=1e-6, rtol=0)


def test_bad_settings_are_input_errors(dense):
    with pytest.raises(InputError, match="top_k=3 exceeds num_experts=2"):
        upcycle(dense, num_experts=2, top_k=3)
    with pytest.raises(InputError, match="already a mixture of experts"):
        upcycle(upcycle(dense, num_experts=2, top_k=1), num_experts=2, top_k=1)


def test_cli_upcycles_an_ape_bert_and_the_export_reloads_without_ropebert(minilm_dir, tmp_path, capsys):
    from ropebert.cli import main

    out = tmp_path / "moe"
    assert main(["upcycle", str(minilm_dir), "--out", str(out), "--experts", "4", "--top-k", "2", "--every", "2",
                 "--normalize-weights", "--seed", "1"]) == 0
    assert "MoE layers [1, 3, 5]" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["moe"] == {"num_experts": 4, "top_k": 2, "every_n_layers": 2, "normalize_weights": True,
                          "aux_loss_coef": 1.0}
    model = load_source(str(out))
    dense = load_source(str(minilm_dir))  # converted on the way, as upcycle did
    emb, ref = model.encode(TEXTS), dense.encode(TEXTS)
    assert (emb - ref).abs().max().item() <= 1e-5
    rep = verify_export(out, texts=TEXTS)
    assert rep["max_abs_diff"]["hf"] <= 1e-5 and rep["max_abs_diff"]["st"] <= 1e-5
    assert main(["upcycle", str(minilm_dir), "--out", str(tmp_path / "bad"), "--experts", "0"]) == 1
    assert "num_experts must be an int >= 1" in capsys.readouterr().err
