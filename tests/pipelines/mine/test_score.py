"""`ropebert score`: stage-2 shards re-scored by a re-ranker (logits) or a bi-encoder (cosine); score_kind round-trips
and decides the default distillation temperature."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ropebert.cli import main as cli
from ropebert.shards.format import iter_shard, load_manifest, shard_path
from tests.conftest import make_pair_shards


def _samples(d):
    m = load_manifest(d)
    return m, [(k, s) for e in m["shards"] for k, s in iter_shard(shard_path(d, e))]


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory, minilm_dir):
    """A random 1-label BertForSequenceClassification with MiniLM's tokenizer: a CrossEncoder directory."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-ce")
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=1)
    BertForSequenceClassification(cfg).eval().save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_cross_encoder_scores_are_its_logits(tmp_path, tiny_cross_encoder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = tmp_path / "hn"
    make_pair_shards(src, [5, 4], kind="hard_negatives", num_negatives=3)
    out = tmp_path / "scored"
    assert cli(["score", str(src), "--teacher", str(tiny_cross_encoder), "--out", str(out), "--no-progress"]) == 0
    m, samples = _samples(out)
    assert m["kind"] == "hard_negatives" and m["score_kind"] == "logits" and m["total_samples"] == 9
    assert m["score_teacher"]["path"] == str(tiny_cross_encoder) and len(m["score_teacher"]["sha256"]) == 64
    # an independent computation: the classifier's logit for each (query, candidate) pair
    tok = AutoTokenizer.from_pretrained(str(tiny_cross_encoder))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_cross_encoder)).eval()
    _, src_samples = _samples(src)
    for (key, s), (k0, s0) in zip(samples, src_samples):
        assert key == k0 and s["negatives"] == s0["negatives"] and s["scores"] != s0["scores"]
        cands = [s["positive"]] + s["negatives"]
        b = tok([s["query"]] * len(cands), cands, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            want = model(**b).logits[:, 0].tolist()
        assert len(s["scores"]) == 4 and all(math.isclose(a, w, abs_tol=1e-4) for a, w in zip(s["scores"], want))
    # the source is untouched; a re-run without --overwrite refuses; --out inside the source is refused
    assert "score_kind" not in load_manifest(src)
    assert cli(["score", str(src), "--teacher", str(tiny_cross_encoder), "--out", str(out), "--no-progress"]) == 1
    assert cli(["score", str(src), "--teacher", str(tiny_cross_encoder), "--out", str(src / "x"), "--no-progress"]) == 1


def test_bi_encoder_scores_are_cosines(tmp_path, tiny_bert_dir):
    src = tmp_path / "hn"
    make_pair_shards(src, [3], kind="hard_negatives", num_negatives=2)
    out = tmp_path / "scored"
    assert cli(["score", str(src), "--teacher", str(tiny_bert_dir), "--out", str(out), "--no-progress"]) == 0
    m, samples = _samples(out)
    assert m["score_kind"] == "cosine"
    assert all(-1.0001 <= x <= 1.0001 for _, s in samples for x in s["scores"])
    with pytest.raises(Exception, match="re-scores hard_negatives shards"):
        from ropebert.pipelines.mine.score import score_shards

        pairs = tmp_path / "pairs"
        make_pair_shards(pairs, [3])
        score_shards(str(pairs), str(tmp_path / "o2"), str(tiny_bert_dir))


def test_score_kind_sets_the_default_temperature(tmp_path, tiny_bert_dir, hn_shards):
    """stage 2 reads score_kind: cosine -> 0.05, logits -> 1.0; no score_kind is a clear error; explicit wins."""
    from ropebert.errors import InputError
    from ropebert.pipelines.train.fit import cli_main

    def run(shards, *extra):
        return cli_main(["--model.init_from", str(tiny_bert_dir), "--model.stage", "finetune",
                         "--data.train_dir", str(shards), "--data.batch_size", "4", "--data.num_workers", "0",
                         "--data.max_query_length", "16", "--data.max_passage_length", "16",
                         "--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                         "--trainer.enable_progress_bar", "false", "--checkpoint.dirpath", str(tmp_path / "ck"),
                         "--trainer.default_root_dir", str(tmp_path), *extra])

    with pytest.raises(InputError, match="does not say what its teacher scores are"):
        run(hn_shards)
    assert run(hn_shards, "--model.teacher_temperature", "0.5").model._shard_score_temperature == 0.5
    for kind, want in (("cosine", 0.05), ("logits", 1.0)):
        d = tmp_path / kind
        make_pair_shards(d, [8], kind="hard_negatives", num_negatives=7)
        m = json.loads((d / "manifest.json").read_text())
        (d / "manifest.json").write_text(json.dumps(dict(m, score_kind=kind)))
        assert run(d, "--checkpoint.dirpath", str(tmp_path / f"ck-{kind}")).model._shard_score_temperature == want
