# Copyright ropebert contributors. Apache-2.0.
"""`ropebert eval retrieval`: BEIR-format retrieval with exact dense search, BM25 and
sentence-transformers baselines side by side; nDCG@10 / MRR@10 / Recall@100 (trec_eval definitions).

    BEIR dir: corpus.jsonl ({"_id", "title", "text"}), queries.jsonl ({"_id", "text"}),
              qrels/<split>.tsv (query-id, corpus-id, grade; header line optional)
    dense:    embeddings of `query_prefix + query` and `passage_prefix + title + " " + text`, exact top-k by
              blocked matmul (faiss IndexFlatIP when installed and asked for)
    systems:  --model DIR (ropebert: exported, RoPE BERT, or APE BERT converted on the fly), repeatable;
              --baseline bm25 (bm25s) and --baseline st:DIR (any sentence-transformers / HF dir), repeatable
    sizes:    --dims 384,256,128,64 --quantize float32,int8,binary [--rescore K]: every dense system is encoded
              once at full size, then searched at every (dim, precision): Matryoshka prefix renormalised,
              int8 calibrated on the corpus / binary by Hamming distance, optional float rescoring of the top K
              (pipelines/search.py); nDCG@10 / MRR@10 / Recall@100, bytes per vector and search time each
    agreement: --agreement SPEC (a --model / --baseline spec, typically st:PARENT): every dense system's mean
              cosine to SPEC's embedding of the same text, over the judged queries and over the corpus (pooled,
              full size; no labels are read). How much of a parent a converted or trained model still
              reproduces on a split: a label-free reading beside nDCG@10
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ropebert.errors import InputError
from ropebert.model.load import is_ape_bert, load_source, read_config
from ropebert.shards.beir import passage_text, read_beir

from ..search import INDEXES, PRECISIONS, bytes_per_vector, exact_topk, matryoshka_prefix, quantized_search
from .metrics import evaluate_run
from .report import markdown_table, ndcg_bytes_chart, retrieval_bar_chart, write_json

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# BEIR reader
# ----------------------------------------------------------------------------------------------------------


@dataclass
class BeirData:
    corpus_ids: list[str]
    corpus_texts: list[str]  # title + " " + text (BEIR convention), or text when the title is empty
    query_ids: list[str]  # judged queries only (those with a qrels entry), in queries.jsonl order
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    stats: dict = field(default_factory=dict)


def load_beir(data_dir: str | Path, split: str = "test", max_queries: Optional[int] = None,
              max_docs: Optional[int] = None, seed: int = 0) -> BeirData:
    """Read a BEIR directory. Queries without a qrels entry are skipped (counted in stats); qrels naming
    documents absent from the corpus are kept (they still count as relevant, as in BEIR) and counted.

    max_queries: keep the first N judged queries. max_docs: shrink the corpus to N documents for quick runs
    (every document judged for a kept query stays; the rest is a seeded sample) — numbers from a shrunk
    corpus are NOT comparable to published tables (the JSON records both settings)."""
    d = Path(data_dir)
    beir = read_beir(d, split)
    beir.raise_first_bad()  # evaluation has no skip mode: a bad line or a repeated _id is an error
    qrels = beir.qrels()
    if not qrels:
        raise InputError(f"{d}: qrels/{split}.tsv has no judgements")
    ids, texts = [], []
    for did, (doc, where) in beir.corpus.items():
        if not isinstance(doc.get("text"), str):
            what = "missing field 'text'" if "text" not in doc else "field 'text' is not a string"
            raise InputError(f"{where}: {what} (corpus _id {did!r})")
        ids.append(did)
        texts.append(passage_text(doc))
    seen = set(ids)
    qids, qtexts = [], []
    for qid, (q, where) in beir.queries.items():
        if qid in qrels:
            if not isinstance(q.get("text"), str):
                what = "missing field 'text'" if "text" not in q else "field 'text' is not a string"
                raise InputError(f"{where}: {what} (query _id {qid!r})")
            qids.append(qid)
            qtexts.append(q["text"])
    queries = beir.queries
    unknown_q = sorted(q for q in qrels if q not in queries)
    if unknown_q:
        raise InputError(f"{d}: qrels/{split}.tsv names queries absent from queries.jsonl: {unknown_q[:5]}")
    n_unjudged = len(queries) - len(qids)
    if max_queries is not None:
        qids, qtexts = qids[:max_queries], qtexts[:max_queries]
        qrels = {q: qrels[q] for q in qids}
    if max_docs is not None and max_docs < len(ids):
        import random

        judged = {did for q in qrels.values() for did in q}
        keep = {i for i, did in enumerate(ids) if did in judged}
        others = [i for i in range(len(ids)) if i not in keep]
        keep |= set(random.Random(seed).sample(others, max(0, min(len(others), max_docs - len(keep)))))
        ids = [ids[i] for i in sorted(keep)]
        texts = [texts[i] for i in sorted(keep)]
        seen = set(ids)
    missing_docs = sum(1 for q in qrels.values() for did in q if did not in seen)
    stats = {
        "num_corpus": len(ids),
        "num_corpus_file": len(beir.corpus),
        "num_queries_file": len(queries),
        "num_queries_judged": len(qids),
        "num_queries_skipped_without_qrels": n_unjudged,
        "num_qrels": sum(len(v) for v in qrels.values()),
        "num_qrels_docs_missing_from_corpus": missing_docs,
    }
    if missing_docs:
        logger.warning("BEIR: %d qrels entries name documents absent from the corpus", missing_docs)
    return BeirData(ids, texts, qids, qtexts, qrels, stats)


# ----------------------------------------------------------------------------------------------------------
# systems: a registry of retrievers keyed by kind
# ----------------------------------------------------------------------------------------------------------


@dataclass
class EncodeSettings:
    query_prefix: str = "query: "
    passage_prefix: str = "passage: "
    batch_size: int = 32
    max_length: Optional[int] = None  # tokens; None = the model's max_position_embeddings
    max_tokens: Optional[int] = 16384  # token budget per batch (bounded memory for long inputs)
    device: Optional[str] = None
    show_progress_bar: bool = True


class RopeBertEncoder:
    """A ropebert model (exported dir, RoPE BERT dir, or APE BERT dir converted on the fly)."""

    kind = "ropebert"

    def __init__(self, model_or_path, settings: EncodeSettings, name: Optional[str] = None, **encode_kwargs):
        self.converted_from_ape = False
        if isinstance(model_or_path, (str, Path)):
            if (Path(model_or_path) / "config.json").is_file():
                self.converted_from_ape = is_ape_bert(read_config(model_or_path))
            self.model = load_source(str(model_or_path)).eval()
            self.name = name or str(model_or_path)
        else:
            self.model = model_or_path.eval()
            self.name = name or type(model_or_path).__name__
        if settings.device:
            self.model.to(settings.device)
        self.settings = settings
        self.encode_kwargs = encode_kwargs
        self.prefixes = {"query": settings.query_prefix, "passage": settings.passage_prefix}

    def encode(self, texts: Sequence[str], kind: str, max_length: Optional[int] = None) -> torch.Tensor:
        s = self.settings
        return self.model.encode(
            list(texts),
            prefix=self.prefixes[kind],
            batch_size=s.batch_size,
            max_length=max_length or s.max_length,
            max_tokens=s.max_tokens,
            device=s.device,
            show_progress_bar=s.show_progress_bar,
            **self.encode_kwargs,
        )

    def embedding_size(self) -> int:
        return int(self.model.config.output_dim)

    def describe(self) -> dict:
        c = self.model.config
        return {"kind": self.kind, "model": self.name, "prefixes": self.prefixes, "rope_theta": c.rope_theta,
                "max_position_embeddings": c.max_position_embeddings, "converted_from_ape": self.converted_from_ape,
                "label": ("ropebert (APE->RoPE, untrained): " if self.converted_from_ape else "ropebert: ")
                + short_path(self.name)}


class SentenceTransformerEncoder:
    """Any sentence-transformers / HF directory. Prefixes: the model's own prompts named "query" and
    "passage"/"document" when its config defines them, else none (how e.g. all-MiniLM-L6-v2 is used)."""

    kind = "sentence-transformers"

    def __init__(self, path: str, settings: EncodeSettings, name: Optional[str] = None):
        from sentence_transformers import SentenceTransformer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"st baseline: {path!r} is not a directory")
        self.model = SentenceTransformer(str(path), device=settings.device, local_files_only=True)
        self.name = name or str(path)
        self.settings = settings
        prompts = dict(getattr(self.model, "prompts", None) or {})
        self.prefixes = {"query": prompts.get("query", ""),
                         "passage": prompts.get("passage", prompts.get("document", ""))}

    def encode(self, texts: Sequence[str], kind: str, max_length: Optional[int] = None) -> torch.Tensor:
        if max_length:
            self.model.max_seq_length = int(max_length)
        emb = self.model.encode(
            [self.prefixes[kind] + t for t in texts],
            batch_size=self.settings.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=self.settings.show_progress_bar,
        )
        return emb.float().cpu()

    def embedding_size(self) -> Optional[int]:
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        n = get()  # sentence-transformers >= 6 renamed it
        return int(n) if n is not None else None

    def describe(self) -> dict:
        return {"kind": self.kind, "model": self.name, "prefixes": self.prefixes,
                "max_seq_length": self.model.max_seq_length, "label": "sentence-transformers: " + short_path(self.name)}


class BM25Retriever:
    """Lexical baseline: bm25s (Lucene BM25, k1=1.5, b=0.75, English stopwords, no stemmer unless PyStemmer
    is installed)."""

    kind = "bm25"

    def __init__(self, k1: float = 1.5, b: float = 0.75):
        import bm25s

        self.bm25s = bm25s
        self.k1, self.b = k1, b
        try:
            import Stemmer  # optional (PyStemmer)

            self.stemmer = Stemmer.Stemmer("english")
        except ImportError:
            self.stemmer = None
        self.name = "bm25"

    def search(self, data: BeirData, k: int) -> dict[str, dict[str, float]]:
        bm = self.bm25s
        corpus_tok = bm.tokenize(data.corpus_texts, stopwords="en", stemmer=self.stemmer, show_progress=False)
        retriever = bm.BM25(k1=self.k1, b=self.b)
        retriever.index(corpus_tok, show_progress=False)
        q_tok = bm.tokenize(data.query_texts, stopwords="en", stemmer=self.stemmer, show_progress=False)
        k = min(k, len(data.corpus_ids))
        docs, scores = retriever.retrieve(q_tok, k=k, show_progress=False)
        run = {}
        for qi, qid in enumerate(data.query_ids):
            run[qid] = {data.corpus_ids[int(di)]: float(s) for di, s in zip(docs[qi], scores[qi])}
        return run

    def describe(self) -> dict:
        return {"kind": self.kind, "model": "bm25s", "label": "BM25 (bm25s)", "k1": self.k1, "b": self.b, "stopwords": "en",
                "stemmer": "english (PyStemmer)" if self.stemmer else None}


def short_path(p: str, parts: int = 2) -> str:
    """The last `parts` components of a path, for labels in tables and plots."""
    return "/".join(Path(p).parts[-parts:]) if p else p


def encode_data(encoder, data: BeirData) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries (Q, C), documents (N, C)) embeddings at the encoder's full size."""
    return encoder.encode(data.query_texts, "query"), encoder.encode(data.corpus_texts, "passage")


