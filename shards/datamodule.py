# Copyright ropebert contributors. Apache-2.0.
"""ShardDataModule: exactly-once, resumable streaming of ropebert shards into Lightning.

Every rank reads the slots of the deterministic plan (shards/plan.py) in its DataLoader workers, tokenises
there (fast tokenizer, dynamic padding), and yields ready batches. The cursor {epoch, batches_done} and a
fingerprint of the plan inputs live in `state_dict()`, which Lightning stores in every checkpoint; on
`trainer.fit(..., ckpt_path=...)` the loader starts at the first batch not yet consumed by seeking into the
right shard of every worker's slot (nothing is replayed). `len(train_dataloader())` is the epoch length
(batches per rank); a resumed epoch yields the remaining len - batches_done batches, which is what Lightning's
restored progress counter expects.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ropebert.errors import InputError

from .format import load_manifest, manifest_hash, read_shard, shard_path
from .hashing import text_hashes
from .mixture import (
    Mixture,
    MixturePlan,
    is_mixture_file,
    load_mixture,
    make_mixture_plan,
    mixture_diff,
    mixture_hash,
    step_segments,
    within_pass_shard_order,
)
from .plan import EpochPlan, consumed_by_worker, logical_worker, make_plan, slot_segments, within_shard_order

logger = logging.getLogger(__name__)

# Lightning warns that an IterableDataset with a length may yield duplicates with several workers; here every
# worker reads its own slot of the plan and the length is exact.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


def load_fast_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=False)  # tokenizer files only: never prompt for model code
    if not getattr(tok, "is_fast", False):
        raise InputError(f"tokenizer {path!r} has no fast (Rust) implementation; ShardDataModule needs one")
    return tok


def this_worker(stream: str, planned: int) -> int:
    """This DataLoader worker's id (0 in the main process); the stream's plan must be for this many workers."""
    info = get_worker_info()
    n_phys = info.num_workers if info is not None else 1
    if n_phys != planned:
        raise RuntimeError(f"{stream} planned for {planned} workers but runs in {n_phys}")
    return info.id if info is not None else 0


class BatchCollator:
    """List of shard samples -> a train batch dict (see ShardDataModule). Runs inside DataLoader workers."""

    def __init__(self, tokenizer: str, kind: str, num_negatives: int, max_query_length: int,
                 max_passage_length: int, query_prefix: str, passage_prefix: str):
        self.tokenizer_path = tokenizer
        self.kind, self.num_negatives = kind, num_negatives
        self.max_query_length, self.max_passage_length = max_query_length, max_passage_length
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
        self._tok = None
        self._backends: dict = {}

    def __getstate__(self):  # workers load their own tokenizer
        d = dict(self.__dict__)
        d["_tok"], d["_backends"] = None, {}
        return d

    @property
    def tok(self):
        if self._tok is None:
            self._tok = load_fast_tokenizer(self.tokenizer_path)
        return self._tok

    def _backend(self, max_length: int):
        """A private copy of the Rust tokenizer with truncation to max_length and pad-to-longest enabled."""
        if max_length not in self._backends:
            from tokenizers import Tokenizer

            bt = Tokenizer.from_str(self.tok.backend_tokenizer.to_str())
            bt.enable_truncation(max_length=max_length)
            bt.enable_padding(pad_id=self.tok.pad_token_id, pad_token=self.tok.pad_token)
            self._backends[max_length] = bt
        return self._backends[max_length]

    def _encode(self, texts: list[str], prefix: str, max_length: int) -> dict:
        # the Rust tokenizer directly: the same ids as tokenizer(..., padding="longest", truncation=True), without
        # transformers' slow list -> tensor conversion
        encs = self._backend(max_length).encode_batch([prefix + t for t in texts], add_special_tokens=True)
        ids = torch.from_numpy(np.array([e.ids for e in encs], dtype=np.int64))  # (B, L)
        mask = torch.from_numpy(np.array([e.attention_mask for e in encs], dtype=np.int64))  # (B, L)
        return {"input_ids": ids, "attention_mask": mask}

    def __call__(self, samples: list[tuple[str, dict, str]]) -> dict:
        keys = [k for k, _, _ in samples]
        batch = {
            "keys": keys,
            "query": self._encode([s["query"] for _, s, _ in samples], self.query_prefix, self.max_query_length),
            "passage": self._encode([s["positive"] for _, s, _ in samples], self.passage_prefix, self.max_passage_length),
            "hashes": {"query": text_hashes(s["query"] for _, s, _ in samples),
                       "passage": text_hashes(s["positive"] for _, s, _ in samples)},
        }
        if self.kind == "hard_negatives":
            K = self.num_negatives
            negs = []
            for key, s, where in samples:
                n = s.get("negatives")
                if not isinstance(n, list) or len(n) < K:
                    raise InputError(f"{where}:{key}: sample has {len(n) if isinstance(n, list) else 0} negatives, "
                                     f"num_negatives={K}")
                negs += n[:K]
            batch["negatives"] = self._encode(negs, self.passage_prefix, self.max_passage_length)  # (B*K, Ln)
            batch["hashes"]["negatives"] = text_hashes(negs).view(len(samples), K)
            if all(isinstance(s.get("scores"), list) and len(s["scores"]) >= 1 + K for _, s, _ in samples):
                batch["teacher_scores"] = torch.tensor([s["scores"][: 1 + K] for _, s, _ in samples],
                                                       dtype=torch.float32)  # (B, 1+K)
                bad = (~torch.isfinite(batch["teacher_scores"])).any(-1).nonzero().flatten().tolist()
                if bad:
                    key, _, where = samples[bad[0]]
                    raise InputError(f"{where}:{key}: non-finite teacher scores {samples[bad[0]][1]['scores'][: 1 + K]}"
                                     " (rebuild the shards: `ropebert shards build` refuses them)")
        return batch


class ShardStream(IterableDataset):
    """One rank's stream of train batches for (epoch, start_batch); each DataLoader worker reads its slot."""

    def __init__(self, shard_dir: str, manifest: dict, collate: BatchCollator, *, seed: int, world_size: int,
                 rank: int, workers: int, batch_size: int):
        self.shard_dir, self.collate = shard_dir, collate
        self.urls = [e["url"] for e in manifest["shards"]]
        self.sizes = [e["samples"] for e in manifest["shards"]]
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.workers, self.batch_size = workers, batch_size
        self.epoch = 0
        self.start_batch = 0

    def plan(self, epoch: Optional[int] = None) -> EpochPlan:
        return make_plan(self.sizes, seed=self.seed, epoch=self.epoch if epoch is None else epoch,
                         world_size=self.world_size, workers=self.workers, batch_size=self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        physical = this_worker(type(self).__name__, self.workers)
        plan = self.plan()
        lw = logical_worker(physical, self.workers, self.start_batch)
        done = consumed_by_worker(lw, self.workers, self.start_batch)
        buf: list = []
        for idx, a, b in slot_segments(plan, self.rank * self.workers + lw, done):
            path = shard_path(self.shard_dir, {"url": self.urls[idx]})
            samples = read_shard(path)  # whole shard, sequential read
            if len(samples) != self.sizes[idx]:
                raise InputError(f"{path}: holds {len(samples)} samples, manifest says {self.sizes[idx]} "
                                 f"(run `ropebert shards verify {self.shard_dir}`)")
            order = within_shard_order(plan, idx)
            for j in order[a:b]:
                key, sample = samples[j]
                buf.append((key, sample, self.urls[idx]))
                if len(buf) == self.batch_size:
                    yield self.collate(buf)
                    buf = []
        assert not buf, "plan slots hold whole batches"


class MixtureStream(IterableDataset):
    """One rank's stream of homogeneous mixture batches (shards/mixture.py) for (epoch, start_batch): step t of
    the epoch is the rank's t-th batch; DataLoader worker w of n reads steps start + w, start + w + n, ...,
    which torch's round-robin hands out in step order."""

    def __init__(self, mixture: Mixture, collate: BatchCollator, *, seed: int, world_size: int, rank: int,
                 workers: int, batch_size: int):
        self.mixture, self.collate = mixture, collate
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.workers, self.batch_size = workers, batch_size
        self.epoch = 0
        self.start_batch = 0
        self._plans: dict = {}

    def plan(self, epoch: Optional[int] = None) -> MixturePlan:
        e = self.epoch if epoch is None else epoch
        if e not in self._plans:
            self._plans = {k: v for k, v in self._plans.items() if k >= e - 1}
            self._plans[e] = make_mixture_plan(self.mixture, seed=self.seed, epoch=e, world_size=self.world_size,
                                               batch_size=self.batch_size)
        return self._plans[e]

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_plans"] = {self.epoch: self._plans[self.epoch]} if self.epoch in self._plans else {}
        return d

    def __iter__(self) -> Iterator[dict]:
        physical = this_worker(type(self).__name__, self.workers)
        plan = self.plan()
        cache: dict = {}  # source -> (shard index, samples): the last shard read of each source
        for t in range(self.start_batch + physical, plan.batches_per_rank, self.workers):
            src, pass_, segs = step_segments(plan, t, self.rank)
            source = self.mixture.sources[src]
            buf = []
            for idx, a, b in segs:
                url = source.manifest["shards"][idx]["url"]
                if cache.get(src, (None,))[0] != idx:
                    path = shard_path(source.path, {"url": url})
                    samples = read_shard(path)
                    if len(samples) != plan.shard_sizes[src][idx]:
                        raise InputError(f"{path}: holds {len(samples)} samples, manifest says "
                                         f"{plan.shard_sizes[src][idx]} (run `ropebert shards verify {source.path}`)")
                    cache[src] = (idx, samples)
                samples = cache[src][1]
                for j in within_pass_shard_order(plan, src, pass_, idx)[a:b]:
                    key, sample = samples[j]
                    buf.append((key, sample, f"{source.name}:{url}"))
            batch = self.collate(buf)
            batch["source"], batch["source_pass"] = source.name, pass_
            yield batch


def _worker_context(method: str):
    """The multiprocessing context for DataLoader workers. The fork server imports this module (torch, the
    tokenizer library) once when it starts, so the workers it forks do not import them again."""
    ctx = torch.multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([__name__])  # takes effect when the server starts (first use)
    return ctx


class ShardDataLoader(DataLoader):
    """DataLoader whose len() is the epoch length (batches per rank) and whose iteration starts at the
    DataModule's cursor."""

    def __init__(self, datamodule: "ShardDataModule", dataset, **kw):
        super().__init__(dataset, batch_size=None, **kw)
        self._dm = datamodule

    def __len__(self) -> int:
        return self._dm.batches_per_rank

    # Lightning treats loaders with state_dict/load_state_dict as resumable (and warns otherwise). The cursor
    # itself travels in the DataModule's state (restored before the loader is built); this copy is informative.
    def state_dict(self) -> dict:
        return {"cursor": self._dm.cursor()}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        epoch, start = self._dm._begin_epoch()
        self.dataset.epoch, self.dataset.start_batch = epoch, start
        return self._dm._track(epoch, start, super().__iter__())


class _FixedLenLoader(DataLoader):
    """Validation loader: the plan of epoch 0 (fixed order), len = its batches per rank."""

    def __len__(self) -> int:
        return self.dataset.plan(0).batches_per_rank


class ShardDataModule(L.LightningDataModule):
    """Streams ropebert shards (manifest.json + tar shards) with an exactly-once, resumable plan.

    Train batches are dicts:
        keys: list[str] (B sample keys)
        query / passage: {"input_ids": LongTensor (B, L), "attention_mask": LongTensor (B, L)}, padded to the
            longest in the batch
        source / source_pass (a homogeneous mixture): the name of the batch's source and its pass this epoch
            (0 = first reading; > 0 = a repeat with a fresh shuffle)
        negatives (kind="hard_negatives"): same, (B*K, Ln); rows i*K..(i+1)*K-1 belong to query i
        teacher_scores (when the shards carry scores): FloatTensor (B, 1+K), positive first
        hashes: {"query": LongTensor (B,), "passage": LongTensor (B,), "negatives": LongTensor (B, K) (hard
            negatives only)}: 64-bit hashes of the normalised texts, without prefixes (shards/hashing.py); the
            loss uses them to drop in-batch duplicates from the negatives
    """

    def __init__(
        self,
        train_dir: str,
        tokenizer: Optional[str] = None,
        batch_size: int = 32,
        kind: Optional[Literal["pairs", "hard_negatives"]] = None,
        num_negatives: int = 7,
        max_query_length: int = 64,
        max_passage_length: int = 512,
        num_workers: int = 2,
        seed: int = 0,
        query_prefix: str = "query: ",
        passage_prefix: str = "passage: ",
        sample_log: Optional[str] = None,
        allow_replan: bool = False,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
        val_dir: Optional[str] = None,
        worker_start: Literal["fork", "forkserver", "spawn"] = "forkserver",
    ):
        """
        Args:
            train_dir: directory with manifest.json and the tar shards (`ropebert shards build` / `ropebert mine`),
                or a mixture file (`.yaml`: several shard directories with optional weight and name, `sampling`
                and `batch_source`; see shards/mixture.py). Homogeneous mixtures draw every global batch from one
                source; an epoch is as many steps as the sources hold global batches. The mixture is part of the
                resume fingerprint.
            tokenizer: directory of a Hugging Face tokenizer with a fast implementation. None (the default under
                `ropebert fit`): the tokenizer of model.init_from, which every ropebert checkpoint carries.
            batch_size: samples per batch on each rank.
            kind: "pairs" (query, positive; in-batch negatives) or "hard_negatives" (stage 2: + K mined negatives,
                needs hard_negatives shards). None (default): the manifest's kind, so a config states the stage
                once (model.stage) and the data says what it is.
            num_negatives: K, negatives per query for kind="hard_negatives".
            max_query_length: truncation length of queries in tokens (prefix and special tokens included).
            max_passage_length: truncation length of positives and negatives in tokens.
            num_workers: DataLoader worker processes per rank (0 = read in the main process, planned as 1 slot).
                Part of the plan: resuming with another value is refused unless allow_replan.
            seed: seed of the shard order and the within-shard shuffles (epoch e uses (seed, e)).
            query_prefix: prepended to every query before tokenisation.
            passage_prefix: prepended to every positive and negative.
            sample_log: directory; when set, each global rank appends one JSON line per consumed step,
                {"epoch", "batch", "keys"} (+ "source" with a homogeneous mixture), to rank-<r>.jsonl.
            allow_replan: on resume with another world size / workers / batch size / seed / manifest, continue
                the saved epoch at the same fraction of its batches under the new plan (not exactly-once across
                the change) instead of raising.
            pin_memory: DataLoader pin_memory (for CUDA).
            prefetch_factor: batches prefetched per worker (num_workers > 0).
            val_dir: optional shard directory for `val_dataloader()`: the same kind of batches in a fixed order
                (the plan of epoch 0 with this seed), the same number per rank; no cursor, no sample log.
            worker_start: how worker processes start (num_workers > 0). "forkserver" (default) forks them from a
                clean server process; "fork" copies the training process, whose other threads (the process
                group's, the launcher's) may hold a lock at that instant and leave the worker deadlocked, which
                stalls every rank; "spawn" starts a fresh interpreter per worker (slowest). Workers restart every
                epoch. Not part of the plan.
        """
        super().__init__()
        if kind not in (None, "pairs", "hard_negatives"):
            raise InputError(f"kind must be 'pairs' or 'hard_negatives' (or null: the manifest's), got {kind!r}")
        for name, v in (("batch_size", batch_size), ("max_query_length", max_query_length),
                        ("max_passage_length", max_passage_length)):
            if v < 1:
                raise InputError(f"{name} must be >= 1, got {v}")
        if num_negatives < 1:
            raise InputError(f"num_negatives must be >= 1, got {num_negatives}")
        if num_workers < 0:
            raise InputError(f"num_workers must be >= 0, got {num_workers}")
        if worker_start not in ("fork", "forkserver", "spawn"):
            raise InputError(f"worker_start must be 'fork', 'forkserver' or 'spawn', got {worker_start!r}")
        self.train_dir, self.tokenizer = str(train_dir), (None if tokenizer is None else str(tokenizer))
        self.batch_size, self.kind, self.num_negatives = batch_size, kind, num_negatives
        self.max_query_length, self.max_passage_length = max_query_length, max_passage_length
        self.num_workers, self.seed = num_workers, seed
        self.query_prefix, self.passage_prefix = query_prefix, passage_prefix
        self.sample_log, self.allow_replan = sample_log, allow_replan
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.val_dir = str(val_dir) if val_dir else None
        self.worker_start = worker_start
        self._val_stream: Optional[ShardStream] = None
        self.world_size, self.rank = 1, 0
        self.manifest: Optional[dict] = None
        self.mixture: Optional[Mixture] = None
        self._pending: Optional[tuple[int, int]] = None  # cursor restored from a checkpoint
        self._epoch, self._yielded, self._next_epoch = 0, 0, 0
        self._log_pending: list[tuple[int, int, list, Optional[str]]] = []
        self._log_file = None
        self._stream: Optional[ShardStream] = None

    # -- setup ----------------------------------------------------------------------------------------------

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    def _dist(self) -> tuple[int, int]:
        t = self._trainer_or_none()
        if t is not None:
            return int(t.world_size), int(t.global_rank)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    def setup(self, stage: Optional[str] = None) -> None:
        self.world_size, self.rank = self._dist()
        self.mixture = load_mixture(self.train_dir, self.kind) if is_mixture_file(self.train_dir) else None
        self.manifest = load_manifest(self.train_dir) if self.mixture is None else self._mixture_manifest()
        if self.kind is None:
            self.kind = self.manifest["kind"]
        if self.tokenizer is None:
            raise InputError("data.tokenizer is not set (under `ropebert fit` it defaults to the tokenizer of "
                             "model.init_from; outside it, pass a tokenizer directory)")
        if self.kind == "hard_negatives" and self.manifest["kind"] != "hard_negatives":
            raise InputError(f"{self.train_dir}: kind='hard_negatives' (stage 2) needs hard-negative shards, but "
                             f"the manifest kind is {self.manifest['kind']!r}; mine them with `ropebert mine`")
        collate = BatchCollator(self.tokenizer, self.kind, self.num_negatives, self.max_query_length,
                                self.max_passage_length, self.query_prefix, self.passage_prefix)
        collate.tok  # fail early (here, not in a worker) on a bad tokenizer path
        if self.mixture is not None and self.mixture.batch_source == "homogeneous":
            self._stream = MixtureStream(self.mixture, collate, seed=self.seed, world_size=self.world_size,
                                         rank=self.rank, workers=self.workers, batch_size=self.batch_size)
        else:  # a shard directory, or a mixed-batch mixture: its sources' shards as one shard set
            self._stream = ShardStream(self.train_dir if self.mixture is None else "/", self.manifest, collate,
                                       seed=self.seed, world_size=self.world_size, rank=self.rank,
                                       workers=self.workers, batch_size=self.batch_size)
        self._stream.plan(0)  # raises a clear error when the data is too small for the layout
        if self.val_dir:
            vm = load_manifest(self.val_dir)
            if self.kind == "hard_negatives" and vm["kind"] != "hard_negatives":
                raise InputError(f"{self.val_dir}: val_dir must hold hard-negative shards for kind='hard_negatives'")
            self._val_stream = ShardStream(self.val_dir, vm, collate, seed=self.seed, world_size=self.world_size,
                                           rank=self.rank, workers=self.workers, batch_size=self.batch_size)
            self._val_stream.plan(0)

    def _mixture_manifest(self) -> dict:
        """One manifest over every source's shards (absolute urls): the shard set of `batch_source: mixed`, and
        what the model reads (kind, score_kind) for both batch sources."""
        srcs = self.mixture.sources
        shards = [dict(e, url=str((Path(s.path) / e["url"]).resolve())) for s in srcs for e in s.manifest["shards"]]
        m = {"kind": self.mixture.kind, "shards": shards, "source": {"mixture": self.mixture.file}}
        kinds = {s.manifest.get("score_kind") for s in srcs}
        if len(kinds) == 1:
            m["score_kind"] = kinds.pop()
        return m

    def _require_setup(self):
        if self._stream is None:
            raise RuntimeError("ShardDataModule: call setup() first (Lightning does this for you)")
        return self._stream

    @property
    def batches_per_rank(self) -> int:
        return self._require_setup().plan(0).batches_per_rank

    def plan(self, epoch: int) -> "EpochPlan | MixturePlan":
        return self._require_setup().plan(epoch)

    def train_dataloader(self) -> ShardDataLoader:
        stream = self._require_setup()
        kw = self._loader_kwargs()
        if self.num_workers > 0:
            kw.update(persistent_workers=False)
        return ShardDataLoader(self, stream, **kw)

    def val_dataloader(self):
        if self._val_stream is None:
            return []  # Lightning skips validation
        return _FixedLenLoader(self._val_stream, batch_size=None, **self._loader_kwargs())

    def _loader_kwargs(self) -> dict[str, Any]:
        """The DataLoader settings shared by the train and validation loaders."""
        kw: dict[str, Any] = dict(num_workers=self.num_workers, pin_memory=self.pin_memory)
        if self.num_workers > 0:
            kw.update(prefetch_factor=self.prefetch_factor, multiprocessing_context=_worker_context(self.worker_start))
        return kw

    # -- cursor ---------------------------------------------------------------------------------------------

    def fingerprint(self) -> dict:
        self._require_setup()
        fp = {"world_size": self.world_size, "workers": self.workers, "batch_size": self.batch_size,
              "seed": self.seed, "manifest": manifest_hash(self.manifest)}
        if self.mixture is not None:
            fp["mixture"] = self.mixture.identity()
            fp["manifest"] = mixture_hash(fp["mixture"])
        return fp

    def _consumed(self) -> int:
        """Batches of the current epoch handed to the training step (Lightning's progress when fitting)."""
        t = self._trainer_or_none()
        if t is not None and getattr(t.state, "fn", None) == "fit":
            return int(t.fit_loop.epoch_loop.batch_progress.current.ready)
        return self._yielded

    def cursor(self) -> dict:
        return {"epoch": self._epoch, "batches_done": self._consumed()}

    def state_dict(self) -> dict:
        if self._stream is None:
            return {}
        self._flush_log(self._consumed())
        return {"cursor": self.cursor(), "fingerprint": self.fingerprint(),
                "batches_per_rank": self.batches_per_rank}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self._require_setup()
        try:
            epoch, done = int(state["cursor"]["epoch"]), int(state["cursor"]["batches_done"])
            saved = dict(state["fingerprint"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"ShardDataModule: malformed saved state {state!r}") from None
        now = self.fingerprint()
        diff = [f"{k}: checkpoint {saved.get(k)!r} != now {now[k]!r}" for k in now
                if saved.get(k) != now[k] and k != "mixture"]
        if saved.get("mixture") != now.get("mixture"):
            if saved.get("mixture") is None or now.get("mixture") is None:
                diff.append("mixture: the checkpoint read " + ("a mixture file" if saved.get("mixture") else
                                                               "one shard directory") + ", now "
                            + ("a mixture file" if now.get("mixture") else "one shard directory"))
            else:
                diff = [d for d in diff if not d.startswith("manifest:")] + mixture_diff(saved["mixture"],
                                                                                       now["mixture"])
        if diff:
            if not self.allow_replan:
                raise InputError(
                    "ShardDataModule: cannot resume exactly — the data plan changed since the checkpoint ("
                    + "; ".join(diff) + "). Resume with the same settings, or set allow_replan=True "
                    "(--data.allow_replan true) to continue the epoch at the same fraction under the new plan.")
            old_total = int(state.get("batches_per_rank") or 1)
            new_done = (done * self.batches_per_rank) // max(1, old_total)
            logger.warning("ShardDataModule: re-planning (%s); epoch %d continues at batch %d of %d instead of %d of %d",
                           "; ".join(diff), epoch, new_done, self.batches_per_rank, done, old_total)
            self._align_loop_progress(new_done - done)
            done = new_done
        if done >= self.batches_per_rank:
            epoch, done = epoch + 1, 0
        self._pending = (epoch, done)
        self._epoch, self._yielded, self._next_epoch = epoch, done, epoch

    def _align_loop_progress(self, delta: int) -> None:
        """After a re-plan the epoch continues at another batch index: move the batch counters of the checkpoint
        being restored by the same amount, so Lightning's progress (what the cursor of the next checkpoint and
        the sample log count from, and where Lightning ends the epoch) matches the batches actually used."""
        t = self._trainer_or_none()
        ckpt = getattr(getattr(t, "_checkpoint_connector", None), "_loaded_checkpoint", None) if t is not None else None
        try:
            current = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
        except (KeyError, TypeError):
            if t is not None and getattr(t.state, "fn", None) == "fit":
                logger.warning("ShardDataModule: re-plan without Lightning loop state in the checkpoint; the "
                               "progress counter may not match the re-planned cursor")
            return
        for k in ("ready", "started", "processed", "completed"):
            if k in current:
                current[k] = max(0, int(current[k]) + delta)

    def _begin_epoch(self) -> tuple[int, int]:
        t = self._trainer_or_none()
        limit = None  # without a trainer, every yielded batch was consumed
        if t is not None and getattr(t.state, "fn", None) == "fit" and t.num_training_batches != float("inf"):
            # Lightning ended the previous epoch after num_training_batches (limit_train_batches may cut it short;
            # a batch fetched ahead beyond that was never consumed)
            limit = int(t.num_training_batches)
        self._flush_log(limit, prev_upto=limit, drop_rest=True)  # self._epoch is still the previous epoch here
        if self._pending is not None:
            epoch, start = self._pending
            self._pending = None
        else:
            epoch = int(t.current_epoch) if t is not None and getattr(t.state, "fn", None) == "fit" else self._next_epoch
            start = 0
        self._epoch, self._yielded, self._next_epoch = epoch, start, epoch + 1
        if isinstance(self._stream, MixtureStream):
            plan = self._stream.plan(epoch)
            for name, r in plan.repeats.items():
                if r:
                    i = plan.names.index(name)
                    logger.warning("mixture epoch %d: source %r is drawn %d times but holds %d global batches: it "
                                   "repeats %d time(s), each with a fresh shuffle", epoch, name, plan.draws[name],
                                   plan.batches[i], r)
        return epoch, start

    def _track(self, epoch: int, start: int, it) -> Iterator[dict]:
        for i, batch in enumerate(it):
            if self.sample_log:
                self._log_pending.append((epoch, start + i, list(batch["keys"]), batch.get("source")))
            self._yielded = start + i + 1
            t = self._trainer_or_none()
            fitting = t is not None and getattr(t.state, "fn", None) == "fit"
            self._flush_log(self._consumed() if fitting else self._yielded)
            yield batch

    # -- sample log -----------------------------------------------------------------------------------------

    def _flush_log(self, upto: Optional[int], prev_upto: Optional[int] = None, drop_rest: bool = False) -> None:
        """Write log lines of consumed batches: this epoch's batches < upto (upto=None: all of them), earlier
        epochs' batches < prev_upto (None: all). drop_rest forgets the unwritten ones (fetched, never consumed)."""
        if not self.sample_log or not self._log_pending:
            return
        keep = []
        if self._log_file is None:
            Path(self.sample_log).mkdir(parents=True, exist_ok=True)
            self._log_file = open(Path(self.sample_log) / f"rank-{self.rank}.jsonl", "a", encoding="utf-8")
        for epoch, b, keys, source in self._log_pending:
            limit = upto if epoch == self._epoch else prev_upto
            if limit is None or b < limit:
                rec = {"epoch": epoch, "batch": b, "keys": keys}
                if source is not None:
                    rec["source"] = source
                self._log_file.write(json.dumps(rec) + "\n")
            elif not drop_rest:
                keep.append((epoch, b, keys, source))
        self._log_file.flush()
        self._log_pending = keep

    def teardown(self, stage: Optional[str] = None) -> None:
        self._flush_log(self._consumed())
        self._log_pending = []
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
