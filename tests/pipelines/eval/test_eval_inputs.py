"""Evaluation inputs that must never give a silently wrong number: repeated query ids, a qrels first line with a
fractional grade and no header, an empty `--lengths`."""

from __future__ import annotations

import json

import pytest

from ropebert.cli import main as cli
from ropebert.pipelines.eval.longembed import DEFAULT_LENGTHS, parse_lengths
from ropebert.pipelines.eval.retrieval import load_beir


def _beir(root, queries, qrels_text):
    (root / "qrels").mkdir(parents=True)
    docs = [{"_id": "d1", "text": "Paris is the capital of France."}, {"_id": "d2", "text": "Bread needs flour."}]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels" / "test.tsv").write_text(qrels_text)
    return root


def test_duplicate_query_ids_are_an_error(tmp_path):
    root = _beir(tmp_path / "b", [{"_id": "q1", "text": "capital of France"}, {"_id": "q2", "text": "bread"},
                                  {"_id": "q1", "text": "a later text that must not win"}],
                 "q1\td1\t1\nq2\td2\t1\n")
    with pytest.raises(ValueError, match=r"queries.jsonl:3: duplicate key \(query _id 'q1' first seen at .*queries.jsonl:1\)"):
        load_beir(root)


def test_fractional_first_qrels_line_is_an_error_not_a_header(tmp_path):
    root = _beir(tmp_path / "b", [{"_id": "q1", "text": "capital"}, {"_id": "q2", "text": "bread"}],
                 "q1\td1\t0.5\nq2\td2\t1\n")
    with pytest.raises(ValueError, match=r"test.tsv:1: malformed qrels line \(grade '0.5' is not an integer\)"):
        load_beir(root)
    # an integral float grade on the first line is a judgement, never taken for a header
    (root / "qrels" / "test.tsv").write_text("q1\td1\t2.0\nq2\td2\t1\n")
    data = load_beir(root)
    assert data.qrels == {"q1": {"d1": 2}, "q2": {"d2": 1}}


def test_empty_lengths_is_an_error_not_the_full_sweep(capsys):
    assert parse_lengths(None) == list(DEFAULT_LENGTHS)
    for spec in ("", " ", ","):
        with pytest.raises(ValueError, match="no lengths given"):
            parse_lengths(spec)
    assert parse_lengths("256, 512") == [256, 512]
    assert cli(["eval", "passkey", "--model", "no-such-model", "--lengths", ""]) == 1
    assert "no lengths given" in capsys.readouterr().err
