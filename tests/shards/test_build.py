"""`ropebert shards build|inspect|verify`: sources, manifest, bad inputs, integrity checks."""

from __future__ import annotations

import json

import pytest

from ropebert.cli import main as cli
from ropebert.shards.beir import read_qrels
from ropebert.shards.format import iter_shard, load_manifest, shard_path


def _write_jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return path


def _good_rows(n=25):
    return [{"q": f"question {i}", "p": f"answer {i} " * (1 + i % 4), "id": f"doc.{i}"} for i in range(n)]


def _build(tmp_path, src, *extra, out="out"):
    return cli(["shards", "build", "--input", str(src), "--format", "jsonl", "--query-field", "q",
                "--passage-field", "p", "--out", str(tmp_path / out), "--no-progress", *extra])


def test_build_jsonl_manifest_and_webdataset_compat(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.v1.jsonl", _good_rows())
    assert _build(tmp_path, src, "--maxcount", "10", "--key-field", "id") == 0
    m = load_manifest(tmp_path / "out")
    assert m["kind"] == "pairs" and m["total_samples"] == 25
    assert [s["samples"] for s in m["shards"]] == [10, 10, 5]
    assert m["total_bytes"] == sum(s["bytes"] for s in m["shards"])
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    assert m["source"]["format"] == "jsonl" and m["schema"]["fields"]["query"] == "str"
    assert m["skipped"]["count"] == 0
    keys = [k for e in m["shards"] for k, _ in iter_shard(shard_path(tmp_path / "out", e))]
    assert keys[:2] == ["doc_0", "doc_1"] and all("." not in k for k in keys)  # dots never reach a key
    # webdataset reads the shards as one sample per key
    import webdataset as wds

    ds = wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False).decode()
    first = next(iter(ds))
    assert first["__key__"] == "doc_0" and first["json"]["query"] == "question 0"
    # deterministic: a rebuild is byte-identical
    assert _build(tmp_path, src, "--maxcount", "10", "--key-field", "id", out="again") == 0
    assert [s["sha256"] for s in load_manifest(tmp_path / "again")["shards"]] == [s["sha256"] for s in m["shards"]]
    # inspect summarises
    capsys.readouterr()
    assert cli(["shards", "inspect", str(tmp_path / "out")]) == 0
    assert "samples:  25" in capsys.readouterr().out