def run_from_topk(data: BeirData, scores: torch.Tensor, idx: torch.Tensor) -> dict[str, dict[str, float]]:
    return {
        qid: {data.corpus_ids[int(j)]: float(s) for s, j in zip(scores[qi].tolist(), idx[qi].tolist())}
        for qi, qid in enumerate(data.query_ids)
    }


def encode_timed(encoder, data: BeirData) -> tuple[torch.Tensor, torch.Tensor, float]:
    """encode_data(...) and the seconds it took."""
    t = time.perf_counter()
    q, d = encode_data(encoder, data)
    return q, d, time.perf_counter() - t


# ----------------------------------------------------------------------------------------------------------
# sizes: Matryoshka dims x precisions (--dims / --quantize / --rescore)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SizeSweep:
    dims: Optional[list[int]]  # None: each system's full size
    precisions: list[str]
    rescore: Optional[int] = None  # applies to int8 and binary


def parse_dims(text: str) -> list[int]:
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise InputError(f"--dims: expected comma-separated sizes such as 384,256,128, got {text!r}")
    dims = []
    for t in items:
        try:
            n = int(t)
        except ValueError:
            raise InputError(f"--dims: {t!r} is not an integer (in {text!r})") from None
        if n < 1:
            raise InputError(f"--dims: sizes must be >= 1, got {n}")
        if n in dims:
            raise InputError(f"--dims: {n} is given twice (in {text!r})")
        dims.append(n)
    return dims


