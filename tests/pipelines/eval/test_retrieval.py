"""BEIR reader, exact top-k search, and `ropebert eval retrieval` end to end (tiny model; MS MARCO subset)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ropebert.errors import UserError
from ropebert.pipelines.eval.retrieval import load_beir, main
from ropebert.pipelines.search import exact_topk
from ropebert.shards.beir import read_qrels
from tests.conftest import export_tiny_model


def _write_beir(root: Path, header: bool = True) -> Path:
    (root / "qrels").mkdir(parents=True)
    docs = [
        ("d1", "Paris", "Paris is the capital of France."),
        ("d2", "", "Berlin is the capital of Germany."),
        ("d3", "Bread", "Sourdough bread needs flour, water and starter."),
        ("d4", "", "Rotary embeddings rotate queries and keys."),
    ]
    with (root / "corpus.jsonl").open("w") as f:
        for i, t, x in docs:
            f.write(json.dumps({"_id": i, "title": t, "text": x}) + "\n")
    with (root / "queries.jsonl").open("w") as f:
        for i, x in [("q1", "capital of France"), ("q2", "how to bake bread"), ("q3", "unjudged query")]:
            f.write(json.dumps({"_id": i, "text": x}) + "\n")
    lines = (["query-id\tcorpus-id\tscore"] if header else []) + ["q1\td1\t2", "q1\td2\t1", "q2\td3\t1"]
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("header", [True, False])
def test_load_beir(tmp_path, header):
    data = load_beir(_write_beir(tmp_path, header))
    assert data.query_ids == ["q1", "q2"]  # q3 has no qrels: skipped and counted
    assert data.stats["num_queries_skipped_without_qrels"] == 1
    assert data.qrels == {"q1": {"d1": 2, "d2": 1}, "q2": {"d3": 1}}
    assert data.corpus_texts[0] == "Paris Paris is the capital of France."  # BEIR: title + " " + text
    assert data.corpus_texts[1] == "Berlin is the capital of Germany."


def test_bad_inputs_name_file_and_line(tmp_path):
    root = _write_beir(tmp_path)
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\nq1\td2\thigh\n")
    with pytest.raises(ValueError, match=r"test.tsv:2: malformed qrels line \(grade 'high' is not an integer\)"):
        read_qrels(root / "qrels" / "test.tsv")
    (root / "qrels" / "test.tsv").write_text("q1\td1\n")
    with pytest.raises(ValueError, match=r"test.tsv:1: malformed qrels line \(expected 3 columns"):
        read_qrels(root / "qrels" / "test.tsv")
    (root / "qrels" / "test.tsv").write_text("q1\td1\t1\n")
    with pytest.raises(FileNotFoundError, match="qrels file"):
        load_beir(root, split="dev")
    (root / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{"_id": "d2"}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: missing field 'text'"):
        load_beir(root)


def test_exact_topk_blocked_matches_full_sort():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(7, 16, generator=g)
    d = torch.randn(103, 16, generator=g)
    s, i = exact_topk(q, d, 10, block_size=16, index="exact")
    full = q @ d.T
    ref_s, ref_i = full.topk(10, dim=1)
    torch.testing.assert_close(s, ref_s)
    assert torch.equal(i, ref_i)
    s2, i2 = exact_topk(q, d, 500, block_size=32, index="exact")  # k > N: clipped to N
    assert s2.shape == (7, 103) and torch.equal(i2[:, :10], ref_i)
    try:
        import faiss  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="needs the faiss package"):
            exact_topk(q, d, 5, index="faiss")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, minilm_dir):
    """A tiny random RoPE BERT with the real WordPiece tokenizer, exported like a trained model."""
    return export_tiny_model(tmp_path_factory.mktemp("tiny_export") / "model", minilm_dir, 512)


def test_cli_end_to_end_with_bm25(tmp_path, tiny_export, capsys):
    root = _write_beir(tmp_path / "beir")
    out, png = tmp_path / "res.json", tmp_path / "bars.png"
    rc = main(["--model", str(tiny_export), "--baseline", "bm25", "--data", str(root), "--output", str(out),
               "--plot", str(png), "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["task"] == "retrieval" and res["model"] == str(tiny_export) and res["wall_time_s"] > 0
    assert set(res["metrics"]) == {"ndcg@10", "mrr@10", "recall@100"}
    assert [r["name"] for r in res["results"]] == [str(tiny_export), "bm25"]
    bm25 = res["results"][1]
    # lexical overlap makes both judged queries rank their relevant doc first: MRR 1, recall 1
    assert bm25["metrics"]["mrr@10"] == 1.0 and bm25["metrics"]["recall@100"] == 1.0
    # with 4 docs everything is retrieved: recall@100 is 1 for any model
    assert res["metrics"]["recall@100"] == 1.0
    assert res["settings"]["query_prefix"] == "query: "
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| BM25 (bm25s)" in printed and "nDCG@10" in printed


def test_cli_errors(tmp_path):
    root = _write_beir(tmp_path / "beir")
    with pytest.raises(ValueError, match="at least one --model or --baseline"):
        main(["--data", str(root)])
    with pytest.raises(ValueError, match="under-report recall@100"):
        main(["--baseline", "bm25", "--data", str(root), "--top-k", "10"])


def test_msmarco_side_by_side(tmp_path, shared_data, minilm_dir):
    """Acceptance on a reduced MS MARCO corpus (1 judged query, 120 docs): APE parent via
    sentence-transformers, BM25 and the freshly converted RoPE model in one command and one JSON."""
    out = tmp_path / "msmarco.json"
    rc = main(["--model", str(minilm_dir), "--baseline", "bm25", "--baseline", f"st:{minilm_dir}",
               "--data", str(shared_data / "msmarco"), "--max-queries", "1", "--max-docs", "120",
               "--output", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["data_stats"]["num_queries_judged"] == 1 and res["data_stats"]["num_corpus"] == 120
    by = {r["name"]: r for r in res["results"]}
    assert set(by) == {str(minilm_dir), "bm25", f"st:{minilm_dir}"}
    assert by[f"st:{minilm_dir}"]["kind"] == "sentence-transformers"
    assert by[str(minilm_dir)]["kind"] == "ropebert" and by[str(minilm_dir)]["converted_from_ape"]
    for r in res["results"]:
        for v in r["metrics"].values():
            assert 0.0 <= v <= 1.0
    # the trained APE parent retrieves relevant passages (MS MARCO relevant docs share the query's topic)
    assert by[f"st:{minilm_dir}"]["metrics"]["mrr@10"] > 0.3
    assert by["bm25"]["metrics"]["ndcg@10"] > 0.2


def test_agreement_with_a_reference_system(tmp_path, tiny_export, minilm_dir, capsys, monkeypatch):
    """--agreement: a system compared with itself agrees exactly (and is encoded once); the retrieval metrics
    are unchanged."""
    from ropebert.pipelines.eval import retrieval

    encoded = []
    real_encode = retrieval.encode_data
    monkeypatch.setattr(retrieval, "encode_data", lambda enc, data: encoded.append(enc.name) or real_encode(enc, data))
    root = _write_beir(tmp_path / "beir")
    out = tmp_path / "res.json"
    rc = main(["--model", str(tiny_export), "--baseline", "bm25", "--data", str(root),
               "--agreement", str(tiny_export), "--output", str(out), "--no-progress"])
    assert rc == 0
    assert len(encoded) == 1  # the reference's embeddings are the listed model's: not encoded a second time
    res = json.loads(out.read_text())
    tiny, bm25 = res["results"]
    assert tiny["agreement"]["queries"] == pytest.approx(1.0, abs=1e-5)
    assert tiny["agreement"]["documents"] == pytest.approx(1.0, abs=1e-5)
    assert "agreement" not in bm25 and res["settings"]["agreement"] == str(tiny_export)
    # the same metrics as without --agreement
    plain = tmp_path / "plain.json"
    main(["--model", str(tiny_export), "--data", str(root), "--output", str(plain), "--no-progress"])
    assert json.loads(plain.read_text())["metrics"] == tiny["metrics"]
    assert "agreement with" in capsys.readouterr().out
    # a different embedding size is a clear error, BM25 is no reference
    with pytest.raises(ValueError, match="agreement needs one embedding space"):
        main(["--model", str(tiny_export), "--data", str(root), "--agreement", f"st:{minilm_dir}", "--no-progress"])
    with pytest.raises(ValueError, match="BM25 has no embeddings"):
        main(["--model", str(tiny_export), "--data", str(root), "--agreement", "bm25", "--no-progress"])


def test_agreement_values_by_hand():
    from ropebert.pipelines.eval.retrieval import agreement

    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[1.0, 1.0]])
    ref = (torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    a = agreement(q, d, ref, "m", "r")
    # queries: cos 1 and 0 -> 0.5; document: cos 45 degrees; all: (1 + 0 + 0.7071) / 3
    assert a["queries"] == pytest.approx(0.5) and a["documents"] == pytest.approx(2 ** -0.5, abs=1e-6)
    assert a["all"] == pytest.approx((1 + 2 ** -0.5) / 3, abs=1e-6) and a["reference"] == "r"
