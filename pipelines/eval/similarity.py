"""`ropebert similarity`: embed queries and passages with a model and print their cosine-similarity table."""

from __future__ import annotations

import argparse
from typing import Optional

from ropebert.model.load import load_source

DEFAULT_QUERIES = [
    "how do rotary position embeddings work?",
    "what is the capital of France?",
    "how to bake sourdough bread",
]
DEFAULT_PASSAGES = [
    "Rotary embeddings rotate query and key vectors by an angle proportional to the token position.",
    "Paris is the capital and most populous city of France.",
    "Mix flour, water and starter, let the dough rise overnight, then bake it in a hot oven.",
]


def similarity_table(model, queries, passages, query_prefix="query: ", passage_prefix="passage: ", tokenizer=None):
    q = model.encode(queries, tokenizer, prefix=query_prefix)
    p = model.encode(passages, tokenizer, prefix=passage_prefix)
    return q @ p.T  # (Q, P) cosine similarities (embeddings are L2-normalised)


def format_table(sim, queries, passages, width: int = 38) -> str:
    def cut(s):
        return s if len(s) <= width else s[: width - 1] + "…"

    header = " " * (width + 2) + "".join(f"  p{j}   " for j in range(len(passages)))
    rows = [header]
    for i, q in enumerate(queries):
        best = int(sim[i].argmax())
        cells = "".join((f" [{v:.3f}]" if j == best else f"  {v:.3f} ") for j, v in enumerate(sim[i].tolist()))
        rows.append(f"{cut(q):<{width}}  {cells}")
    rows.append("")
    rows += [f"p{j}: {cut(p)}" for j, p in enumerate(passages)]
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="ropebert similarity", description=__doc__)
    ap.add_argument("--model", required=True, help="exported model dir, RoPE BERT dir, APE BERT dir (converted), or a Hub id org/name")
    ap.add_argument("--query", action="append", help="query text (repeatable); default: a built-in example set")
    ap.add_argument("--passage", action="append", help="passage text (repeatable)")
    ap.add_argument("--query-prefix", default="query: ")
    ap.add_argument("--passage-prefix", default="passage: ")
    args = ap.parse_args(argv)
    model = load_source(args.model)
    queries = args.query or DEFAULT_QUERIES
    passages = args.passage or DEFAULT_PASSAGES
    sim = similarity_table(model, queries, passages, args.query_prefix, args.passage_prefix)
    print(f"cosine similarity, model={args.model} (rope_theta={model.config.rope_theta}); best passage in [ ]")
    print(format_table(sim, queries, passages))
    return 0
