"""False negatives end to end: the text normalisation and hash, the loader's `hashes`, and a tiny fit step that
passes them to the loss and logs the count of masked candidates."""

from __future__ import annotations

import json

import torch

from ropebert.pipelines.train.fit import cli_main
from ropebert.shards.hashing import normalize_text, text_hash, text_hashes
from tests.pipelines.train.test_train import _base_args


def test_normalisation_and_hash():
    assert normalize_text("  What\u00a0is   \uff32\uff4f\uff30\uff25?\n") == "what is rope?"  # NBSP, full-width
    assert normalize_text("STRASSE") == normalize_text("straße")  # casefold, not lower()
    h = text_hash("What is RoPE?")
    assert h == text_hash(" what  is rope?\t") != text_hash("what is rope")
    assert -(2**63) <= h < 2**63
    assert h == -8470728729419427334  # BLAKE2b-64 of "what is rope?": the same on every platform and process
    t = text_hashes(["a", "A ", "b"])
    assert t.dtype == torch.int64 and t[0] == t[1] != t[2]


def _dup_shards(out):
    """16 pairs: every 4th positive is one passage written 4 ways, queries 3 and 11 are one question."""
    from ropebert.shards.format import ShardWriter, write_manifest

    out.mkdir(parents=True)
    w = ShardWriter(out, maxcount=10**9)
    variants = ["The shared answer.", "the  shared answer.", "THE SHARED ANSWER.", " The shared\nanswer. "]
    samples = {}
    for i in range(16):
        s = {"query": "the same question?" if i in (3, 11) else f"question {i}",
             "positive": variants[i // 4] if i % 4 == 0 else f"answer {i}"}
        samples[f"k{i}"] = s
        w.write(f"k{i}", s)
    write_manifest(out, kind="pairs", shards=w.close(), source={"format": "test"})
    return samples


def test_collator_carries_hashes(tmp_path, tiny_bert_dir):
    from ropebert.shards.datamodule import BatchCollator

    c = BatchCollator(str(tiny_bert_dir), "hard_negatives", 2, 16, 16, "query: ", "passage: ")
    batch = c([("a", {"query": "Q one", "positive": "P", "negatives": ["n1", "P "]}, "x"),
               ("b", {"query": "q  ONE", "positive": "other", "negatives": ["n3", "n4", "n5"]}, "x")])
    h = batch["hashes"]
    assert h["query"].tolist() == [text_hash("Q one")] * 2  # without the prefix, normalised
    assert h["passage"].tolist() == [text_hash("P"), text_hash("other")]
    assert h["negatives"].shape == (2, 2) and h["negatives"][0, 1] == h["passage"][0]
    assert h["negatives"][1].tolist() == [text_hash("n3"), text_hash("n4")]


def test_fit_step_masks_and_logs_false_negatives(tmp_path, tiny_bert_dir, monkeypatch):
    from ropebert.pipelines.train.module import RopeBertContrastive

    logged = []
    real = RopeBertContrastive.log_dict

    def spy(self, metrics, *a, **kw):
        if "train/false_negatives_masked" in metrics:
            logged.append(float(metrics["train/false_negatives_masked"]))
        return real(self, metrics, *a, **kw)

    monkeypatch.setattr(RopeBertContrastive, "log_dict", spy)
    samples = _dup_shards(tmp_path / "shards")
    cli = cli_main(_base_args(tiny_bert_dir, tmp_path / "shards", tiny_bert_dir, tmp_path / "run", steps=2, extra=(
        "--data.sample_log", str(tmp_path / "samples"))))
    assert cli.trainer.global_step == 2
    steps = [json.loads(x) for x in (tmp_path / "samples" / "rank-0.jsonl").read_text().splitlines()]
    want = []
    for rec in steps:  # each query's masked candidates: the other copies of its positive, the other same question
        p = [text_hash(samples[k]["positive"]) for k in rec["keys"]]
        q = [text_hash(samples[k]["query"]) for k in rec["keys"]]
        want.append(float(sum(1 for i in range(8) for j in range(8) if i != j and (p[i] == p[j] or q[i] == q[j]))))
    assert logged == want
    assert sum(want) >= 4  # 4 copies in 2 batches of 8: at least 2 + 2 in the same batch
    # switched off: nothing is masked (and the count is not logged)
    logged.clear()
    cli_main(_base_args(tiny_bert_dir, tmp_path / "shards", tiny_bert_dir, tmp_path / "off", steps=1, extra=(
        "--model.mask_false_negatives", "false",)))
    assert logged == []
