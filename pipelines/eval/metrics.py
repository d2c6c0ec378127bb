# Copyright ropebert contributors. Apache-2.0.
"""Retrieval metrics with trec_eval definitions: nDCG@k, MRR@k, Recall@k (and Acc@1 for synthetic tasks).

Conventions (identical to trec_eval / pytrec_eval, hence to BEIR and MTEB tables):
  * qrels: {qid: {docid: grade}}; a document is relevant when grade >= 1 (trec_eval relevance_level 1).
  * run: {qid: {docid: score}}; ranking = score descending, ties broken by docid DESCENDING (trec_eval's
    rule; pytrec_eval does the same), so results do not depend on dict order.
  * nDCG@k: gain = grade (linear, grades <= 0 give 0), discount 1 / log2(rank + 1); the ideal DCG uses all
    judged grades of the query sorted descending, cut at k.
  * MRR@k: 1 / rank of the first relevant document within the top k, else 0.
  * Recall@k: relevant documents in the top k / relevant documents judged for the query.
  * Which queries count: every query that has a qrels entry (the judged queries). A judged query without any
    relevant document (all grades 0) scores 0 on every metric (trec_eval); a judged query missing from the
    run scores 0 (trec_eval -c); run queries without qrels are ignored. The counts are reported.
"""

from __future__ import annotations

import math
from typing import Mapping

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]

METRIC_NAMES = ("ndcg@10", "mrr@10", "recall@100")


def rank_docs(scores: Mapping[str, float]) -> list[str]:
    """Doc ids ordered as trec_eval orders them: score descending, then docid descending."""
    return [d for d, _ in sorted(scores.items(), key=lambda kv: (-float(kv[1]), _neg_str(kv[0])))]


class _neg_str(str):
    """A str that sorts in reverse, so a single ascending sort gives (score desc, docid desc)."""

    def __lt__(self, other):  # noqa: D105
        return str.__gt__(self, other)


def ndcg_at_k(ranked: list[str], judged: Mapping[str, int], k: int) -> float:
    dcg = sum(max(0, judged.get(d, 0)) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(ranked: list[str], judged: Mapping[str, int], k: int) -> float:
    for i, d in enumerate(ranked[:k]):
        if judged.get(d, 0) >= 1:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranked: list[str], judged: Mapping[str, int], k: int) -> float:
    n_rel = sum(1 for g in judged.values() if g >= 1)
    if n_rel == 0:
        return 0.0
    return sum(1 for d in ranked[:k] if judged.get(d, 0) >= 1) / n_rel


def evaluate_run(qrels: Qrels, run: Run, ndcg_k: int = 10, mrr_k: int = 10, recall_k: int = 100) -> dict:
    """Mean metrics over the judged queries (see module docstring) plus per-query values and counts."""
    if not qrels:
        raise ValueError("evaluate_run: qrels are empty (no judged query)")
    names = (f"ndcg@{ndcg_k}", f"mrr@{mrr_k}", f"recall@{recall_k}")
    per_query: dict[str, dict[str, float]] = {}
    missing = no_rel = 0
    for qid, judged in qrels.items():
        if qid not in run:
            missing += 1
        if not any(g >= 1 for g in judged.values()):
            no_rel += 1
        ranked = rank_docs(run.get(qid, {}))
        per_query[qid] = {
            names[0]: ndcg_at_k(ranked, judged, ndcg_k),
            names[1]: mrr_at_k(ranked, judged, mrr_k),
            names[2]: recall_at_k(ranked, judged, recall_k),
        }
    n = len(per_query)
    means = {m: sum(v[m] for v in per_query.values()) / n for m in names}
    return {
        "metrics": means,
        "per_query": per_query,
        "num_queries_evaluated": n,
        "num_judged_queries_without_relevant": no_rel,
        "num_judged_queries_missing_from_run": missing,
        "num_run_queries_without_qrels": sum(1 for q in run if q not in qrels),
    }


def accuracy_at_1(scores, gold) -> float:
    """Acc@1 for a (Q, N) score matrix and the gold candidate index of each query (ties count as misses
    unless the gold candidate is the first maximal one, i.e. argmax picks the lowest index)."""
    import torch

    scores = torch.as_tensor(scores)
    gold = torch.as_tensor(gold, dtype=torch.long)
    if scores.ndim != 2 or scores.shape[0] != gold.shape[0]:
        raise ValueError(f"accuracy_at_1: scores {tuple(scores.shape)} do not match gold {tuple(gold.shape)}")
    return float((scores.argmax(dim=1) == gold).float().mean())
