# Copyright ropebert contributors. Apache-2.0.
"""`ropebert mine`: hard-negative mining -> stage-2 (hard_negatives) shards with teacher scores.

1. Embed the corpus and the queries with a model (`ropebert.model.export.load_source`: an exported RoPE BERT
   directory, or a BERT directory converted on the fly).
2. Retrieve the top-k passages per query: exact cosine similarity by blocked matmul (CPU or GPU), or a faiss
   IndexFlatIP when faiss is installed (`--index auto|exact|faiss`).
3. Drop every judged positive of the query (any qrels grade >= 1, and any corpus copy of its text; for pair
   shards: every positive of the same query text), repeated texts among the candidates, and the likely false
   negatives: candidates scoring above `--guard-value` x the positive's score (`--guard perc`, NV-Retriever's
   TopK-PercPos, default 0.95) or above positive - value (`--guard margin`).
4. Sample K (7) negatives deterministically per query (seeded by (seed, key)), keep them in score order, and
   write one sample per query: query, positive, negatives, scores = [positive, negatives...] similarities
   (the teacher scores stage 2 can distil from).

Inputs: a BEIR directory (queries.jsonl + qrels/<split>.tsv + corpus.jsonl) or a pair-shard directory
(query -> positive; the corpus is every distinct positive). Output shards are written one chunk of queries at a
time into a work directory beside --out (`.OUT.mining`) and recorded in its mine_state.json (written atomically);
a restarted run with the same arguments verifies and keeps the finished shards and mines only the rest (corpus
embeddings are cached there too). When complete, the work directory is swapped in as --out in one rename: --out
is never partial, never the input or inside it, and `--overwrite` replaces only a previous shard output.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ropebert.errors import InputError
from ropebert.io import OutputDir, atomic_write_bytes, check_not_inside
from ropebert.model.load import load_source
from ropebert.shards.beir import judged_pairs, passage_text, read_beir
from ropebert.shards.build import SkipCounter
from ropebert.shards.format import (
    MANIFEST,
    ShardWriter,
    sanitize_key,
    sha256_file,
    shards_owned,
    write_manifest,
)
from ropebert.shards.mixture import is_mixture_file, load_mixture, read_pair_sources
from ropebert.shards.records import Bad

from ..search import INDEXES, exact_topk

STATE = "mine_state.json"
CACHE = "corpus_embeddings.pt"
GUARDS = ("perc", "margin", "none")


# -- inputs: (queries, corpus, judged) ----------------------------------------------------------------------


def load_beir(root: Path, split: str, min_grade: int, corpus_limit: Optional[int], max_queries: Optional[int],
              on_error: str, skips: SkipCounter):
    """-> queries [(key, qid, text, positive_doc_id)], corpus ids, corpus texts, judged {key: set(doc_id)}.

    The directory is read by the same reader as `shards build --format beir` (ropebert.shards.beir): every bad
    line, repeated `_id`, judgement of an unknown query or document, or empty text is an error naming
    file:line, or with on_error="skip" a counted skip. A query's positive is its best-graded judged passage
    (grade >= min_grade; ties by corpus id)."""
    beir = read_beir(root, split)
    best: dict[str, tuple[int, str]] = {}
    for item in judged_pairs(beir, min_grade):
        if isinstance(item, Bad):
            if on_error == "fail":
                raise InputError(item.message() + " (pass --on-error skip to count and skip bad inputs)")
            skips.add(item.message(), item.reason)
            continue
        meta = item.sample["meta"]
        qid, did, grade = meta["qid"], meta["doc_id"], meta["grade"]
        if qid not in best or (-grade, did) < (-best[qid][0], best[qid][1]):
            best[qid] = (grade, did)
    qrels = beir.qrels()
    corpus = {d: o for d, (o, _) in beir.corpus.items() if isinstance(o.get("text"), str) and passage_text(o).strip()}
    items, judged = [], {}
    for qid in sorted(best):
        key = sanitize_key(qid)
        items.append((key, qid, beir.query_text(qid), best[qid][1]))
        judged[key] = {d for d, g in qrels[qid].items() if g >= 1}
        if max_queries is not None and len(items) >= max_queries:
            break
    ids = list(corpus)
    if corpus_limit is not None:
        # every judged passage of the kept queries, plus the first corpus_limit others (file order)
        need = set().union(*judged.values()) if judged else set()
        others = [d for d in ids if d not in need][: max(0, corpus_limit - len(need))]
        keep = need | set(others)
        ids = [d for d in ids if d in keep]
    texts = [passage_text(corpus[d]) for d in ids]
    # a corpus may hold the same passage under several ids: a copy of a judged passage is judged too
    ids_of_text: dict[str, set] = {}
    for d in ids:
        ids_of_text.setdefault(passage_text(corpus[d]), set()).add(d)
    for key, rel in judged.items():
        judged[key] = rel.union(*(ids_of_text.get(passage_text(corpus[d]), set()) for d in rel if d in corpus))
    return items, ids, texts, judged


def load_pair_shards(path: str, max_queries: Optional[int]):
    """A pair-shard directory, or a mixture file of them. With a mixture the sources' queries are taken
    round-robin (one of each source in turn, in the file's order) before `max_queries` keeps the first N, so every
    source is mined; the corpus is every distinct positive of every source. A key that two sources share is an
    error naming both (the mined shards keep the input keys)."""
    sources = read_pair_sources(path, "mine --format shards", "mined shards keep the input keys")
    ordered = [r for group in itertools.zip_longest(*(s.rows for s in sources)) for r in group if r is not None]
    items, pos_of_query, text_id = [], {}, {}
    for key, s in ordered:
        did = text_id.setdefault(s["positive"], f"p{len(text_id)}")
        items.append((key, key, s["query"], did))
        pos_of_query.setdefault(s["query"], set()).add(did)
    if max_queries is not None:
        items = items[:max_queries]
    ids = list(text_id.values())
    texts = list(text_id)
    judged = {key: pos_of_query[q] for key, _, q, _ in items}
    return items, ids, texts, judged


# -- mining -------------------------------------------------------------------------------------------------


def pick_negatives(key: str, cand_ids: list, cand_scores: list, pos_score: float, judged: set, *, k: int,
                   guard: str, guard_value: float, seed: int) -> tuple[list, list]:
    """Filter candidates (judged positives, false-negative guard) and sample k deterministically, best first."""
    keep = []
    for d, s in zip(cand_ids, cand_scores):
        if d in judged:
            continue
        if guard == "perc" and s > guard_value * pos_score:
            continue
        if guard == "margin" and s > pos_score - guard_value:
            continue
        keep.append((d, s))
    if len(keep) < k:
        return [], []
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    pick = np.random.default_rng([seed, h]).choice(len(keep), size=k, replace=False)
    chosen = [keep[i] for i in sorted(pick)]  # keep score order
    return [d for d, _ in chosen], [s for _, s in chosen]


def _fingerprint(args, n_queries: int, corpus_ids: list) -> str:
    # on_error is not part of it: chunks finished under --on-error fail are what skip would have written (a
    # failure stops before its chunk is written), so a restart may switch to skip as the failure advises
    skip = ("overwrite", "no_progress", "out", "batch_size", "device", "on_error")
    ident = {k: v for k, v in vars(args).items() if k not in skip}
    ident["model"] = str(Path(args.model).resolve())
    ident["n_queries"] = n_queries
    ident["corpus"] = hashlib.sha256("\n".join(corpus_ids).encode()).hexdigest()
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def work_dir(out: Path) -> Path:
    """The restartable in-progress directory of `--out`: a stable hidden sibling, swapped in when complete."""
    return out.parent / f".{out.name}.mining"


def _write_state(work: Path, state: dict) -> None:
    atomic_write_bytes(work / STATE, (json.dumps(state, indent=1) + "\n").encode())


def _read_state(work: Path) -> dict:
    path = work / STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("shards"), list):
            raise ValueError("not a mining state")
    except (ValueError, OSError) as e:
        raise InputError(f"{path}: unreadable mining state ({e}); pass --overwrite to discard the unfinished run "
                         f"in {work} and start over") from None
    return state


def _load_cache(cache: Path) -> Optional[dict]:
    """The corpus-embedding cache of an unfinished run, or None (absent or unreadable: it is recomputed)."""
    if not cache.is_file():
        return None
    try:
        obj = torch.load(cache, weights_only=True)
        return obj if isinstance(obj, dict) else None
    except Exception as e:  # truncated by a crash of an older version, a bad disk: it is only a cache
        print(f"mine: {cache} is unreadable ({type(e).__name__}); recomputing the corpus embeddings", file=sys.stderr)
        return None


def _ours(work: Path) -> bool:
    return all(p.name in (STATE, CACHE, MANIFEST) or p.name.startswith("shard-") or p.name.endswith(".tmp")
               for p in work.iterdir())


def _open_work_dir(out: Path, src: Path, fp: str, args, skips: SkipCounter):
    """Check --out (never the input or inside it; --overwrite only replaces a previous shard output) and open the
    work directory: continue an unfinished run with the same arguments, or start a fresh one."""
    od = OutputDir(out, what="mine", overwrite=args.overwrite, owned=shards_owned)
    check_not_inside(out, src, "mine")
    od.check()
    work = work_dir(out)
    state = {"fingerprint": fp, "on_error": args.on_error, "shards": [],
             "skipped": {"by_reason": {}, "examples": []}}
    if work.is_dir() and any(work.iterdir()):
        if not _ours(work):
            raise FileExistsError(f"mine: {work} holds files mining did not write; move them away")
        try:
            old = _read_state(work)
        except InputError:
            if not args.overwrite:
                raise
            old = None
        if old is not None and old.get("fingerprint") == fp:
            if old.get("on_error", "skip") == "skip" and args.on_error == "fail" and old["skipped"]["by_reason"]:
                raise InputError(f"mine: the unfinished run in {work} skipped queries under --on-error skip "
                                 f"({old['skipped']['by_reason']}); continue it with --on-error skip, or pass "
                                 "--overwrite to start over")
            good = []
            for e in old["shards"]:  # keep finished shards that are intact, in order
                if e["url"] is None:  # a chunk whose queries were all skipped
                    good.append(e)
                    continue
                p = work / e["url"]
                if p.is_file() and sha256_file(p) == e["sha256"]:
                    good.append(e)
                else:
                    break
            state = dict(old, shards=good, on_error=args.on_error)
            print(f"mine: resuming the unfinished run in {work}, {len(good)} finished shard(s) kept", file=sys.stderr)
        elif args.overwrite or old is None or not old["shards"]:
            shutil.rmtree(work)  # --overwrite, or an unfinished run that finished nothing: nothing is lost
        else:
            raise FileExistsError(f"mine: {work} holds an unfinished mining run with other arguments (model, input, "
                                  "top-k, guard, ...); rerun with the same arguments to continue it, or pass "
                                  "--overwrite to discard it")
    work.mkdir(parents=True, exist_ok=True)
    _write_state(work, state)  # marks the dir as this run's (restartable) output
    return od, work, state


def mine(args) -> dict:
    if args.guard not in GUARDS:
        raise InputError(f"--guard must be one of {GUARDS}, got {args.guard!r}")
    if args.num_negatives < 1 or args.top_k < args.num_negatives:
        raise InputError(f"need 1 <= --num-negatives <= --top-k (got {args.num_negatives}, {args.top_k})")
    src = Path(args.input)
    skips = SkipCounter()
    mix = None  # the loaded mixture file, with --format shards
    if args.format == "beir":
        items, corpus_ids, corpus_texts, judged = load_beir(src, args.beir_split, args.min_grade, args.corpus_limit,
                                                           args.max_queries, args.on_error, skips)
    elif args.format == "shards":
        mix = load_mixture(str(src)) if is_mixture_file(str(src)) else None
        items, corpus_ids, corpus_texts, judged = load_pair_shards(str(src), args.max_queries)
    else:
        raise InputError(f"--format must be beir or shards, got {args.format!r}")
    if not items:
        raise InputError(f"{src}: no queries with a positive to mine for")
    out = Path(args.out)
    fp = _fingerprint(args, len(items), corpus_ids)
    check_not_inside(out, src, "mine")
    if args.format == "shards" and mix is not None:  # a mixture's sources may live elsewhere
        for source in mix.sources:
            check_not_inside(out, source.path, "mine")
    OutputDir(out, what="mine", overwrite=args.overwrite, owned=shards_owned).check()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_source(args.model).to(device).eval()  # a bad --model fails before anything is written
    od, work, state = _open_work_dir(out, src, fp, args, skips)
    enc = dict(batch_size=args.batch_size, max_length=args.max_length, device=device,
               show_progress_bar=not args.no_progress)
    cache = work / CACHE
    cached = _load_cache(cache)
    if cached is not None and cached.get("fingerprint") == fp:
        c_emb = cached["emb"]
    else:
        c_emb = model.encode(corpus_texts, prefix=args.passage_prefix, **enc)  # (N, C)
        buf = io.BytesIO()
        torch.save({"fingerprint": fp, "emb": c_emb}, buf)
        atomic_write_bytes(cache, buf.getvalue())
    c_emb = c_emb.to(device)
    row_of = {d: i for i, d in enumerate(corpus_ids)}

    chunk = args.maxcount
    if state["skipped"]["by_reason"]:  # a restarted run: the input skips are counted again by load_beir
        skips = SkipCounter()
        for reason, n in state["skipped"]["by_reason"].items():
            skips.by_reason[reason] = n
        skips.examples = list(state["skipped"]["examples"])
    done_queries = sum(e["queries"] for e in state["shards"])
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), initial=done_queries, desc="mine", unit="query")
    max_judged = max(len(v) for v in judged.values())
    for start in range(done_queries, len(items), chunk):
        part = items[start:start + chunk]
        q_emb = model.encode([t for _, _, t, _ in part], prefix=args.query_prefix, **dict(enc, show_progress_bar=False))
        q_emb = q_emb.to(device)  # (Q, C)
        scores, idx = exact_topk(q_emb, c_emb, args.top_k + max_judged, args.index)  # (Q, k')
        pos_rows = torch.tensor([row_of[p] for _, _, _, p in part], device=device)
        pos_scores = (q_emb * c_emb[pos_rows]).sum(-1).cpu()  # (Q,)
        scores, idx = scores.cpu(), idx.cpu()
        writer = ShardWriter(work, maxcount=10**12, start_index=len(state["shards"]))
        written = 0
        for j, (key, qid, qtext, pid) in enumerate(part):
            cand, cs, texts_seen = [], [], set()
            for i, sc in zip(idx[j].tolist()[: args.top_k + len(judged[key])], scores[j].tolist()):
                if corpus_texts[i] in texts_seen:  # duplicate passages: one negative, not several copies
                    continue
                texts_seen.add(corpus_texts[i])
                cand.append(corpus_ids[i])
                cs.append(sc)
            ps = float(pos_scores[j])
            neg_ids, neg_scores = pick_negatives(key, cand, cs, ps, judged[key], k=args.num_negatives,
                                                 guard=args.guard, guard_value=args.guard_value, seed=args.seed)
            if not neg_ids:
                msg = (f"{src}:{qid}: fewer than {args.num_negatives} negatives left in the top {args.top_k} after "
                       f"removing positives and the {args.guard} false-negative guard")
                if args.on_error == "fail":
                    writer.close()
                    raise InputError(msg + " (raise --top-k, relax --guard-value, or pass --on-error skip)")
                skips.add(msg, "too few negatives")
                continue
            writer.write(key, {
                "query": qtext,
                "positive": corpus_texts[row_of[pid]],
                "negatives": [corpus_texts[row_of[d]] for d in neg_ids],
                "scores": [round(ps, 6)] + [round(float(s), 6) for s in neg_scores],
                "meta": {"qid": qid, "positive_id": pid, "negative_ids": neg_ids},
            })
            written += 1
        entries = writer.close()
        for e in entries:
            state["shards"].append(dict(e, queries=len(part)))
        if not entries:  # every query of the chunk was skipped: remember the chunk as done
            state["shards"].append({"url": None, "samples": 0, "bytes": 0, "sha256": "", "queries": len(part)})
        state["skipped"] = {"by_reason": dict(skips.by_reason), "examples": skips.examples}
        _write_state(work, state)
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    shards = [{k: e[k] for k in ("url", "samples", "bytes", "sha256")} for e in state["shards"] if e["url"]]
    if not shards:
        raise InputError(f"mining wrote no samples ({skips.count} queries skipped)")
    source = {
        "format": "mined", "input": str(src), "input_format": args.format, "model": str(args.model),
        "top_k": args.top_k, "num_negatives": args.num_negatives, "guard": args.guard,
        "guard_value": args.guard_value, "seed": args.seed, "query_prefix": args.query_prefix,
        "passage_prefix": args.passage_prefix, "max_length": args.max_length, "corpus_size": len(corpus_ids),
        "queries": len(items), "index": args.index, "scores": "cosine similarity of the mining model, positive first",
    }
    if args.format == "beir":
        source.update(beir_split=args.beir_split, min_grade=args.min_grade, corpus_limit=args.corpus_limit)
    m = write_manifest(work, kind="hard_negatives", shards=shards, source=source, skipped=skips.as_dict(),
                       extra={"score_kind": "cosine", "score_teacher": {"path": str(args.model)}})
    for p in (work / STATE, cache):
        if p.exists():
            os.remove(p)
    od.commit(work)  # the finished output replaces --out in one rename
    return m


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ropebert mine",
                                 description="Mine hard negatives with a model and write stage-2 shards (+ scores).")
    ap.add_argument("--model", required=True, help="exported RoPE BERT dir, or a BERT dir (converted on the fly)")
    ap.add_argument("--input", required=True,
                    help="BEIR directory, pair-shard directory, or a mixture file of pair-shard directories (.yaml)")
    ap.add_argument("--format", default="beir", choices=["beir", "shards"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--beir-split", default="test")
    ap.add_argument("--min-grade", type=int, default=1, help="BEIR: minimum grade of the positive")
    ap.add_argument("--top-k", type=int, default=50, help="candidates retrieved per query (after removing positives)")
    ap.add_argument("--num-negatives", type=int, default=7)
    ap.add_argument("--guard", default="perc", choices=GUARDS,
                    help="false-negative guard: perc (drop score > value*positive), margin (drop score > "
                         "positive-value), none")
    ap.add_argument("--guard-value", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--query-prefix", default="query: ")
    ap.add_argument("--passage-prefix", default="passage: ")
    ap.add_argument("--max-length", type=int, default=256, help="token truncation for embedding")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--maxcount", type=int, default=2000,
                    help="queries per output shard (the restart unit; stage-2 samples are ~8x a pair's size)")
    ap.add_argument("--max-queries", type=int, default=None)
    ap.add_argument("--corpus-limit", type=int, default=None,
                    help="BEIR: keep every judged passage plus the first N-judged others (for quick runs)")
    ap.add_argument("--index", default="auto", choices=INDEXES, help="top-k search: exact blocked matmul, faiss, or auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--on-error", default="fail", choices=["fail", "skip"])
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    m = mine(args)
    print(f"mined {m['total_samples']} stage-2 samples ({args.num_negatives} negatives + scores) in "
          f"{len(m['shards'])} shard(s) to {args.out}")
    if m["skipped"]["count"]:
        print(f"skipped {m['skipped']['count']} queries: {m['skipped']['by_reason']}", file=sys.stderr)
    return 0