def parse_precisions(text: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",")]
    out = []
    for t in items:
        if t not in PRECISIONS:
            raise InputError(f"--quantize: unknown precision {t!r} (choose from {','.join(PRECISIONS)})")
        if t in out:
            raise InputError(f"--quantize: {t} is given twice (in {text!r})")
        out.append(t)
    return out


def size_sweep_from_args(dims: Optional[str], quantize: Optional[str], rescore: Optional[int]) -> Optional[SizeSweep]:
    """None when neither --dims nor --quantize is given (the plain evaluation)."""
    if rescore is not None:
        if rescore < 1:
            raise InputError(f"--rescore must be >= 1, got {rescore}")
        if quantize is None or not set(parse_precisions(quantize)) & {"int8", "binary"}:
            raise InputError("--rescore K re-scores int8 / binary results: it needs --quantize with int8 or binary")
    if dims is None and quantize is None:
        return None
    return SizeSweep(parse_dims(dims) if dims is not None else None,
                     parse_precisions(quantize) if quantize is not None else ["float32"], rescore)


def check_dims(dims: Sequence[int], size: Optional[int], name: str) -> None:
    for n in dims:
        if size is not None and n > size:
            raise InputError(f"--dims: {n} is larger than the embedding size {size} of {name}")


def declared_embedding_size(spec: str) -> Optional[int]:
    """The embedding size a ropebert model directory's config.json declares (None when not known without
    loading the model): checked before any model is evaluated, so a bad --dims fails at once."""
    if spec.startswith("ropebert:"):
        spec = spec[len("ropebert:"):]
    if spec == "bm25" or spec.startswith("st:") or not (Path(spec) / "config.json").is_file():
        return None
    cfg = read_config(spec)
    n = cfg.get("embedding_dim") or cfg.get("hidden_size")
    return int(n) if isinstance(n, int) and not isinstance(n, bool) else None


