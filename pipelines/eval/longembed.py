# Copyright ropebert contributors. Apache-2.0.
"""`ropebert eval passkey` / `ropebert eval needle`: LongEmbed-style synthetic long-context retrieval, built
offline and deterministically from a seed, with the context-extension methods of LongEmbed Table 6.

passkey (LongEmbed's personalized passkey retrieval):
    filler   "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." repeated
    needle   "{name}'s pass key is {N}. Remember it. {N} is the pass key for {name}." at a random sentence
             boundary (uniform depth); one needle per document; names are full names ("Joyce Jenkins"), as in
             LongEmbed's LEMBPasskeyRetrieval, drawn from the seed and distinct within a length
    query    "what is the passkey for {name}?"; per length `num_docs` candidates (default 100), the first
             `num_queries` (default 50) of which are the gold documents of the queries
needle (real-data variant of LongEmbed's needle test, whose GPT-4 facts we do not have):
    needle   an MS MARCO passage judged relevant (grade >= 2) to an MS MARCO query; the query is the query;
             distractor candidates carry passages judged relevant (grade >= 1) to none of the chosen queries
    haystack Paul Graham essay text (pg/corpus.jsonl), each document starting at a random essay chunk
lengths     256 ... 32768 tokens. With the model's tokenizer (what the CLI uses) each document holds as many
            words as fit in `length` tokens including the passage prefix and special tokens (within a few
            tokens of the target). Without a tokenizer LongEmbed's rule applies: floor(0.75 * length) words
            (0.75 words per token). Under BERT WordPiece that rule undershoots (filler: ~0.95 x length,
            Paul Graham text: ~0.91 x length tokens), hence the token budget when the tokenizer is known.
            Acc@1 per length and the average over lengths (LongEmbed's headline number).
seeds       `--seed 0,1,2,3,4` evaluates each seed's documents with the same model (and baselines) and reports
            Acc@1 averaged over the seeds beside each seed's own (`acc@1_per_seed`).

Methods (`--method`): the presets of ropebert.model.long_context (LongEmbed Table 6).
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ropebert.errors import InputError
from ropebert.model.load import load_source
from ropebert.model.long_context import METHODS, check_method_supported, long_context, method_preset
from ropebert.shards.beir import load_objects, read_qrels

from .metrics import accuracy_at_1
from .report import accuracy_heatmap, length_label, markdown_table, write_json
from .retrieval import EncodeSettings, SentenceTransformerEncoder, add_encode_args, short_path

logger = logging.getLogger(__name__)

DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
WORDS_PER_TOKEN = 0.75
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "{name}'s pass key is {N}. Remember it. {N} is the pass key for {name}."
PASSKEY_QUERY = "what is the passkey for {name}?"
# personalized passkeys use full names as LongEmbed's LEMBPasskeyRetrieval does ("Joyce Jenkins's pass key is
# ..."): first + last name pairs drawn per length from these lists, distinct within a length
FIRST_NAMES = (
    "Aaron Abigail Adam Adrian Aiden Alice Amelia Andrew Anna Anthony Aria Arthur Aubrey Audrey Austin Ava "
    "Benjamin Bella Blake Brandon Brian Brooke Caleb Cameron Camila Carlos Caroline Charles Charlotte Chloe "
    "Christian Claire Connor Daniel David Dylan Eleanor Elijah Elizabeth Ella Emily Emma Eric Ethan Evelyn "
    "Felix Fiona Gabriel Grace Hannah Harper Henry Hazel Isaac Isabella Jack Jacob James Jasmine Jason "
    "Jennifer Jessica John Jonathan Jordan Joseph Joshua Julia Justin Kevin Kyle Laura Leah Leo Liam Lily "
    "Logan Lucas Lucy Luke Madison Maria Mason Matthew Maya Mia Michael Natalie Nathan Nicholas Noah Nora "
    "Oliver Olivia Owen Patrick Paul Peter Rachel Rebecca Riley Robert Ryan Samuel Sarah Scarlett Sebastian "
    "Sophia Stella Thomas Tyler Victoria Violet William Zoe"
).split()
LAST_NAMES = (
    "Adams Allen Anderson Bailey Baker Barnes Bell Bennett Brooks Brown Butler Campbell Carter Clark Collins Cook "
    "Cooper Cox Cruz Davis Diaz Edwards Evans Fisher Flores Foster Garcia Gomez Gonzalez Gray Green Griffin Hall "
    "Harris Hayes Henderson Hill Howard Hughes Jackson James Jenkins Johnson Jones Kelly Kim King Lee Lewis Long "
    "Lopez Martin Martinez Miller Mitchell Moore Morgan Morris Murphy Myers Nelson Nguyen Parker Patel Perez "
    "Perry Peterson Phillips Powell Price Ramirez Reed Reyes Richardson Rivera Roberts Robinson Rodriguez Rogers "
    "Ross Russell Sanchez Sanders Scott Smith Stewart Sullivan Taylor Thompson Torres Turner Walker Ward Watson "
    "White Williams Wilson Wood Wright Young"
).split()


def sample_full_names(rng: random.Random, n: int) -> list[str]:
    """n distinct "First Last" names drawn with `rng` (without replacement from all first x last pairs)."""
    total = len(FIRST_NAMES) * len(LAST_NAMES)
    if n > total:
        raise InputError(f"passkey: --num-docs {n} > {total} distinct names available")
    return [f"{FIRST_NAMES[i // len(LAST_NAMES)]} {LAST_NAMES[i % len(LAST_NAMES)]}" for i in rng.sample(range(total), n)]


# ----------------------------------------------------------------------------------------------------------
# document construction
# ----------------------------------------------------------------------------------------------------------


class TokenCounter:
    """Counts tokens of whitespace words under a tokenizer (cached per word; exact for BERT WordPiece, whose
    pre-tokenizer splits on whitespace first). Without a tokenizer: only the word budget applies."""

    def __init__(self, tokenizer=None):
        self.tok = tokenizer
        self.cache: dict[str, int] = {}

    def __call__(self, word: str) -> int:
        n = self.cache.get(word)
        if n is None:
            n = self.cache[word] = len(self.tok.tokenize(word))
        return n

    def prime(self, words) -> None:
        """Count many words in one batched tokenizer call (fast tokenizers run it in Rust)."""
        new = sorted({w for w in words if w not in self.cache})
        if new and self.tok is not None:
            backend = getattr(self.tok, "backend_tokenizer", None)  # Rust tokenizer: skips per-item Python work
            if backend is not None:
                lens = [len(e.ids) for e in backend.encode_batch(new, add_special_tokens=False)]
            else:
                lens = [len(i) for i in self.tok(new, add_special_tokens=False, verbose=False)["input_ids"]]
            self.cache.update(zip(new, lens))

    def reserve(self, prefix: str) -> int:
        """Tokens that encode() adds around a document: special tokens + the prefix."""
        if self.tok is None:
            return 0
        return len(self.tok(prefix, add_special_tokens=True)["input_ids"])


def _sentence_ends(words: Sequence[str]) -> list[int]:
    """Indices i such that a sentence boundary lies before words[i] (0 and len(words) included)."""
    ends = [0] + [i + 1 for i, w in enumerate(words) if w.endswith((".", "!", "?"))]
    if ends[-1] != len(words):
        ends.append(len(words))
    return sorted(set(ends))


def build_document(haystack: Sequence[str], needle: str, length: int, rng: random.Random,
                   counter: Optional[TokenCounter] = None, reserve: int = 0,
                   haystack_cumtokens: Optional[Sequence[int]] = None) -> tuple[str, float]:
    """Take haystack words up to the length budget, then insert the needle at a uniformly random sentence
    boundary. Returns (text, depth in [0, 1]).

    Budget: with a tokenizer (counter), prefix + special tokens + text <= `length` tokens, as many words as
    fit; without one, LongEmbed's rule: floor(0.75 * length) words, needle included.
    haystack_cumtokens: optional prefix sums of the haystack's per-word token counts (speed).
    """
    needle_words = needle.split()
    if counter is not None and counter.tok is not None:
        budget = length - reserve - sum(counter(w) for w in needle_words)
        if budget < 0:
            raise InputError(f"length {length} is too short for a needle of {len(needle_words)} words")
        cum = haystack_cumtokens
        if cum is None:
            cum = list(itertools.accumulate(counter(w) for w in haystack))
        n = bisect.bisect_right(cum, budget)  # words whose cumulative token count fits the budget
        short = n == len(haystack) and (not cum or cum[-1] < budget - 16)
    else:
        n = int(length * WORDS_PER_TOKEN) - len(needle_words)
        if n < 0:
            raise InputError(f"length {length} is too short for a needle of {len(needle_words)} words")
        short = n > len(haystack)
    if short:
        raise InputError(f"haystack too short ({len(haystack)} words) for length {length}")
    words = list(haystack[:n])
    pos = rng.choice(_sentence_ends(words))
    depth = pos / max(1, len(words))
    return " ".join(words[:pos] + needle_words + words[pos:]), depth


@dataclass
class SyntheticTask:
    """One length of a synthetic task: queries[i]'s gold document is docs[gold[i]]."""

    name: str
    length: int
    queries: list[str]
    docs: list[str]
    gold: list[int]
    depths: list[float] = field(default_factory=list)
    needles: list[str] = field(default_factory=list)


