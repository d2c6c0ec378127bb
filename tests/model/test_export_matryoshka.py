"""`ropebert export --dim D --layers N`: a Matryoshka cut of a model, equal (in plain transformers and
sentence-transformers, without ropebert) to the full model's layer-N embedding cut to D channels and renormalised."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from ropebert.model import RopeBertModel
from ropebert.model.export import export_model
from ropebert.model.load import load_source
from ropebert.model.verify import run_fresh_reload
from tests.conftest import tiny_config

TEXTS = ["query: how do rotary embeddings work?", "passage: they rotate query and key pairs by angles " * 5]


@pytest.fixture(scope="module")
def full_export(minilm_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=30522, num_hidden_layers=3, max_position_embeddings=128,
                      matryoshka_dims=[32, 16, 8], matryoshka_layers=[1, 2, 3])
    model = RopeBertModel(cfg).eval()
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    out = export_model(model, tmp_path_factory.mktemp("full") / "m", tokenizer=tok)
    return model, tok, out


def _reference(model, tok, layer, dim):
    """The full model's pooled layer-`layer` output, cut to `dim` channels and renormalised, computed by hand."""
    rows = []
    for t in TEXTS:
        b = tok([t], return_tensors="pt")
        with torch.no_grad():
            h = model(**b, output_hidden_states=True).hidden_states[layer]  # (1, L, C)
        m = b["attention_mask"][..., None].float()
        rows.append(F.normalize(((h * m).sum(1) / m.sum(1))[:, :dim], dim=-1)[0])
    return torch.stack(rows)  # (N, dim)


def test_dim_and_layers_export_matches_the_full_models_cut_output(full_export, tmp_path, caplog):
    from ropebert.cli import main

    model, tok, src = full_export
    saved = json.loads((src / "config.json").read_text())
    assert saved["matryoshka_dims"] == [32, 16, 8] and saved["matryoshka_layers"] == [1, 2, 3]
    assert saved["embedding_dim"] is None
    out = tmp_path / "cut"
    with caplog.at_level(logging.WARNING):
        assert main(["export", str(src), "--out", str(out), "--dim", "16", "--layers", "2"]) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "export --" in r.getMessage()]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["embedding_dim"] == 16 and cfg["num_hidden_layers"] == 2 and cfg["matryoshka_dims"] == [32, 16, 8]
    assert json.loads((out / "config_sentence_transformers.json").read_text())["truncate_dim"] == 16
    ref = _reference(model, tok, layer=2, dim=16)
    assert ref.shape == (2, 16)
    # ropebert's own loader
    got = load_source(str(out)).encode(TEXTS)
    assert got.shape == (2, 16)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # a fresh process without ropebert: AutoModel (remote code) and SentenceTransformer
    res = run_fresh_reload(out, {"texts": TEXTS, "sentence_transformers": True})
    assert res["ropebert_imported"] is False and res["st_dim"] == 16
    for key in ("hf", "st"):
        torch.testing.assert_close(torch.tensor(res[key]), ref, rtol=0, atol=1e-5, msg=lambda m: f"{key}: {m}")
    # and the cut really is a different embedding from the full one
    full = _reference(model, tok, layer=3, dim=32)
    assert (full[:, :16] - ref).abs().max().item() > 1e-3


def test_untrained_dim_warns_with_the_trained_dims_and_out_of_range_is_refused(full_export, tmp_path, caplog):
    from ropebert.cli import main

    model, tok, src = full_export
    with caplog.at_level(logging.WARNING):
        assert main(["export", str(src), "--out", str(tmp_path / "d12"), "--dim", "12"]) == 0
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("--dim 12" in m and "trained for dims [32, 16, 8]" in m for m in msgs), msgs
    torch.testing.assert_close(load_source(str(tmp_path / "d12")).encode(TEXTS), _reference(model, tok, 3, 12),
                               rtol=0, atol=1e-5)
    assert main(["export", str(src), "--out", str(tmp_path / "d64"), "--dim", "64"]) == 1
    assert main(["export", str(src), "--out", str(tmp_path / "l4"), "--layers", "4"]) == 1
    assert not (tmp_path / "d64").exists() and not (tmp_path / "l4").exists()


def test_dim_on_a_model_not_trained_for_it_warns(minilm_dir, tmp_path, caplog):
    from ropebert.cli import main

    with caplog.at_level(logging.WARNING):
        assert main(["export", str(minilm_dir), "--out", str(tmp_path / "o"), "--dim", "128"]) == 0
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not trained with matryoshka_dims" in m for m in msgs), msgs
    assert load_source(str(tmp_path / "o")).encode(TEXTS).shape == (2, 128)
