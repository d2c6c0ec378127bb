# Copyright ropebert contributors. Apache-2.0.
"""`ropebert eval <task>`: retrieval (BEIR), passkey (LongEmbed), needle (real-data needle retrieval)."""

from __future__ import annotations

from typing import Optional

from ropebert.cli import dispatch

TASKS = {
    "retrieval": ("ropebert.pipelines.eval.retrieval:main", "BEIR retrieval: nDCG@10, MRR@10, Recall@100 (+ BM25 / ST baselines)"),
    "passkey": ("ropebert.pipelines.eval.longembed:passkey_main", "LongEmbed personalized passkey retrieval, Acc@1 per length"),
    "needle": ("ropebert.pipelines.eval.longembed:needle_main", "MS MARCO needles in Paul Graham haystacks, Acc@1 per length"),
}


def main(argv: Optional[list[str]] = None) -> int:
    return dispatch("ropebert eval", TASKS, list(argv or []), what="task")