def _filler_words(n_words: int) -> list[str]:
    f = FILLER.split()
    reps = n_words // len(f) + 2
    return (f * reps)[: n_words + len(f)]


def generate_passkey(lengths: Sequence[int] = DEFAULT_LENGTHS, num_queries: int = 50, num_docs: int = 100,
                     seed: int = 0, tokenizer=None, passage_prefix: str = "passage: ") -> list[SyntheticTask]:
    """LongEmbed personalized passkey retrieval, one SyntheticTask per length (deterministic in `seed`)."""
    _check_sizes(num_queries, num_docs)
    counter = TokenCounter(tokenizer)
    reserve = counter.reserve(passage_prefix)
    tasks = []
    for length in lengths:
        rng = random.Random(f"passkey:{seed}:{length}")
        names = sample_full_names(rng, num_docs)
        keys = [rng.randint(10000, 99999) for _ in range(num_docs)]
        haystack = _filler_words(length)  # >= 1 word per token: always enough
        cum = list(itertools.accumulate(counter(w) for w in haystack)) if tokenizer is not None else None
        docs, depths, needles = [], [], []
        for name, key in zip(names, keys):
            needle = PASSKEY_NEEDLE.format(name=name, N=key)
            text, depth = build_document(haystack, needle, length, rng, counter, reserve, cum)
            docs.append(text), depths.append(depth), needles.append(needle)
        queries = [PASSKEY_QUERY.format(name=n) for n in names[:num_queries]]
        tasks.append(SyntheticTask("passkey", length, queries, docs, list(range(num_queries)), depths, needles))
    return tasks


