# Copyright ropebert contributors. Apache-2.0.
"""`ropebert score`: re-score stage-2 shards with a teacher, the scores stage 2 distils from.

    ropebert score data/stage2 --teacher RERANKER_OR_ENCODER_DIR --out data/stage2-scored

Each sample's 1 + K candidates (positive first, then its hard negatives) get the teacher's scores:
    * a sentence-transformers CrossEncoder directory (a re-ranker: an HF *ForSequenceClassification model with one
      label): its logits for (query, candidate) -> score_kind "logits" (E5 distils stage 2 from re-ranker scores);
    * any bi-encoder directory (an APE BERT / sentence-transformers model, or an exported ropebert model): cosine
      similarity of the pooled embeddings -> score_kind "cosine".
The output manifest records `score_kind` and `score_teacher` (path + content sha256); `ropebert fit` takes the
softmax temperature of the scores from score_kind unless model.teacher_temperature is set (cosine: 0.05, logits:
1.0). Texts reach the teacher without prefixes unless --query-prefix / --passage-prefix say otherwise (the APE
parent was trained without them), truncated to --max-length tokens (at most the teacher's position range). Output is
written aside and swapped in when complete (ropebert.io.OutputDir); the input is never modified.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional

import torch

from ropebert.errors import InputError
from ropebert.io import OutputDir
from ropebert.shards.format import MANIFEST, ShardWriter, iter_shard, load_manifest, shard_path, write_manifest

from ..train.teacher import Teacher, content_hash

SCORE_KINDS = ("logits", "cosine")


def is_cross_encoder(path: str | Path) -> bool:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return False
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    return any(str(a).endswith("ForSequenceClassification") for a in cfg.get("architectures") or [])


class CrossEncoderScorer:
    kind = "logits"

    def __init__(self, path: str, max_length: int, device: str):
        from sentence_transformers import CrossEncoder  # optional (the demo/eval extras)

        self.model = CrossEncoder(str(path), max_length=max_length, device=device, local_files_only=True)
        labels = getattr(self.model.model.config, "num_labels", 1)
        if labels != 1:
            raise InputError(f"--teacher {path}: a re-ranker must have one output label, this one has {labels}")

    def __call__(self, query: str, candidates: list[str]) -> list[float]:
        logits = self.model.predict([(query, c) for c in candidates], convert_to_numpy=True, show_progress_bar=False,
                                    activation_fn=torch.nn.Identity())
        return [float(x) for x in logits.reshape(-1)]


class BiEncoderScorer:
    kind = "cosine"

    def __init__(self, path: str, max_length: int, device: str, batch_size: int = 64):
        from transformers import AutoTokenizer

        self.teacher = Teacher(path).to(device)
        model_dir = Path(path)
        self.tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False) if self.teacher.kind == "hf" \
            else self.teacher.encoder.tokenizer
        limit = self.teacher.max_positions or max_length
        self.max_length, self.device, self.batch_size = min(max_length, limit), device, batch_size

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            b = self.tok(texts[i:i + self.batch_size], padding=True, truncation=True, max_length=self.max_length,
                         return_tensors="pt").to(self.device)
            out.append(self.teacher.pooled(b["input_ids"], b["attention_mask"]).float().cpu())
        return torch.cat(out)

    def __call__(self, query: str, candidates: list[str]) -> list[float]:
        e = self.embed([query] + candidates)
        return (e[1:] @ e[0]).tolist()


def make_scorer(path: str, max_length: int, device: str):
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--teacher {path!r} is not a directory")
    return CrossEncoderScorer(path, max_length, device) if is_cross_encoder(path) else \
        BiEncoderScorer(path, max_length, device)


def score_shards(src: str, out: str, teacher: str, *, query_prefix: str = "", passage_prefix: str = "",
                 max_length: int = 512, device: Optional[str] = None, overwrite: bool = False,
                 progress: bool = False) -> dict:
    manifest = load_manifest(src)
    if manifest["kind"] != "hard_negatives":
        raise InputError(f"{src}: `ropebert score` re-scores hard_negatives shards (1 positive + K negatives per "
                         f"query); this manifest's kind is {manifest['kind']!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorer = make_scorer(teacher, max_length, device)
    total = manifest["total_samples"]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="score", unit="query")
    with OutputDir(out, what="score", overwrite=overwrite, source=src,
                   owned=lambda d: _shard_dir_entries(d)) as tmp:
        writer = ShardWriter(tmp, maxcount=10**12)
        for entry in manifest["shards"]:
            for key, s in iter_shard(shard_path(src, entry)):
                cands = [s["positive"]] + list(s["negatives"])
                scores = scorer(query_prefix + s["query"], [passage_prefix + c for c in cands])
                bad = [x for x in scores if not math.isfinite(x)]
                if bad:
                    raise InputError(f"{src}:{key}: the teacher gave non-finite scores {bad[:3]}")
                writer.write(key, dict(s, scores=[round(x, 6) for x in scores]))
                if bar is not None:
                    bar.update(1)
            writer.finish_shard()
        shards = writer.close()
        source = {"format": "scored", "input": str(src), "input_source": manifest.get("source"),
                  "query_prefix": query_prefix, "passage_prefix": passage_prefix, "max_length": max_length}
        m = write_manifest(tmp, kind="hard_negatives", shards=shards, source=source, skipped=manifest.get("skipped"),
                           extra={"score_kind": scorer.kind,
                                  "score_teacher": {"path": str(teacher), "sha256": content_hash(teacher)}})
    if bar is not None:
        bar.close()
    return m


def _shard_dir_entries(d: Path) -> Optional[set]:
    """What a previous `ropebert score` (or any shard build) wrote: manifest.json and the shards it lists."""
    if not (d / MANIFEST).is_file():
        return None
    try:
        m = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        return {MANIFEST} | {e["url"] for e in m["shards"]}
    except (ValueError, KeyError, TypeError):
        return None


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="ropebert score", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="hard_negatives shard directory (`ropebert mine`)")
    ap.add_argument("--teacher", required=True, help="CrossEncoder (re-ranker) or bi-encoder directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--query-prefix", default="")
    ap.add_argument("--passage-prefix", default="")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--device", default=None)
    ap.add_argument("--overwrite", action="store_true", help="replace OUT when it is a shard directory (nothing else)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    m = score_shards(args.input, args.out, args.teacher, query_prefix=args.query_prefix,
                     passage_prefix=args.passage_prefix, max_length=args.max_length, device=args.device,
                     overwrite=args.overwrite, progress=not args.no_progress)
    print(f"scored {m['total_samples']} queries with {args.teacher} (score_kind {m['score_kind']}) -> {args.out}")
    return 0
