"""`ropebert mine` never loses data and never drops a query silently: --out is written aside and swapped in when
complete (never the input, never inside it), the unfinished run restarts from its work directory, its state and
cache are written atomically, and BEIR input problems are errors or counted skips (the shards-build reader)."""

from __future__ import annotations

import json

import pytest

from ropebert.cli import main as cli
from ropebert.shards.format import iter_shard, load_manifest, shard_path
from tests.conftest import export_tiny_model, make_pair_shards


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, minilm_dir):
    return export_tiny_model(tmp_path_factory.mktemp("tiny") / "model", minilm_dir, 128)


def _args(model, src, out, *extra, fmt="shards"):
    return ["mine", "--model", str(model), "--input", str(src), "--out", str(out), "--format", fmt, "--top-k", "6",
            "--num-negatives", "2", "--guard", "none", "--maxcount", "4", "--max-length", "16", "--no-progress",
            *extra]


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_out_equal_to_or_inside_the_input_is_refused(tmp_path, tiny_model, capsys):
    src = tmp_path / "pairs"
    make_pair_shards(src, [6, 5])
    before = _snapshot(src)
    assert cli(_args(tiny_model, src, src, "--overwrite")) == 1
    assert "is the source directory" in capsys.readouterr().err
    assert cli(_args(tiny_model, src, src / "mined", "--overwrite")) == 1
    assert "inside the source" in capsys.readouterr().err
    assert _snapshot(src) == before and sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]