def _check_sizes(num_queries: int, num_docs: int) -> None:
    if num_queries < 1 or num_docs < num_queries:
        raise InputError(f"need 1 <= num_queries <= num_docs, got num_queries={num_queries} num_docs={num_docs}")


def _texts_by_id(path: Path, what: str) -> dict[str, str]:
    """{_id: text} of a BEIR-style JSONL file (the shared BEIR reader: bad lines are errors naming file:line)."""
    objs, bads = load_objects(path, what)
    if bads:
        raise InputError(bads[0].message())
    out = {}
    for i, (obj, where) in objs.items():
        if not isinstance(obj.get("text"), str):
            raise InputError(f"{where}: {what} _id {i!r} has no string 'text'")
        out[i] = obj["text"]
    return out


def generate_needle(msmarco_dir: str | Path, pg_dir: str | Path, lengths: Sequence[int] = DEFAULT_LENGTHS,
                    num_queries: int = 50, num_docs: int = 100, seed: int = 0, tokenizer=None,
                    passage_prefix: str = "passage: ", split: str = "test") -> list[SyntheticTask]:
    """Real-data needle retrieval: MS MARCO needles (grade >= 2) in Paul Graham essay haystacks.

    Needles longer than floor(0.75 * min(lengths) / 2) words are not used (counted in the log), so every
    needle fits every length with at least half of the document being haystack. When fewer than
    `num_queries` queries have a usable needle, all usable ones are taken (logged)."""
    _check_sizes(num_queries, num_docs)
    msmarco_dir, pg_dir = Path(msmarco_dir), Path(pg_dir)
    corpus = _texts_by_id(msmarco_dir / "corpus.jsonl", "corpus")
    queries = _texts_by_id(msmarco_dir / "queries.jsonl", "query")
    qrels = read_qrels(msmarco_dir / "qrels" / f"{split}.tsv")
    pg = [{"text": t} for t in _texts_by_id(pg_dir / "corpus.jsonl", "corpus").values()]
    pg_words = [w for r in pg for w in r["text"].split()]
    # essay chunk starts (word offsets) to begin haystacks at
    starts, off = [], 0
    for r in pg:
        starts.append(off)
        off += len(r["text"].split())
    max_needle_words = int(WORDS_PER_TOKEN * min(lengths) / 2)

    rng = random.Random(f"needle:{seed}")
    candidates, too_long = [], 0
    for qid in sorted(qrels):
        if qid not in queries:
            continue
        good = sorted(d for d, g in qrels[qid].items() if g >= 2 and d in corpus)
        fits = [d for d in good if len(corpus[d].split()) <= max_needle_words]
        too_long += len(good) - len(fits)
        if fits:
            candidates.append((qid, rng.choice(fits)))
    rng.shuffle(candidates)
    used_needles: set[str] = set()
    chosen = []
    for qid, did in candidates:
        if did not in used_needles and len(chosen) < num_queries:
            chosen.append((qid, did))
            used_needles.add(did)
    if not chosen:
        raise InputError(f"needle: no query in {msmarco_dir} has a grade >= 2 passage of <= {max_needle_words} words")
    if len(chosen) < num_queries:
        logger.info("needle: %d queries have a usable grade>=2 needle (asked for %d)", len(chosen), num_queries)
    relevant_any = {d for q, _ in chosen for d, g in qrels[q].items() if g >= 1}
    pool = sorted(d for d, t in corpus.items() if d not in relevant_any and len(t.split()) <= max_needle_words)
    n_distract = num_docs - len(chosen)
    if n_distract > len(pool):
        raise InputError(f"needle: only {len(pool)} distractor passages for --num-docs {num_docs}")
    distractors = rng.sample(pool, n_distract)
    needle_ids = [d for _, d in chosen] + distractors
    logger.info("needle: %d queries, %d candidates; %d grade>=2 passages skipped as longer than %d words",
                len(chosen), len(needle_ids), too_long, max_needle_words)

    counter = TokenCounter(tokenizer)
    reserve = counter.reserve(passage_prefix)
    tasks = []
    if len(pg_words) < max(lengths):
        raise InputError(f"needle: {pg_dir / 'corpus.jsonl'} has {len(pg_words)} words, too few for length {max(lengths)}")
    pg_counts = None
    if tokenizer is not None:
        counter.prime(pg_words)
        pg_counts = [counter.cache[w] for w in pg_words]
    for length in lengths:
        lrng = random.Random(f"needle:{seed}:{length}")
        docs, depths = [], []
        for did in needle_ids:
            s = lrng.choice(starts)  # the haystack starts at an essay chunk and wraps around the corpus
            hay = pg_words[s : s + length] + pg_words[: max(0, s + length - len(pg_words))]
            cum = None
            if pg_counts is not None:
                cum = list(itertools.accumulate(pg_counts[s : s + length] + pg_counts[: max(0, s + length - len(pg_words))]))
            text, depth = build_document(hay, corpus[did], length, lrng, counter, reserve, cum)
            docs.append(text), depths.append(depth)
        tasks.append(SyntheticTask("needle", length, [queries[q] for q, _ in chosen], docs, list(range(len(chosen))),
                                   depths, [corpus[d] for d in needle_ids]))
    return tasks