def size_sweep_search(q: torch.Tensor, d: torch.Tensor, data: BeirData, k: int, index: str,
                      sweep: SizeSweep) -> list[dict]:
    """One entry per (dim, precision), dims outer: metrics, bytes per document vector, and the search time
    (quantising corpus and queries, top-k, rescoring; encoding excluded)."""
    import sentence_transformers.util.quantization  # noqa: F401  (imported before the first clock starts)

    out = []
    for dim in sweep.dims or [d.shape[1]]:
        qd, dd = matryoshka_prefix(q, dim), matryoshka_prefix(d, dim)
        for precision in sweep.precisions:
            rescore = sweep.rescore if precision != "float32" else None
            t0 = time.perf_counter()
            scores, idx = quantized_search(qd, dd, k, precision, rescore=rescore, index=index)
            search_s = time.perf_counter() - t0
            ev = evaluate_run(data.qrels, run_from_topk(data, scores, idx))
            out.append({"dim": dim, "precision": precision, "rescore": rescore,
                        "bytes_per_vector": bytes_per_vector(dim, precision), "metrics": ev["metrics"],
                        "num_queries_evaluated": ev["num_queries_evaluated"],
                        "search_time_s": round(search_s, 6)})
    return out


def build_system(spec: str, settings: EncodeSettings):
    """`bm25`, `st:DIR` (sentence-transformers), or `DIR` / `ropebert:DIR` (ropebert model)."""
    if spec == "bm25":
        return BM25Retriever()
    if spec.startswith("st:"):
        return SentenceTransformerEncoder(spec[3:], settings)
    if spec.startswith("ropebert:"):
        spec = spec[len("ropebert:"):]
    return RopeBertEncoder(spec, settings)


def agreement(q: torch.Tensor, d: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor], name: str,
              reference_name: str) -> dict:
    """Mean cosine of each query's / document's embedding (q (Q, C), d (N, C)) with the reference system's
    embedding of the same text (the same rows of `reference`), and over all Q + N texts."""
    rq, rd = reference
    if q.shape[1] != rq.shape[1]:
        raise InputError(f"eval retrieval --agreement: {name} embeds in {q.shape[1]} dims, {reference_name} in "
                         f"{rq.shape[1]}: agreement needs one embedding space")
    cq = torch.nn.functional.cosine_similarity(q.float(), rq.float(), dim=-1)  # (Q,)
    cd = torch.nn.functional.cosine_similarity(d.float(), rd.float(), dim=-1)  # (N,)
    return {"reference": reference_name, "queries": round(cq.mean().item(), 6),
            "documents": round(cd.mean().item(), 6), "all": round(torch.cat([cq, cd]).mean().item(), 6)}


