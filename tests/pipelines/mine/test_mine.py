"""`ropebert mine`: stage-2 shards from BEIR (msmarco) and from pair shards; guard, determinism, restart."""

from __future__ import annotations

import pytest
import torch

from ropebert.cli import main as cli
from ropebert.shards.beir import load_objects, passage_text, read_qrels
from ropebert.shards.format import iter_shard, load_manifest, shard_path, verify_shards
from tests.conftest import make_pair_shards


@pytest.fixture(scope="module")
def converted_minilm(minilm_dir):
    """all-MiniLM-L6-v2 converted to RoPE BERT once per module (conversion is slow on a busy 2-core box)."""
    from ropebert.model.load import load_source

    return load_source(str(minilm_dir))


@pytest.fixture
def cached_model(monkeypatch, converted_minilm, minilm_dir):
    import ropebert.model.export as export

    real = export.load_source
    monkeypatch.setattr(export, "load_source", lambda p: converted_minilm if str(p) == str(minilm_dir) else real(p))


def _samples(d):
    m = load_manifest(d)
    return m, [(k, s) for e in m["shards"] for k, s in iter_shard(shard_path(d, e))]


def test_topk_blocked_matches_full_topk():
    from ropebert.pipelines.search import topk_blocked

    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(7, 16, generator=g), torch.randn(1000, 16, generator=g)
    s, i = topk_blocked(q, c, 25, block_size=97)
    ref_s, ref_i = (q @ c.T).topk(25, dim=1)
    assert torch.allclose(s, ref_s) and torch.equal(i, ref_i)


