"""`ropebert shards build --overwrite` never loses data; `shards verify` checks the manifest's own list; bad
teacher scores, lone surrogates, over-long keys and key collisions are one-line errors naming file:line."""

from __future__ import annotations

import json
import math

import pytest

from ropebert.cli import main as cli
from ropebert.shards.format import load_manifest


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r) + "\n")
    return path


def _rows(n=12):
    return [{"q": f"question {i}", "p": f"answer {i}", "id": f"d{i}"} for i in range(n)]


def _build(src, out, *extra):
    return cli(["shards", "build", "--input", str(src), "--format", "jsonl", "--query-field", "q",
                "--passage-field", "p", "--out", str(out), "--no-progress", *extra])


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# -- --overwrite: checked before anything, written aside, only what shards build wrote -----------------------


def test_overwrite_with_bad_input_or_bad_maxcount_keeps_old_shards(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", _rows())
    out = tmp_path / "out"
    assert _build(src, out, "--maxcount", "5") == 0
    before = _snapshot(out)
    assert _build(src, out, "--maxcount", "0", "--overwrite") == 1
    assert "--maxcount must be >= 1" in capsys.readouterr().err
    bad = _write_jsonl(tmp_path / "bad.jsonl", _rows(3) + ['{"q": "x", "p": \n'])
    assert _build(bad, out, "--overwrite") == 1
    assert "bad.jsonl:4: malformed JSON" in capsys.readouterr().err
    assert _snapshot(out) == before  # old shards and manifest intact, no partial tar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "in.jsonl", "out"]  # no temp sibling left
    assert _build(src, out, "--maxcount", "4", "--overwrite") == 0
    assert [e["samples"] for e in load_manifest(out)["shards"]] == [4, 4, 4]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [f"shard-00000{i}.tar" for i in range(3)]


def test_overwrite_refuses_a_directory_holding_anything_else(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", _rows())
    out = tmp_path / "out"
    assert _build(src, out) == 0
    (out / "notes.txt").write_text("mine, not a shard")
    assert _build(src, out, "--overwrite") == 1
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").is_file()
    # a manifest.json that is not a ropebert manifest does not make a directory replaceable
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "someone else"}')
    (other / "data.bin").write_bytes(b"x")
    assert _build(src, other, "--overwrite") == 1
    assert sorted(p.name for p in other.iterdir()) == ["data.bin", "manifest.json"]


def test_out_equal_to_or_inside_the_input_is_refused(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", _rows())
    assert _build(src, tmp_path, "--overwrite") == 1  # the input file lives in --out
    assert "inside --out" in capsys.readouterr().err and src.is_file()
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    _write_jsonl(beir / "corpus.jsonl", [{"_id": "c1", "text": "t"}])
    _write_jsonl(beir / "queries.jsonl", [{"_id": "q1", "text": "q"}])
    (beir / "qrels" / "test.tsv").write_text("q1\tc1\t1\n")
    r = cli(["shards", "build", "--format", "beir", "--input", str(beir), "--out", str(beir / "shards"),
             "--no-progress"])
    assert r == 1 and "inside the source" in capsys.readouterr().err


# -- verify: the manifest's list itself ---------------------------------------------------------------------


def test_verify_catches_unlisted_duplicated_entries_and_wrong_total(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", _rows())
    out = tmp_path / "out"
    assert _build(src, out, "--maxcount", "4") == 0
    good = json.loads((out / "manifest.json").read_text())

    def edit(fn):
        m = json.loads(json.dumps(good))
        fn(m)
        (out / "manifest.json").write_text(json.dumps(m))
        capsys.readouterr()
        rc = cli(["shards", "verify", str(out), "--no-progress"])
        return rc, capsys.readouterr().err

    def drop(m):
        del m["shards"][1]
        m["total_samples"] -= 4
        m["total_bytes"] = sum(s["bytes"] for s in m["shards"])

    rc, err = edit(drop)
    assert rc == 1 and "shard-000001.tar: shard file on disk but not listed" in err
    rc, err = edit(lambda m: (m["shards"].append(dict(m["shards"][0])), m.update(total_samples=16,
                                                                                  total_bytes=m["total_bytes"] + m["shards"][0]["bytes"])))
    assert rc == 1 and "shard-000000.tar: listed twice" in err
    rc, err = edit(lambda m: m.update(total_samples=13))
    assert rc == 1 and "total_samples is 13 but its shards hold 12" in err
    rc, err = edit(lambda m: None)
    assert rc == 0


# -- teacher scores -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("score,shown", [("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf"),
                                         ('"0.5"', "'0.5'"), ("true", "True")])
def test_non_finite_or_non_numeric_teacher_scores_are_refused(tmp_path, capsys, score, shown):
    good = {"q": "a question", "p": "an answer", "n": ["no", "nope"], "s": [0.9, 0.1, 0.2]}
    line = json.dumps(good).replace("0.1", score)
    src = _write_jsonl(tmp_path / "hn.jsonl", [good, line + "\n"])
    rc = _build(src, tmp_path / "out", "--negatives-field", "n", "--scores-field", "s")
    err = capsys.readouterr().err
    assert rc == 1 and "hn.jsonl:2: bad teacher scores" in err and f"s[1] is {shown}" in err, err
    assert not (tmp_path / "out").exists()
    assert math.isnan(json.loads('{"x": NaN}')["x"])  # Python's json reads these literals: the check is ours


# -- keys and text ------------------------------------------------------------------------------------------


def test_lone_surrogate_is_a_bad_record_and_skippable(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", _rows(3) + ['{"q": "bad \\ud800 text", "p": "x"}\n'])
    assert _build(src, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "in.jsonl:4: invalid Unicode" in err and "Traceback" not in err
    assert _build(src, tmp_path / "out", "--on-error", "skip") == 0
    m = load_manifest(tmp_path / "out")
    assert m["total_samples"] == 3 and m["skipped"]["by_reason"] == {"invalid Unicode": 1}


def test_long_keys_and_key_collisions_are_named(tmp_path, capsys):
    rows = [{"q": "q", "p": "p", "id": "x" * 120}]
    src = _write_jsonl(tmp_path / "long.jsonl", rows)
    assert _build(src, tmp_path / "o1", "--key-field", "id") == 1
    err = capsys.readouterr().err
    assert "long.jsonl:1: key too long (120 characters, a tar member name allows 95" in err
    rows = [{"q": "q", "p": "p", "id": "a.b"}, {"q": "q", "p": "p", "id": "a_b"}, {"q": "q", "p": "p", "id": "a.b"}]
    src = _write_jsonl(tmp_path / "coll.jsonl", rows)
    assert _build(src, tmp_path / "o2", "--key-field", "id") == 1
    err = capsys.readouterr().err
    assert "coll.jsonl:2: key collision (id 'a_b' and id 'a.b'" in err and "'a_b'" in err
    assert _build(src, tmp_path / "o2", "--key-field", "id", "--on-error", "skip") == 0
    by = load_manifest(tmp_path / "o2")["skipped"]["by_reason"]
    assert by == {"key collision": 1, "duplicate key": 1}
    for bad_id, reason in (("null", "null key"), ('""', "empty key"), ('"  "', "empty key")):
        src = _write_jsonl(tmp_path / "k.jsonl", ['{"q": "q", "p": "p", "id": %s}\n' % bad_id])
        assert _build(src, tmp_path / "o3", "--key-field", "id") == 1
        assert f"k.jsonl:1: {reason}" in capsys.readouterr().err