# ----------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------


def evaluate_tasks(model, tasks: Sequence[SyntheticTask], method: str = "none", *, query_prefix: str = "query: ",
                   passage_prefix: str = "passage: ", batch_size: int = 8, max_tokens: Optional[int] = 16384,
                   max_length: Optional[int] = None, device=None, show_progress_bar: bool = True,
                   tokenizer=None, cache: Optional[dict] = None) -> dict:
    """Acc@1 per length and the average over lengths for one method. Documents are encoded at their own
    length (no truncation) unless max_length is given.

    cache: a dict shared across calls for the same model and tasks; a (task, length) whose method preset is
    one already evaluated (e.g. every method at lengths <= the trained length, where none applies) is reused
    instead of encoded again."""
    per_len = {}
    for task in tasks:
        t0 = time.perf_counter()
        preset = method_preset(method, task.length, model.config)
        key = (task.name, task.length, id(task), json.dumps(preset, sort_keys=True, default=str))
        if cache is not None and key in cache:
            per_len[str(task.length)] = cache[key]
            logger.info("%s %s @%d: Acc@1 %.3f (same settings as an earlier method: reused)", task.name, method,
                        task.length, cache[key])
            continue
        with long_context(model, method, task.length) as enc_kw:
            ml_doc = max_length or task.length + 64  # docs are <= length tokens by construction
            q = model.encode(task.queries, tokenizer, prefix=query_prefix, batch_size=batch_size, device=device)
            d = model.encode(task.docs, tokenizer, prefix=passage_prefix, batch_size=batch_size, max_length=ml_doc,
                             max_tokens=max_tokens, device=device, show_progress_bar=show_progress_bar, **enc_kw)
        acc = accuracy_at_1(q @ d.T, task.gold)
        per_len[str(task.length)] = acc
        if cache is not None:
            cache[key] = acc
        logger.info("%s %s @%d: Acc@1 %.3f (%.1fs)", task.name, method, task.length, acc, time.perf_counter() - t0)
    return {"acc@1": per_len, "acc@1_avg": sum(per_len.values()) / len(per_len)}