def test_mine_msmarco_never_picks_judged_passages(tmp_path, shared_data, minilm_dir, cached_model, capsys):
    root = shared_data / "msmarco"
    out = tmp_path / "mined"
    rc = cli(["mine", "--model", str(minilm_dir), "--input", str(root), "--out", str(out), "--max-queries", "2",
              "--corpus-limit", "220", "--max-length", "64", "--top-k", "30", "--maxcount", "2", "--on-error", "skip",
              "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    m, samples = _samples(out)
    assert m["kind"] == "hard_negatives" and verify_shards(out, m) == []
    assert m["total_samples"] + m["skipped"]["count"] == 2 and m["total_samples"] >= 1
    assert not (out / "mine_state.json").exists() and not (out / "corpus_embeddings.pt").exists()
    qrels = read_qrels(root / "qrels" / "test.tsv")
    corpus = {d: obj for d, (obj, _) in load_objects(root / "corpus.jsonl", "corpus")[0].items()}
    for key, s in samples:
        qid = s["meta"]["qid"]
        judged = set(qrels[qid])  # any grade
        judged_texts = {passage_text(corpus[d]) for d in judged}
        assert len(s["negatives"]) == 7 and len(s["scores"]) == 8
        assert judged.isdisjoint(s["meta"]["negative_ids"])
        assert judged_texts.isdisjoint(s["negatives"])
        assert s["meta"]["positive_id"] in judged and s["positive"] == passage_text(corpus[s["meta"]["positive_id"]])
        assert s["scores"][1:] == sorted(s["scores"][1:], reverse=True)
        assert all(x <= 0.95 * s["scores"][0] + 1e-6 for x in s["scores"][1:])  # false-negative guard


def test_mine_pair_shards_deterministic_and_restartable(tmp_path, minilm_dir, cached_model, monkeypatch):
    from ropebert.pipelines.mine import negatives as mine_mod

    src = tmp_path / "pairs"
    make_pair_shards(src, [15, 9])
    args = ["mine", "--model", str(minilm_dir), "--input", str(src), "--format", "shards", "--top-k", "12",
            "--guard", "none", "--maxcount", "5", "--max-length", "32", "--no-progress"]
    assert cli(args + ["--out", str(tmp_path / "a")]) == 0
    ma, sa = _samples(tmp_path / "a")
    assert ma["total_samples"] == 24 and [e["samples"] for e in ma["shards"]] == [5, 5, 5, 5, 4]
    for key, s in sa:
        assert s["positive"] not in s["negatives"] and len(set(s["negatives"])) == 7

    # interrupt after two finished shards, then restart: same shards, finished ones kept
    real, calls = mine_mod.pick_negatives, {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(mine_mod, "pick_negatives", flaky)
    with pytest.raises(KeyboardInterrupt):
        cli(args + ["--out", str(tmp_path / "b")])
    work = tmp_path / ".b.mining"  # the unfinished run lives beside --out; --out itself is not created yet
    assert (work / "mine_state.json").is_file() and (work / "shard-000001.tar").is_file()
    assert not (tmp_path / "b").exists()
    monkeypatch.setattr(mine_mod, "pick_negatives", real)
    assert cli(args + ["--out", str(tmp_path / "b")]) == 0
    mb, _ = _samples(tmp_path / "b")
    assert [e["sha256"] for e in mb["shards"]] == [e["sha256"] for e in ma["shards"]]
    # a stage-2 DataModule reads them
    from ropebert.shards.datamodule import ShardDataModule

    dm = ShardDataModule(str(tmp_path / "b"), str(minilm_dir), batch_size=4, kind="hard_negatives", num_workers=0,
                         max_passage_length=16)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["negatives"]["input_ids"].shape[0] == 28 and b["teacher_scores"].shape == (4, 8)


def test_mine_a_mixture_takes_queries_from_every_source(tmp_path, minilm_dir, cached_model, capsys):
    """--format shards with a mixture file: queries round-robin over the sources, the corpus is all of them."""
    data = tmp_path / "data"
    for name, sizes in (("wiki", [10]), ("code", [6])):
        make_pair_shards(data / name, sizes, prefix=f"{name}-")
    mix = data / "mix.yaml"
    mix.write_text("sources:\n  - {path: wiki}\n  - {path: code}\n")
    args = ["mine", "--model", str(minilm_dir), "--input", str(mix), "--format", "shards", "--top-k", "12",
            "--guard", "none", "--max-queries", "8", "--max-length", "32", "--no-progress"]
    assert cli(args + ["--out", str(tmp_path / "mined")]) == 0
    _, samples = _samples(tmp_path / "mined")
    keys = [k for k, _ in samples]
    assert sorted(keys) == sorted([f"wiki-s0_{i}" for i in range(4)] + [f"code-s0_{i}" for i in range(4)])
    negatives = {n for _, s in samples for n in s["negatives"]}
    assert any(n.startswith("wiki-") for n in negatives) and any(n.startswith("code-") for n in negatives)

    # a key in two sources is refused, naming both
    make_pair_shards(data / "copy", [3], prefix="wiki-")
    mix.write_text("sources:\n  - {path: wiki}\n  - {path: copy}\n")
    assert cli(args + ["--out", str(tmp_path / "mined2")]) != 0
    err = capsys.readouterr().err
    assert "key 'wiki-s0_0' is in source 'wiki' and in source 'copy'" in err and not (tmp_path / "mined2").exists()
    # --out inside a source that lives outside the mixture file's directory is refused as well
    make_pair_shards(tmp_path / "far", [6], prefix="far-")
    mix.write_text(f"sources:\n  - {{path: wiki}}\n  - {{path: {tmp_path / 'far'}}}\n")
    assert cli(args + ["--out", str(tmp_path / "far" / "mined")]) != 0
    assert "is inside the source" in capsys.readouterr().err and not (tmp_path / "far" / "mined").exists()
    # mined (hard-negative) shards are no input to mine: a clear error, not a silent read as pairs
    plain = args[:args.index("--input") + 1] + [str(tmp_path / "mined")] + args[args.index("--input") + 2:]
    assert cli(plain + ["--out", str(tmp_path / "mined3")]) != 0
    assert "reads pair shards (query -> positive); this manifest is 'hard_negatives'" in capsys.readouterr().err
    assert not (tmp_path / "mined3").exists()


def test_mine_drops_copies_of_judged_passages_and_repeated_texts(tmp_path, minilm_dir, cached_model):
    """A corpus copy of a judged passage (another id, same text) is never a negative, even without the guard;
    repeated texts give one negative, not several copies."""
    import json

    root = tmp_path / "beir"
    (root / "qrels").mkdir(parents=True)
    docs = [("pos", "The Eiffel Tower is in Paris, the capital of France."),
            ("copy", "The Eiffel Tower is in Paris, the capital of France."),  # unjudged copy of the positive
            ("dupa", "Berlin is the capital of Germany."), ("dupb", "Berlin is the capital of Germany.")]
    docs += [(f"n{i}", f"Unrelated passage number {i} about topic {i * 7 % 11}.") for i in range(6)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n" for i, t in docs))
    (root / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "where is the Eiffel Tower"}) + "\n")
    (root / "qrels" / "test.tsv").write_text("q1\tpos\t2\n")
    out = tmp_path / "mined"
    assert cli(["mine", "--model", str(minilm_dir), "--input", str(root), "--out", str(out), "--top-k", "15",
                "--guard", "none", "--max-length", "32", "--no-progress"]) == 0
    _, samples = _samples(out)
    ((key, s),) = samples
    # 9 candidates besides the positive; without the copy and one of the two Berlin passages exactly 7 are left
    assert "copy" not in s["meta"]["negative_ids"] and s["positive"] not in s["negatives"]
    assert set(s["meta"]["negative_ids"]) - {"dupa", "dupb"} == {f"n{i}" for i in range(6)}
    assert len(set(s["negatives"])) == 7 and len({"dupa", "dupb"} & set(s["meta"]["negative_ids"])) == 1
