"""Markdown tables and the PNG charts of `ropebert eval`."""

from __future__ import annotations

import math

import pytest

from ropebert.pipelines.eval.cli import main as eval_main
from ropebert.pipelines.eval.report import (
    accuracy_heatmap,
    length_label,
    markdown_table,
    ndcg_bytes_chart,
    retrieval_bar_chart,
)


def test_markdown_table():
    t = markdown_table(["system", "nDCG@10"], [["bm25", 0.5], ["model", 0.25]])
    lines = t.splitlines()
    assert lines[0].startswith("| system") and set(lines[1]) <= {"|", "-"}
    assert "| bm25   | 0.5000  |" in lines[2]
    assert len({len(l) for l in lines}) == 1  # aligned


def test_charts_are_written(tmp_path):
    png = accuracy_heatmap(["none", "ntk"], [256, 1024], [[1.0, 0.5], [1.0, math.nan]], tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(ValueError, match="acc shape"):
        accuracy_heatmap(["none"], [256, 1024], [[1.0]], tmp_path / "bad.png")
    res = [{"name": "a", "metrics": {"ndcg@10": 0.4, "mrr@10": 0.5, "recall@100": 0.9}},
           {"name": "b", "label": "BM25", "metrics": {"ndcg@10": 0.6, "mrr@10": 0.7, "recall@100": 0.8}}]
    bar = retrieval_bar_chart(res, tmp_path / "b.png")
    assert bar.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and bar.stat().st_size > 5000
    assert [length_label(n) for n in (256, 1024, 32768)] == ["256", "1k", "32k"]


def test_ndcg_bytes_chart(tmp_path):
    """nDCG@10 against bytes per vector: a line per (system, precision), BM25 as a level; no sizes -> error."""
    sizes = [{"dim": dm, "precision": p, "rescore": None, "bytes_per_vector": b, "metrics": {"ndcg@10": v}}
             for dm, p, b, v in [(64, "float32", 256, 0.5), (32, "float32", 128, 0.45), (64, "binary", 8, 0.4)]]
    res = [{"name": "m", "label": "ropebert: m", "metrics": {"ndcg@10": 0.5}, "quantized": sizes},
           {"name": "bm25", "label": "BM25", "metrics": {"ndcg@10": 0.3}}]
    png = ndcg_bytes_chart(res, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(ValueError, match="no result has a 'quantized' list"):
        ndcg_bytes_chart(res[1:], tmp_path / "none.png")


def test_eval_dispatch(capsys):
    assert eval_main([]) == 2
    assert "retrieval" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown eval task"):
        eval_main(["bogus"])
    from ropebert.cli import main as cli_main

    # through the top-level command: `ropebert eval retrieval --help` reaches the retrieval task's own parser
    with pytest.raises(SystemExit) as e:
        cli_main(["eval", "retrieval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ropebert eval retrieval") and "--baseline" in out
    assert cli_main(["eval", "bogus"]) == 2
    assert "unknown eval task 'bogus'" in capsys.readouterr().err


def test_markdown_table_formats_a_retrieval_report():
    """The table `ropebert eval retrieval` prints: one row per system, metrics to 4 decimals, columns aligned."""
    results = [{"label": "BM25 (bm25s)", "metrics": {"ndcg@10": 0.68766, "mrr@10": 0.5, "recall@100": 1.0}},
               {"label": "ropebert: models/stage2", "metrics": {"ndcg@10": 0.8, "mrr@10": 0.71234, "recall@100": 0.9}}]
    rows = [[r["label"]] + [r["metrics"][m] for m in ("ndcg@10", "mrr@10", "recall@100")] for r in results]
    lines = markdown_table(["system", "nDCG@10", "MRR@10", "Recall@100"], rows).splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["system", "nDCG@10", "MRR@10", "Recall@100"]
    assert cells[2] == ["BM25 (bm25s)", "0.6877", "0.5000", "1.0000"]
    assert cells[3] == ["ropebert: models/stage2", "0.8000", "0.7123", "0.9000"]