def parse_seeds(spec: str) -> list[int]:
    """--seed: one seed or a comma-separated list of distinct seeds ("0,1,2,3,4")."""
    try:
        seeds = [int(x) for x in spec.split(",")]
    except ValueError:
        raise InputError(f"--seed {spec!r}: expected an integer or a comma-separated list of integers") from None
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seed {spec!r}: a seed is listed twice")
    return seeds


def mean_over_seeds(per_seed: dict[int, dict]) -> dict:
    """The metrics of several seeds (each evaluate_tasks' {"acc@1": {length: acc}, "acc@1_avg": avg}) as one:
    Acc@1 per length averaged over the seeds, their average over lengths, and every seed's own figures."""
    first = next(iter(per_seed.values()))
    per_len = {n: sum(m["acc@1"][n] for m in per_seed.values()) / len(per_seed) for n in first["acc@1"]}
    out = {"acc@1": per_len, "acc@1_avg": sum(per_len.values()) / len(per_len)}
    if len(per_seed) > 1:
        out["acc@1_per_seed"] = {str(s): m["acc@1"] for s, m in per_seed.items()}
    return out


def parse_lengths(spec: Optional[str]) -> list[int]:
    """--lengths: None (not given) is the default sweep; anything given, the empty string included, must list
    lengths (an empty value never silently means the whole 32k sweep)."""
    if spec is None:
        return list(DEFAULT_LENGTHS)
    try:
        out = [int(x) for x in spec.replace(",", " ").split()]
    except ValueError:
        raise InputError(f"--lengths {spec!r}: expected integers like 256,512,1024") from None
    if not out:
        raise InputError(f"--lengths {spec!r}: no lengths given; list them like 256,512,1024 (or leave --lengths "
                         "out for the default sweep)")
    if any(n < 32 for n in out):
        raise InputError(f"--lengths {spec!r}: every length must be >= 32 tokens")
    return out


