# Copyright ropebert contributors. Apache-2.0.
"""`ropebert eval <task>`: retrieval (BEIR), passkey (LongEmbed), needle (real-data needle retrieval)."""

from __future__ import annotations

import importlib
import sys
from typing import Optional

TASKS: dict[str, tuple[str, str]] = {
    "retrieval": ("ropebert.pipelines.eval_retrieval:main", "BEIR retrieval: nDCG@10, MRR@10, Recall@100 (+ BM25 / ST baselines)"),
    "passkey": ("ropebert.pipelines.eval_longembed:passkey_main", "LongEmbed personalized passkey retrieval, Acc@1 per length"),
    "needle": ("ropebert.pipelines.eval_longembed:needle_main", "MS MARCO needles in Paul Graham haystacks, Acc@1 per length"),
}


def _usage() -> str:
    lines = ["usage: ropebert eval <task> [args...]", "", "tasks:"]
    lines += [f"  {n:<10} {h}" for n, (_, h) in TASKS.items()]
    lines += ["", "`ropebert eval <task> --help` describes a task."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    task, rest = argv[0], argv[1:]
    if task not in TASKS:
        raise ValueError(f"unknown eval task {task!r}; choose from {', '.join(TASKS)}")
    module, func = TASKS[task][0].split(":")
    return int(getattr(importlib.import_module(module), func)(rest) or 0)