def run_system(system, data: BeirData, k: int = 100, index: str = "auto", sweep: Optional[SizeSweep] = None,
               reference: Optional[tuple[str, tuple[torch.Tensor, torch.Tensor]]] = None,
               encoded: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None) -> dict:
    """One system's evaluation; with `sweep`, a dense system is encoded once and also searched at every
    (dim, precision) of the sweep (the entry's `quantized` list; BM25 is evaluated once, as without it).
    reference: (name, (queries, documents) embeddings) of the --agreement system: a dense system's agreement
    with it is added (the entry's `agreement`). encoded: this system's (queries, documents, encode seconds)
    when already computed (the --agreement system listed as a system too), used instead of encoding again."""
    t0 = time.perf_counter()
    sizes = agree = None
    if isinstance(system, BM25Retriever):
        run = system.search(data, k)
    else:
        if sweep is not None:
            check_dims(sweep.dims or [], system.embedding_size(), system.name)
        q, d, encode_s = encoded if encoded is not None else encode_timed(system, data)
        run = run_from_topk(data, *exact_topk(q, d, k, index=index))
        if sweep is not None:
            check_dims(sweep.dims or [], q.shape[1], system.name)
            sizes = size_sweep_search(q, d, data, k, index, sweep)
        if reference is not None:
            agree = agreement(q, d, reference[1], system.name, reference[0])
    ev = evaluate_run(data.qrels, run)
    out = {
        "name": system.name,
        **system.describe(),
        "metrics": ev["metrics"],
        "num_queries_evaluated": ev["num_queries_evaluated"],
        "num_judged_queries_without_relevant": ev["num_judged_queries_without_relevant"],
        "per_query": ev["per_query"],
        "wall_time_s": round(time.perf_counter() - t0, 3),
    }
    if sizes is not None or agree is not None:
        out["encode_time_s"] = round(encode_s, 3)
        out["embedding_size"] = int(q.shape[1])
    if sizes is not None:
        out["quantized"] = sizes
    if agree is not None:
        out["agreement"] = agree
    return out


SIZE_HEADER = ["system", "dim", "precision", "rescore", "bytes/vector", "nDCG@10", "MRR@10", "Recall@100", "search ms"]


def size_rows(results: Sequence[dict]) -> list[list]:
    """Rows of the sizes table: one per (system, dim, precision); BM25 once, without a size."""
    rows = []
    for r in results:
        m = ("ndcg@10", "mrr@10", "recall@100")
        if "quantized" not in r:
            rows.append([r["label"], "-", "-", "-", "-"] + [r["metrics"][x] for x in m] + ["-"])
            continue
        for e in r["quantized"]:
            rows.append([r["label"], e["dim"], e["precision"], e["rescore"] if e["rescore"] else "-",
                         e["bytes_per_vector"]] + [e["metrics"][x] for x in m] + [f"{1000 * e['search_time_s']:.1f}"])
    return rows