def test_overwrite_replaces_only_a_previous_output_and_only_when_complete(tmp_path, tiny_model, capsys,
                                                                           monkeypatch):
    from ropebert.pipelines.mine import negatives as mine_mod

    src, out = tmp_path / "pairs", tmp_path / "mined"
    make_pair_shards(src, [6, 5])
    assert cli(_args(tiny_model, src, out)) == 0
    before = _snapshot(out)
    assert sorted(before) == ["manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    # a failing --overwrite run (killed mid-mining) leaves the previous output as it was
    real, calls = mine_mod.pick_negatives, {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(mine_mod, "pick_negatives", flaky)
    with pytest.raises(KeyboardInterrupt):
        cli(_args(tiny_model, src, out, "--overwrite", "--seed", "1"))
    assert _snapshot(out) == before
    monkeypatch.setattr(mine_mod, "pick_negatives", real)
    # the restart (same arguments) continues the work directory, then swaps it in
    assert cli(_args(tiny_model, src, out, "--overwrite", "--seed", "1")) == 0
    assert "resuming the unfinished run" in capsys.readouterr().err
    assert load_manifest(out)["source"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mined", "pairs"]  # no work dir left
    # a directory holding anything else is never replaced
    (out / "notes.txt").write_text("keep me")
    assert cli(_args(tiny_model, src, out, "--overwrite")) == 1
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").is_file()


def test_unfinished_run_with_other_arguments_and_bad_state(tmp_path, tiny_model, capsys, monkeypatch):
    from ropebert.pipelines.mine import negatives as mine_mod

    src, out = tmp_path / "pairs", tmp_path / "mined"
    make_pair_shards(src, [6, 5])
    # a run that fails before mining anything (a bad --model) leaves nothing that blocks the next one
    assert cli(_args(tmp_path / "no-such-model", src, out)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]
    real, calls = mine_mod.pick_negatives, {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # the first chunk (4 queries) is finished
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(mine_mod, "pick_negatives", flaky)
    with pytest.raises(KeyboardInterrupt):
        cli(_args(tiny_model, src, out))
    monkeypatch.undo()
    work = tmp_path / ".mined.mining"
    assert len(json.loads((work / "mine_state.json").read_text())["shards"]) == 1
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files
    assert cli(_args(tiny_model, src, out, "--seed", "5")) == 1
    err = capsys.readouterr().err
    assert "unfinished mining run with other arguments" in err and "--overwrite" in err
    # a truncated state names the file; the advice (--overwrite) is accepted by the restart
    (work / "mine_state.json").write_text('{"fingerprint": "ab')
    assert cli(_args(tiny_model, src, out)) == 1
    err = capsys.readouterr().err
    assert "mine_state.json: unreadable mining state" in err and "--overwrite" in err
    # a truncated embedding cache is recomputed (it is only a cache), naming the file
    (work / "corpus_embeddings.pt").write_bytes(b"PK\x03\x04trunc")
    assert cli(_args(tiny_model, src, out, "--overwrite")) == 0
    assert load_manifest(out)["total_samples"] == 11


def test_too_few_negatives_advice_is_accepted_by_the_restart(tmp_path, tiny_model, capsys):
    src, out = tmp_path / "pairs", tmp_path / "mined"
    make_pair_shards(src, [3])  # 3 distinct passages: a query has 2 candidates besides its positive
    assert cli(_args(tiny_model, src, out, "--num-negatives", "3", "--top-k", "3")) == 1
    err = capsys.readouterr().err
    assert "pass --on-error skip" in err
    assert cli(_args(tiny_model, src, out, "--num-negatives", "3", "--top-k", "3", "--on-error", "skip")) == 1
    err = capsys.readouterr().err
    assert "other arguments" not in err and "mining wrote no samples (3 queries skipped)" in err


# -- BEIR input: the shards-build reader, its errors and counted skips ---------------------------------------


def _beir(root, corpus, queries, qrels):
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{a}\t{b}\t{g}\n" for a, b, g in qrels))
    return root


@pytest.fixture
def bad_beir(tmp_path):
    corpus = [{"_id": f"c{i}", "text": f"passage number {i} about {i * 3}"} for i in range(8)]
    corpus.append({"_id": "c1", "text": "A DIFFERENT TEXT UNDER A REPEATED ID"})  # corpus.jsonl:9
    queries = [{"_id": f"q{i}", "text": f"question {i}"} for i in range(3)]
    qrels = [("q0", "c0", 1), ("q1", "c1", 1), ("q2", "gone", 1), ("q9", "c3", 1)]
    return _beir(tmp_path / "beir", corpus, queries, qrels)


@pytest.mark.parametrize("expected", [
    "corpus.jsonl:9: duplicate key (corpus _id 'c1' first seen at",
])
def test_beir_bad_input_fails_naming_file_and_line(tmp_path, tiny_model, bad_beir, capsys, expected):
    assert cli(_args(tiny_model, bad_beir, tmp_path / "out", fmt="beir")) == 1
    err = capsys.readouterr().err
    assert expected in err and "--on-error skip" in err
    assert not (tmp_path / "out").exists()


def test_beir_absent_passage_unknown_query_duplicate_id_are_counted_skips(tmp_path, tiny_model, bad_beir):
    assert cli(_args(tiny_model, bad_beir, tmp_path / "out", "--on-error", "skip", fmt="beir")) == 0
    m = load_manifest(tmp_path / "out")
    assert m["skipped"]["by_reason"] == {"duplicate key": 1, "unknown corpus id": 1, "unknown query id": 1}
    samples = {s["meta"]["qid"]: s for e in m["shards"] for _, s in iter_shard(shard_path(tmp_path / "out", e))}
    assert sorted(samples) == ["q0", "q1"]
    assert samples["q1"]["positive"] == "passage number 1 about 3"  # the first c1, not the repeated id's text
    # each problem alone, strictly: the error names the qrels line
    for qrels, msg in (([("q0", "c0", 1), ("q2", "gone", 1)], "test.tsv:3: unknown corpus id (gone)"),
                       ([("q0", "c0", 1), ("q9", "c3", 1)], "test.tsv:3: unknown query id (q9)")):
        root = _beir(tmp_path / f"b{len(msg)}", [{"_id": f"c{i}", "text": f"p {i}"} for i in range(8)],
                     [{"_id": "q0", "text": "question"}, {"_id": "q2", "text": "other"}], qrels)
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            from ropebert.pipelines.mine.negatives import build_parser, mine

            mine(build_parser().parse_args(_args(tiny_model, root, tmp_path / "o", fmt="beir")[1:]))
