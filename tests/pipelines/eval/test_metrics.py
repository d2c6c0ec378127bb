"""Retrieval metrics: hand-computed cases (graded qrels, ties, queries without relevant docs) and pytrec_eval."""

from __future__ import annotations

import math
import random

import pytest

from ropebert.pipelines.eval.metrics import accuracy_at_1, evaluate_run, mrr_at_k, ndcg_at_k, rank_docs, recall_at_k


def test_graded_ndcg_hand_computed():
    judged = {"a": 3, "b": 1, "c": 2}
    ranked = ["b", "x", "a"]  # gains 1, 0, 3 at ranks 1..3
    dcg = 1 / math.log2(2) + 3 / math.log2(4)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, judged, 10) == pytest.approx(dcg / idcg)
    # cutoff: only rank 1 counts at k=1; the ideal is cut at k too
    assert ndcg_at_k(ranked, judged, 1) == pytest.approx(1 / 3)
    assert ndcg_at_k(["a", "c", "b"], judged, 10) == pytest.approx(1.0)


def test_mrr_and_recall_hand_computed():
    judged = {"a": 2, "b": 1, "z": 0}  # z judged non-relevant
    ranked = ["z", "x", "b", "y", "a"]
    assert mrr_at_k(ranked, judged, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(ranked, judged, 2) == 0.0  # first relevant at rank 3 > k
    assert recall_at_k(ranked, judged, 3) == pytest.approx(1 / 2)
    assert recall_at_k(ranked, judged, 100) == pytest.approx(1.0)


def test_ties_broken_by_docid_descending_like_trec_eval():
    # d1 and d2 tie: trec_eval ranks the larger docid first -> d2 (grade 1) at rank 1, d1 (grade 2) at rank 2
    run = {"d1": 0.5, "d2": 0.5, "d3": 0.4}
    assert rank_docs(run) == ["d2", "d1", "d3"]
    assert rank_docs(dict(reversed(list(run.items())))) == ["d2", "d1", "d3"]  # independent of dict order
    judged = {"d1": 2, "d2": 1}
    dcg = 1 / math.log2(2) + 2 / math.log2(3)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    ev = evaluate_run({"q": judged}, {"q": run})
    assert ev["metrics"]["ndcg@10"] == pytest.approx(dcg / idcg)
    assert ev["metrics"]["mrr@10"] == 1.0


def test_query_conventions():
    """Judged query without relevant docs -> 0 and counted; judged query missing from the run -> 0;
    run query without qrels -> ignored."""
    qrels = {"q1": {"a": 1}, "q2": {"b": 0}, "q3": {"c": 2}}
    run = {"q1": {"a": 1.0, "x": 0.5}, "q2": {"b": 1.0}, "q9": {"a": 1.0}}
    ev = evaluate_run(qrels, run)
    assert ev["num_queries_evaluated"] == 3
    assert ev["num_judged_queries_without_relevant"] == 1
    assert ev["num_judged_queries_missing_from_run"] == 1
    assert ev["num_run_queries_without_qrels"] == 1
    assert ev["per_query"]["q2"] == {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@100": 0.0}
    assert ev["per_query"]["q3"]["ndcg@10"] == 0.0
    assert ev["metrics"]["ndcg@10"] == pytest.approx(1 / 3)
    assert ev["metrics"]["recall@100"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="qrels are empty"):
        evaluate_run({}, run)


def test_matches_pytrec_eval_on_random_graded_runs():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(300)]
    qrels, run = {}, {}
    for qi in range(40):
        q = f"q{qi}"
        qrels[q] = {d: rng.choice([0, 1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 12))}
        # coarse scores -> many ties; 150 retrieved so recall@100 and the cutoffs matter
        run[q] = {d: float(rng.randint(0, 20)) for d in rng.sample(docs, 150)}
        for d in list(qrels[q])[:3]:
            run[q][d] = float(rng.randint(15, 25))
    ours = evaluate_run(qrels, run)
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "recip_rank"}).evaluate(run)
    assert set(ref) == set(ours["per_query"])
    n_mrr_checked = 0
    for q, r in ref.items():
        assert ours["per_query"][q]["ndcg@10"] == pytest.approx(r["ndcg_cut_10"], abs=1e-9), q
        assert ours["per_query"][q]["recall@100"] == pytest.approx(r["recall_100"], abs=1e-9), q
        # pytrec_eval's recip_rank has no cutoff: equal to MRR@10 when the first relevant doc is in the top 10
        if r["recip_rank"] >= 0.1:
            assert ours["per_query"][q]["mrr@10"] == pytest.approx(r["recip_rank"], abs=1e-9), q
            n_mrr_checked += 1
        else:
            assert ours["per_query"][q]["mrr@10"] == 0.0
    assert n_mrr_checked >= 10


def test_accuracy_at_1():
    scores = [[0.9, 0.1, 0.0], [0.2, 0.2, 0.1], [0.0, 0.3, 0.5]]
    assert accuracy_at_1(scores, [0, 0, 1]) == pytest.approx(2 / 3)  # tie in row 1 -> lowest index
    with pytest.raises(ValueError, match="do not match"):
        accuracy_at_1(scores, [0, 1])