def _main(task_name: str, argv: Optional[list[str]]) -> int:
    ap = argparse.ArgumentParser(prog=f"ropebert eval {task_name}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="exported ropebert dir, RoPE BERT dir, APE BERT dir, or a Hub id org/name (huggingface_hub cache)")
    ap.add_argument("--method", action="append", default=None, choices=METHODS,
                    help="context-extension method (repeatable; default none)")
    ap.add_argument("--lengths", default=None, help="comma-separated token lengths (default 256..32768)")
    ap.add_argument("--num-queries", type=int, default=50)
    ap.add_argument("--num-docs", type=int, default=100)
    ap.add_argument("--seed", default="0",
                    help="the seed the documents are drawn from (default 0); a comma-separated list (0,1,2,3,4) "
                         "evaluates every seed on the same model and reports Acc@1 averaged over them beside each "
                         "seed's own: at a few dozen queries one seed's draw of needle depths moves a length by "
                         "several points")
    ap.add_argument("--max-length", type=int, default=None,
                    help="truncate documents to this many tokens (default: none, documents are fed whole)")
    ap.add_argument("--baseline", action="append", default=[], metavar="st:DIR",
                    help="also evaluate a sentence-transformers model (e.g. the APE parent) on the same documents, "
                         "truncated to its position range (at most 512 tokens: an APE model's range); repeatable")
    if task_name == "needle":
        ap.add_argument("--msmarco", default="../shared/data/msmarco", help="BEIR MS MARCO dir (needles, queries)")
        ap.add_argument("--pg", default="../shared/data/pg", help="dir with the Paul Graham corpus.jsonl (haystack)")
    add_encode_args(ap)
    ap.set_defaults(batch_size=8)
    args = ap.parse_args(argv)
    methods = args.method or ["none"]
    lengths = parse_lengths(args.lengths)
    seeds = parse_seeds(args.seed)
    t0 = time.perf_counter()
    model = load_source(args.model).eval()
    if args.device is None and torch.cuda.is_available():
        args.device = "cuda"
    if args.device:
        model.to(args.device)
    for m in methods:  # fail before generating anything when a method is not implemented by this model
        check_method_supported(model, m, max(lengths))
    tok = model.tokenizer
    if task_name == "passkey":
        by_seed = {s: generate_passkey(lengths, args.num_queries, args.num_docs, s, tok, args.passage_prefix)
                   for s in seeds}
        data = "generated: LongEmbed personalized passkey"
    else:
        by_seed = {s: generate_needle(args.msmarco, args.pg, lengths, args.num_queries, args.num_docs, s, tok,
                                      args.passage_prefix) for s in seeds}
        data = f"generated: needles from {args.msmarco} (grade>=2) in haystacks from {args.pg}"
    tasks = by_seed[seeds[0]]
    results, cache = [], {}
    for m in methods:
        t1 = time.perf_counter()
        r = mean_over_seeds({s: evaluate_tasks(
            model, ts, m, query_prefix=args.query_prefix, passage_prefix=args.passage_prefix,
            batch_size=args.batch_size, max_tokens=args.max_tokens, max_length=args.max_length, device=args.device,
            show_progress_bar=not args.no_progress, cache=cache) for s, ts in by_seed.items()})
        presets = {}
        for n in lengths:  # what the method set at each length: config keys and encode options together
            cfg_updates, enc_kw = method_preset(m, n, model.config)
            presets[str(n)] = {**cfg_updates, **enc_kw}
        results.append({"method": m, "metrics": r, "wall_time_s": round(time.perf_counter() - t1, 3),
                        "presets": presets})
    for spec in args.baseline:
        if not spec.startswith("st:"):
            raise InputError(f"--baseline {spec!r}: expected st:DIR (a sentence-transformers model)")
        t1 = time.perf_counter()
        enc = SentenceTransformerEncoder(spec[3:], EncodeSettings(batch_size=args.batch_size, device=args.device,
                                                                  show_progress_bar=not args.no_progress))
        # the parent's own position range (an APE BERT: max_position_embeddings, at most 512), not its shorter
        # sentence-transformers default max_seq_length
        limit = min(512, int(getattr(enc.model[0].auto_model.config, "max_position_embeddings", 512) or 512))
        per_seed = {}
        for s, ts in by_seed.items():
            per_len = {}
            for task in ts:
                q = enc.encode(task.queries, "query", max_length=limit)
                d = enc.encode(task.docs, "passage", max_length=limit)
                per_len[str(task.length)] = accuracy_at_1(q @ d.T, task.gold)
            per_seed[s] = {"acc@1": per_len}
        label = f"{short_path(spec[3:])} (truncated at {limit})"
        metrics = mean_over_seeds(per_seed)
        results.append({"method": label, "baseline": spec, "max_seq_length": limit, "metrics": metrics,
                        "wall_time_s": round(time.perf_counter() - t1, 3)})
        logger.info("%s %s: %s", task_name, label, metrics["acc@1"])
    out = {
        "task": task_name,
        "model": args.model,
        "data": data,
        "settings": {"lengths": lengths, "num_queries": len(tasks[0].queries), "num_docs": len(tasks[0].docs),
                     "seed": seeds[0] if len(seeds) == 1 else seeds, "methods": methods,
                     "query_prefix": args.query_prefix, "passage_prefix": args.passage_prefix, "max_length": args.max_length,
                     "batch_size": args.batch_size, "max_tokens": args.max_tokens, "device": args.device,
                     "words_per_token": WORDS_PER_TOKEN},
        "doc_tokens_mean": {str(t.length): _mean_tokens(tok, t, args.passage_prefix) for t in tasks},
        "metrics": results[0]["metrics"],
        "results": results,
        "wall_time_s": round(time.perf_counter() - t0, 3),
    }
    header = ["method"] + [length_label(n) for n in lengths] + ["avg"]
    rows = [[r["method"]] + [f"{100 * r['metrics']['acc@1'][str(n)]:.1f}" for n in lengths]
            + [f"{100 * r['metrics']['acc@1_avg']:.1f}"] for r in results]
    over = "" if len(seeds) == 1 else f", mean over seeds {','.join(map(str, seeds))}"
    print(f"{task_name} Acc@1 (%), model={args.model}, {len(tasks[0].queries)} queries x {len(tasks[0].docs)} docs "
          f"per length{over}")
    print(markdown_table(header, rows))
    if len(seeds) > 1:
        seed_header = ["method", "seed"] + [length_label(n) for n in lengths]
        seed_rows = [[r["method"], str(s)] + [f"{100 * per_len[str(n)]:.1f}" for n in lengths]
                     for r in results for s, per_len in r["metrics"]["acc@1_per_seed"].items()]
        print(f"\n{task_name} Acc@1 (%) of each seed")
        print(markdown_table(seed_header, seed_rows))
    if args.output:
        write_json(out, args.output)
    if args.plot:
        acc = [[r["metrics"]["acc@1"][str(n)] for n in lengths] for r in results]
        accuracy_heatmap([r["method"] for r in results], lengths, acc, args.plot, title=f"{task_name} Acc@1 (%) — {'/'.join(Path(args.model).parts[-2:])}")
        print(f"wrote {args.plot}")
    return 0


def _mean_tokens(tok, task: SyntheticTask, prefix: str) -> float:
    if tok is None:
        return float("nan")
    sample = task.docs[:8]
    enc = tok([prefix + d for d in sample], add_special_tokens=True, verbose=False)["input_ids"]
    return round(sum(map(len, enc)) / len(enc), 1)


def passkey_main(argv: Optional[list[str]] = None) -> int:
    return _main("passkey", argv)


def needle_main(argv: Optional[list[str]] = None) -> int:
    return _main("needle", argv)
