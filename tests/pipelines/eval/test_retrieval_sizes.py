"""`ropebert eval retrieval --dims ... --quantize ... [--rescore K]`: every (dim, precision) per dense system, from
one encoding; checked against the plain run and an independent computation of the rescored rankings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ropebert.errors import InputError
from ropebert.pipelines.eval.metrics import evaluate_run
from ropebert.pipelines.eval.retrieval import EncodeSettings, RopeBertEncoder, load_beir, main, size_plot_path
from ropebert.shards.beir import write_beir
from tests.conftest import export_tiny_model

DOCS = [
    "Paris is the capital of France.", "Berlin is the capital of Germany.", "Madrid is the capital of Spain.",
    "Sourdough bread needs flour, water and starter.", "Bake the loaf at 230 degrees for forty minutes.",
    "Rotary embeddings rotate queries and keys.", "Binary vectors store one bit per channel.",
    "The Rhine flows through Germany and the Netherlands.", "Croissants are made from laminated dough.",
    "Attention compares every query with every key.", "Lyon is a city in France.", "Rye bread is dense and dark.",
]
QUERIES = [("q1", "capital of France"), ("q2", "how to bake bread"), ("q3", "rotary position embeddings"),
           ("q4", "rivers of Germany")]
QRELS = [("q1", "d0", 2), ("q1", "d10", 1), ("q2", "d3", 1), ("q2", "d4", 1), ("q2", "d11", 1), ("q3", "d5", 1),
         ("q3", "d9", 1), ("q4", "d7", 1), ("q4", "d1", 1)]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, minilm_dir):
    """A tiny random RoPE BERT (hidden size 32) with the real WordPiece tokenizer, exported like a trained model."""
    return export_tiny_model(tmp_path_factory.mktemp("tiny_export") / "model", minilm_dir, 512)


@pytest.fixture(scope="module")
def beir_dir(tmp_path_factory):
    corpus = [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(DOCS)]
    queries = [{"_id": q, "text": t} for q, t in QUERIES]
    return write_beir(tmp_path_factory.mktemp("beir") / "tiny", corpus, queries, QRELS)


def _run(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    assert main([*args, "--output", str(out), "--no-progress"]) == 0
    return json.loads(out.read_text())


def test_every_combination_once_and_full_float_equals_the_plain_run(tmp_path, tiny_export, beir_dir, minilm_dir,
                                                                    capsys):
    base = ["--data", str(beir_dir), "--model", str(tiny_export), "--baseline", "bm25",
            "--baseline", f"st:{minilm_dir}"]
    plain = _run(tmp_path, "plain", *base)
    png = tmp_path / "bars.png"
    res = _run(tmp_path, "sizes", *base, "--dims", "32,16,8", "--quantize", "float32,int8,binary", "--plot", str(png))
    printed = capsys.readouterr().out

    # the plain run's output carries nothing of the sweep
    assert "quantized" not in json.dumps(plain) and "dims" not in plain["settings"]
    assert res["settings"]["dims"] == [32, 16, 8] and res["settings"]["quantize"] == ["float32", "int8", "binary"]
    assert res["settings"]["rescore"] is None
    rope, bm25, st = res["results"]
    # every (dim, precision), dims outer, with its storage size; BM25 once, without sizes
    combos = [(e["dim"], e["precision"], e["bytes_per_vector"]) for e in rope["quantized"]]
    assert combos == [(32, "float32", 128), (32, "int8", 32), (32, "binary", 4),
                      (16, "float32", 64), (16, "int8", 16), (16, "binary", 2),
                      (8, "float32", 32), (8, "int8", 8), (8, "binary", 1)]
    assert [(e["dim"], e["precision"]) for e in st["quantized"]] == [(d, p) for d, p, _ in combos]
    assert "quantized" not in bm25 and bm25["metrics"] == plain["results"][1]["metrics"]
    assert rope["embedding_size"] == 32 and st["embedding_size"] == 384
    for r in (rope, st):
        for e in r["quantized"]:
            assert set(e["metrics"]) == {"ndcg@10", "mrr@10", "recall@100"} and e["rescore"] is None
            assert e["num_queries_evaluated"] == 4 and e["search_time_s"] > 0
            assert e["metrics"]["recall@100"] == 1.0  # 12 documents: all retrieved at any size
    # the system's own metrics are the plain run's; float32 at the full size ranks as the plain run does
    for i in (0, 2):
        assert res["results"][i]["metrics"] == plain["results"][i]["metrics"]
    assert rope["quantized"][0]["metrics"] == pytest.approx(plain["results"][0]["metrics"], abs=1e-12)
    # smaller prefixes are real, different searches (a random tiny model loses ranking quality)
    assert len({e["metrics"]["ndcg@10"] for e in rope["quantized"]}) > 2
    # the table: one row per combination and system, BM25 once
    rows = [line for line in printed.split("by size", 1)[1].splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 9 + 1 + 9
    assert rows[3].split("|")[2:6] == [" 32  ", " binary    ", " -       ", " 4            "]
    assert sum(row.startswith("| BM25 (bm25s)") for row in rows) == 1
    for p in (png, size_plot_path(png)):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert size_plot_path(png).name == "bars-sizes.png" and f"wrote {size_plot_path(png)}" in printed


def _reference_rescored(data, q, d, dim, precision):
    """The rescored ranking of every document, computed here: the float query prefix against the stored vectors
    (sign bits as +-1 / int8 calibrated per channel on the corpus, sentence-transformers' formula)."""
    qd = torch.nn.functional.normalize(q[:, :dim], dim=-1).numpy().astype(np.float64)
    dd = torch.nn.functional.normalize(d[:, :dim], dim=-1).numpy()
    if precision == "binary":
        stored = np.where(dd > 0, 1.0, -1.0)
    else:
        lo, hi = dd.min(axis=0), dd.max(axis=0)  # 256 levels over each channel's corpus range, floored
        steps = np.where(hi > lo, (hi - lo) / 255, 1)
        stored = np.clip(np.floor((dd - lo) / steps), 0, 255) - 128.0
    scores = qd @ stored.T  # (Q, N); documents with equal bits tie: evaluate_run orders ties as trec_eval does
    run = {qid: {did: float(s) for did, s in zip(data.corpus_ids, scores[qi])} for qi, qid in enumerate(data.query_ids)}
    return evaluate_run(data.qrels, run)["metrics"]


def test_rescoring_the_whole_corpus_ranks_by_the_float_query_against_the_stored_vectors(tmp_path, tiny_export,
                                                                                         beir_dir):
    n = len(DOCS)
    res = _run(tmp_path, "rescore", "--data", str(beir_dir), "--model", str(tiny_export), "--dims", "32,16,8",
               "--quantize", "binary,int8,float32", "--rescore", str(n))
    entries = res["results"][0]["quantized"]
    assert [(e["dim"], e["precision"], e["rescore"]) for e in entries] == [
        (dim, p, None if p == "float32" else n) for dim in (32, 16, 8) for p in ("binary", "int8", "float32")]
    data = load_beir(beir_dir)
    enc = RopeBertEncoder(tiny_export, EncodeSettings(show_progress_bar=False))
    q, d = enc.encode(data.query_texts, "query"), enc.encode(data.corpus_texts, "passage")
    for e in entries:
        if e["precision"] != "float32":
            ref = _reference_rescored(data, q, d, e["dim"], e["precision"])
            assert e["metrics"] == pytest.approx(ref, abs=1e-12), (e["dim"], e["precision"])


@pytest.mark.parametrize("args, message", [
    (["--dims", "64"], r"--dims: 64 is larger than the embedding size 32 of .*model$"),
    (["--dims", "32,16", "--quantize", "float16"], r"--quantize: unknown precision 'float16' \(choose from float32,int8,binary\)"),
    (["--quantize", "int8,int8"], r"--quantize: int8 is given twice"),
    (["--dims", "0"], r"--dims: sizes must be >= 1, got 0"),
    (["--dims", "16,x"], r"--dims: 'x' is not an integer"),
    (["--dims", "16,16"], r"--dims: 16 is given twice"),
    (["--dims", "16,"], r"--dims: expected comma-separated sizes"),
    (["--rescore", "10"], r"--rescore K re-scores int8 / binary results: it needs --quantize with int8 or binary"),
    (["--dims", "16", "--rescore", "10"], r"it needs --quantize with int8 or binary"),
    (["--quantize", "float32", "--rescore", "10"], r"it needs --quantize with int8 or binary"),
    (["--quantize", "binary", "--rescore", "0"], r"--rescore must be >= 1, got 0"),
])
def test_bad_size_arguments(tiny_export, beir_dir, args, message):
    with pytest.raises(InputError, match=message):
        main(["--data", str(beir_dir), "--model", str(tiny_export), "--no-progress", *args])


def test_sizes_need_a_dense_system(beir_dir):
    with pytest.raises(InputError, match=r"--dims / --quantize apply to dense systems"):
        main(["--data", str(beir_dir), "--baseline", "bm25", "--quantize", "binary"])