def test_maxsize_rolls_over(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", _good_rows(40))
    assert _build(tmp_path, src, "--maxsize", "8KB") == 0
    m = load_manifest(tmp_path / "out")
    assert len(m["shards"]) > 1 and m["total_samples"] == 40
    assert all(s["bytes"] <= 8000 + 10240 for s in m["shards"])


BAD_CASES = [
    ("malformed JSON", b'{"q": "a", "p": \n', "malformed JSON"),
    ("missing field", {"q": "only a query", "id": "m1"}, "missing field ('p')"),
    ("non-UTF-8", b'{"q": "caf\xe9", "p": "x", "id": "u1"}\n', "non-UTF-8"),
    ("empty text", {"q": "   ", "p": "x", "id": "e1"}, "empty or whitespace-only"),
    ("duplicate key", {"q": "dup", "p": "x", "id": "doc.3"}, "duplicate key"),
]


@pytest.mark.parametrize("name,row,msg", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_fails_with_file_line(tmp_path, capsys, name, row, msg):
    rows = _good_rows(6)
    rows.insert(4, row)  # line 5
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    assert _build(tmp_path, src, "--key-field", "id") == 1
    err = capsys.readouterr().err
    assert f"{src}:5: {msg}" in err and "--on-error skip" in err
    if name == "duplicate key":
        assert f"first seen at {src}:4" in err


def test_bad_input_skip_is_counted_and_stored(tmp_path, capsys):
    rows = _good_rows(10)
    for i, (_, row, _) in enumerate(BAD_CASES):
        rows.insert(2 * i + 1, row)
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    assert _build(tmp_path, src, "--key-field", "id", "--on-error", "skip") == 0
    err = capsys.readouterr().err
    m = load_manifest(tmp_path / "out")
    assert m["total_samples"] == 10 and m["skipped"]["count"] == 5
    assert set(m["skipped"]["by_reason"]) == {"malformed JSON", "missing field", "non-UTF-8 bytes",
                                              "empty or whitespace-only text", "duplicate key"}
    assert "skipped 5 bad inputs" in err and f"{src}:2: malformed JSON" in err


def test_verify_names_missing_truncated_and_altered_shards(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", _good_rows(40))
    assert _build(tmp_path, src, "--maxcount", "10") == 0
    out = tmp_path / "out"
    assert cli(["shards", "verify", str(out), "--no-progress"]) == 0
    p0, p1, p2 = (out / f"shard-00000{i}.tar" for i in range(3))
    data = p0.read_bytes()
    p0.write_bytes(data[: len(data) // 2])  # truncated
    data = bytearray(p1.read_bytes())
    data[700] ^= 0x01  # one flipped bit inside a sample
    p1.write_bytes(bytes(data))
    p2.unlink()
    capsys.readouterr()
    assert cli(["shards", "verify", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "shard-000000.tar: truncated" in err
    assert "shard-000001.tar: altered (sha256" in err
    assert "shard-000002.tar: missing" in err
    assert "shard-000003.tar" not in err and "3 problem(s) found, 4 shards listed" in err


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = _good_rows(12)
    rows[5]["p"] = ""
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    args = ["shards", "build", "--input", str(tmp_path / "in.parquet"), "--format", "parquet", "--query-field", "q",
            "--passage-field", "p", "--no-progress"]
    assert cli(args + ["--out", str(tmp_path / "a")]) == 1
    assert cli(args + ["--out", str(tmp_path / "b"), "--on-error", "skip"]) == 0
    m = load_manifest(tmp_path / "b")
    assert m["total_samples"] == 11 and m["skipped"]["examples"][0].startswith(f"{tmp_path / 'in.parquet'}:row 6")


def test_beir_qrels_source(tmp_path, shared_data):
    root = shared_data / "msmarco"
    assert cli(["shards", "build", "--input", str(root), "--format", "beir", "--out", str(tmp_path / "o"),
                "--min-grade", "2", "--no-progress"]) == 0
    m = load_manifest(tmp_path / "o")
    qrels = read_qrels(root / "qrels" / "test.tsv")
    assert m["total_samples"] == sum(g >= 2 for q in qrels.values() for g in q.values())
    key, s = next(iter_shard(shard_path(tmp_path / "o", m["shards"][0])))
    assert s["meta"]["grade"] >= 2 and key == f"{s['meta']['qid']}-{s['meta']['doc_id']}"


def test_docstrings_source_splits_are_disjoint(tmp_path):
    base = ["shards", "build", "--format", "docstrings", "--input", "json", "email", "--no-progress",
            "--heldout-fraction", "0.3"]
    outs = {}
    for split in ("all", "train", "heldout"):
        assert cli(base + ["--split", split, "--out", str(tmp_path / split)]) == 0
        m = load_manifest(tmp_path / split)
        outs[split] = {k: s for e in m["shards"] for k, s in iter_shard(shard_path(tmp_path / split, e))}
    assert len(outs["all"]) > 50
    assert outs["train"].keys().isdisjoint(outs["heldout"].keys())
    assert outs["train"].keys() | outs["heldout"].keys() == outs["all"].keys()
    assert {s["query"] for s in outs["train"].values()}.isdisjoint({s["query"] for s in outs["heldout"].values()})
    assert 0.15 < len(outs["heldout"]) / len(outs["all"]) < 0.45
    s = next(iter(outs["all"].values()))
    assert s["positive"].startswith(("def ", "class ", "async def ")) and s["query"].strip()
    assert s["meta"]["origin"].split(":")[0] in ("json", "email")


def test_prose_source_splits_are_disjoint_and_queries_are_not_in_their_positives(tmp_path, capsys):
    base = ["shards", "build", "--format", "prose", "--no-progress", "--heldout-fraction", "0.5"]
    outs = {}
    for split in ("all", "train", "heldout"):
        assert cli(base + ["--split", split, "--out", str(tmp_path / split)]) == 0
        m = load_manifest(tmp_path / split)
        assert m["source"]["format"] == "prose" and m["source"]["split"] == split
        outs[split] = {k: s for e in m["shards"] for k, s in iter_shard(shard_path(tmp_path / split, e))}
    assert len(outs["all"]) > 200
    assert outs["train"].keys().isdisjoint(outs["heldout"].keys())
    assert outs["train"].keys() | outs["heldout"].keys() == outs["all"].keys()
    samples = list(outs["all"].values())
    assert len({s["positive"] for s in samples}) == len(samples)  # topics repeat sections: each paragraph once
    for s in samples:
        assert s["query"] not in s["positive"] and s["query"][-1] in ".!?:)" and len(s["positive"]) >= 40
        assert s["meta"]["origin"].startswith("pydoc_data.topics:")
    assert cli(base + ["--input", "stdlib", "--out", str(tmp_path / "bad")]) == 1
    assert "takes no --input" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_prose_pair_rules():
    from ropebert.shards.sources import prose_pair, prose_paragraphs

    assert prose_pair("One sentence only, and long enough to be a paragraph of its own here.") is None
    q, rest = prose_pair('The "with" statement wraps a block. It calls "__enter__()" first, and "__exit__()" '
                         "when the block is left, even by an exception.")
    assert q == 'The "with" statement wraps a block.' and rest.startswith('It calls "__enter__()"')
    long = "Plain running text that explains something at length. " * 5
    topics = {"b": long + "\n\n    indented code block that is long enough " * 8, "a": long + "\n\n>>> 1 + 1\n2"}
    assert [(t, i) for t, i, _ in prose_paragraphs(topics)] == [("a", 0)]  # b's first paragraph repeats a's


def test_cli_usage_errors(tmp_path, capsys):
    assert cli(["shards"]) == 2
    assert cli(["shards", "verify", str(tmp_path)]) == 1  # no manifest
    assert "no manifest.json" in capsys.readouterr().err
    assert cli(["shards", "build", "--format", "jsonl", "--input", str(tmp_path / "nope.jsonl"), "--out",
                str(tmp_path / "o")]) == 1


def test_hf_datasets_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _good_rows(9)
    rows[3]["q"] = ""
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    args = ["shards", "build", "--input", str(tmp_path / "ds"), "--format", "hf", "--query-field", "q",
            "--passage-field", "p", "--key-field", "id", "--no-progress", "--on-error", "skip", "--out", str(tmp_path / "o")]
    assert cli(args) == 0
    m = load_manifest(tmp_path / "o")
    assert m["total_samples"] == 8 and m["skipped"]["by_reason"] == {"empty or whitespace-only text": 1}
    assert m["skipped"]["examples"][0].startswith(f"{tmp_path / 'ds'}[train]:row 4")


def test_stage2_jsonl_keeps_negatives_and_scores_in_one_sample(tmp_path, capsys):
    rows = [{"q": f"q{i}", "p": f"p{i}", "n": [f"n{i}_{j}" for j in range(8)], "s": [1.0] + [0.5] * 8}
            for i in range(6)]
    rows[2]["n"] = rows[2]["n"][:3]  # too few negatives
    src = _write_jsonl(tmp_path / "hn.jsonl", rows)
    base = ["--negatives-field", "n", "--scores-field", "s", "--num-negatives", "7"]
    assert _build(tmp_path, src, *base) == 1
    assert f"{src}:3: too few negatives" in capsys.readouterr().err
    assert _build(tmp_path, src, *base, "--on-error", "skip", out="ok") == 0
    m = load_manifest(tmp_path / "ok")
    assert m["kind"] == "hard_negatives" and m["total_samples"] == 5
    key, s = next(iter_shard(shard_path(tmp_path / "ok", m["shards"][0])))
    assert len(s["negatives"]) == 7 and len(s["scores"]) == 8 and s["negatives"][0] == "n0_0"


def _write_beir(root, corpus_lines, query_lines, qrels_lines):
    (root / "qrels").mkdir(parents=True)
    for name, lines in (("corpus.jsonl", corpus_lines), ("queries.jsonl", query_lines)):
        with open(root / name, "wb") as f:
            for x in lines:
                f.write(x if isinstance(x, bytes) else (json.dumps(x) + "\n").encode())
    (root / "qrels" / "test.tsv").write_text("\n".join(qrels_lines) + "\n")
    return root


def test_beir_bad_inputs_fail_with_file_line_or_are_counted(tmp_path, capsys):
    good_corpus = [{"_id": f"d{i}", "title": "", "text": f"passage {i}"} for i in range(4)]
    good_queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(4)]
    good_qrels = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i}\t1" for i in range(4)]
    cases = [  # (what is broken, corpus, queries, qrels, expected "file:line: reason")
        ("corpus malformed JSON", good_corpus[:2] + [b'{"_id": "d9", \n'] + good_corpus[2:], good_queries, good_qrels,
         "corpus.jsonl:3: malformed JSON"),
        ("query non-UTF-8", good_corpus, good_queries[:1] + [b'{"_id": "q8", "text": "caf\xe9"}\n'] + good_queries[1:],
         good_qrels, "queries.jsonl:2: non-UTF-8 bytes"),
        ("corpus duplicate _id", good_corpus + [{"_id": "d1", "text": "again"}], good_queries, good_qrels,
         "corpus.jsonl:5: duplicate key"),
        ("qrels bad score", good_corpus, good_queries, good_qrels[:2] + ["q1\td1\thigh"] + good_qrels[3:],
         "test.tsv:3: malformed qrels line"),
        ("empty passage", good_corpus[:3] + [{"_id": "d3", "text": "   "}], good_queries, good_qrels,
         "test.tsv:5: empty or whitespace-only text"),
        ("repeated judgement", good_corpus, good_queries, good_qrels + ["q2\td2\t3"], "test.tsv:6: duplicate key"),
    ]
    for i, (name, corpus, queries, qrels, msg) in enumerate(cases):
        root = _write_beir(tmp_path / f"beir{i}", corpus, queries, qrels)
        args = ["shards", "build", "--input", str(root), "--format", "beir", "--no-progress"]
        capsys.readouterr()
        assert cli(args + ["--out", str(tmp_path / f"fail{i}")]) == 1, name
        err = capsys.readouterr().err
        assert f"{root}/" in err and msg in err, (name, err)
        assert cli(args + ["--out", str(tmp_path / f"skip{i}"), "--on-error", "skip"]) == 0, name
        m = load_manifest(tmp_path / f"skip{i}")
        assert m["skipped"]["count"] == 1 and msg in m["skipped"]["examples"][0], (name, m["skipped"])
        assert m["total_samples"] == (3 if name in ("qrels bad score", "empty passage") else 4), name