def size_plot_path(plot: str | Path) -> Path:
    """Where --plot FILE.png puts the nDCG@10-vs-bytes chart of a sweep: FILE-sizes.png beside it."""
    p = Path(plot)
    return p.with_name(f"{p.stem}-sizes{p.suffix or '.png'}")


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def add_encode_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--query-prefix", default="query: ", help="prefix of queries for ropebert models (default 'query: ')")
    ap.add_argument("--passage-prefix", default="passage: ", help="prefix of documents (default 'passage: ')")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16384, help="token budget per batch (bounded memory)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ap.add_argument("--output", default=None, help="write the result JSON here")
    ap.add_argument("--plot", default=None, help="write a PNG chart here")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="ropebert eval retrieval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="ropebert model dir (repeatable)")
    ap.add_argument("--baseline", action="append", default=[], help="bm25 | st:DIR (repeatable)")
    ap.add_argument("--data", required=True, help="BEIR directory (corpus.jsonl, queries.jsonl, qrels/)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-length", type=int, default=None, help="truncation length in tokens (default: model's)")
    ap.add_argument("--top-k", type=int, default=100, help="documents retrieved per query (>= 100 for recall@100)")
    ap.add_argument("--index", default="auto", choices=INDEXES, help="top-k search: exact blocked matmul, faiss, or auto")
    ap.add_argument("--max-queries", type=int, default=None, help="evaluate only the first N judged queries")
    ap.add_argument("--max-docs", type=int, default=None,
                    help="quick runs: shrink the corpus to N docs (judged docs kept; not comparable to full runs)")
    ap.add_argument("--dims", default=None,
                    help="Matryoshka sizes, e.g. 384,256,128,64: dense systems are also searched on the first D "
                         "channels, renormalised (default with --quantize: the full size)")
    ap.add_argument("--quantize", default=None,
                    help=f"precisions of the stored vectors, comma-separated from {','.join(PRECISIONS)} "
                         "(default with --dims: float32)")
    ap.add_argument("--rescore", type=int, default=None,
                    help="int8 / binary: re-score the top K with the float query (sentence-transformers' recipe)")
    ap.add_argument("--agreement", default=None, metavar="SPEC",
                    help="also report each dense system's mean cosine to this system's embeddings of the same texts "
                         "(DIR, ropebert:DIR or st:DIR; typically st:PARENT)")
    add_encode_args(ap)
    args = ap.parse_args(argv)
    if not args.model and not args.baseline:
        raise InputError("eval retrieval: give at least one --model or --baseline")
    if args.agreement == "bm25":
        raise InputError("eval retrieval --agreement: BM25 has no embeddings; give a dense system (DIR or st:DIR)")
    sweep = size_sweep_from_args(args.dims, args.quantize, args.rescore)
    if args.top_k < 100:
        raise InputError(f"eval retrieval: --top-k {args.top_k} < 100 would under-report recall@100")
    if args.device is None and torch.cuda.is_available():
        args.device = "cuda"
    settings = EncodeSettings(args.query_prefix, args.passage_prefix, args.batch_size, args.max_length,
                              args.max_tokens, args.device, not args.no_progress)
    specs = [(m, f"ropebert:{m}") for m in args.model] + [(b, b) for b in args.baseline]
    if sweep is not None:
        if all(full == "bm25" for _, full in specs):
            raise InputError("eval retrieval: --dims / --quantize apply to dense systems (--model DIR or "
                             "--baseline st:DIR); BM25 alone has none")
        for spec, full in specs:
            check_dims(sweep.dims or [], declared_embedding_size(full), spec)
    t0 = time.perf_counter()
    data = load_beir(args.data, args.split, args.max_queries, args.max_docs)
    reference = ref_full = ref_encoded = None
    if args.agreement:  # encoded once; reused when the same system is also evaluated
        ref_full = args.agreement if args.agreement.startswith(("st:", "ropebert:")) else f"ropebert:{args.agreement}"
        ref_encoded = encode_timed(build_system(ref_full, settings), data)
        reference = (args.agreement, ref_encoded[:2])
    results = []
    for spec, full in specs:
        system = build_system(full, settings)
        r = run_system(system, data, args.top_k, args.index, sweep, reference,
                       encoded=ref_encoded if full == ref_full else None)
        r["name"] = spec
        logger.info("eval retrieval: %s %s", spec, {k: round(v, 4) for k, v in r["metrics"].items()})
        results.append(r)
    out = {
        "task": "retrieval",
        "model": results[0]["name"],
        "data": str(args.data),
        "split": args.split,
        "settings": {**vars(settings), "top_k": args.top_k, "index": args.index, "max_queries": args.max_queries,
                     "max_docs": args.max_docs, "agreement": args.agreement,
                     **({} if sweep is None else {"dims": sweep.dims, "quantize": sweep.precisions,
                                                  "rescore": sweep.rescore})},
        "data_stats": data.stats,
        "metrics": results[0]["metrics"],
        "results": results,
        "wall_time_s": round(time.perf_counter() - t0, 3),
    }
    rows = [[r["label"]] + [r["metrics"][m] for m in ("ndcg@10", "mrr@10", "recall@100")] for r in results]
    print(f"retrieval on {args.data} ({args.split}): {data.stats['num_queries_judged']} judged queries, "
          f"{data.stats['num_corpus']} documents")
    print(markdown_table(["system", "nDCG@10", "MRR@10", "Recall@100"], rows))
    if reference is not None:
        print(f"\nagreement with {reference[0]}: mean cosine of the pooled embeddings of the same texts")
        print(markdown_table(["system", "queries", "documents", "all"],
                             [[r["label"], *(r["agreement"][k] for k in ("queries", "documents", "all"))]
                              for r in results if "agreement" in r]))
    if sweep is not None:
        print(f"\nby size (top-k {args.top_k}; search time: quantising, top-k and rescoring, encoding excluded)")
        print(markdown_table(SIZE_HEADER, size_rows(results)))
    if args.output:
        write_json(out, args.output)
    if args.plot:
        title = f"{Path(args.data).name} ({args.split})"
        retrieval_bar_chart(results, args.plot, title=title)
        print(f"wrote {args.plot}")
        if sweep is not None:
            p = ndcg_bytes_chart(results, size_plot_path(args.plot), title=title)
            print(f"wrote {p}")
    return 0
