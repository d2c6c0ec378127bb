# Copyright ropebert contributors. Apache-2.0.
"""Mixtures: several shard directories trained as one, each global batch from one source.

A mixture file (YAML) is what `data.train_dir` names instead of a shard directory:

    sampling: temperature        # proportional | temperature | weights (default: weights when any source has a
    temperature: 2.0             #   weight, else proportional); temperature T: p_i ∝ n_i^(1/T)
    batch_source: homogeneous    # homogeneous | mixed (default: homogeneous for kind pairs, mixed otherwise)
    sources:
      - path: reddit/            # a shard directory (relative paths: from the mixture file's directory)
        name: reddit             # optional, default: the directory's name; unique
        weight: 2.0              # optional, > 0; only with sampling: weights (where it is then required)
      - path: stackexchange/

n_i is the number of samples of source i. Every source must have the same manifest `kind`.

Homogeneous batches (`make_mixture_plan`): with G = world_size * batch_size (one global batch), source i holds
Q_i = n_i // G whole global batches. **An epoch is E = sum_i Q_i steps**: as many global batches as the mixture
holds, so under proportional sampling an epoch reads every source about once. Step t's source comes from a
low-discrepancy weighted round-robin shuffled in blocks of 10 steps (`source_sequence`), so after m steps every
source's count is within about 1 (+ the part of one block) of m * p_i: realised frequencies follow the weights
closely from the first hundred steps on, not only in expectation. The k-th draw of source i in the epoch is pass r = k // Q_i, batch k % Q_i of
that pass: pass r of source i is its own shuffled order (shards shuffled by (seed, epoch, source, r), samples
within a shard by (seed, epoch, source, r, shard)); its last n_i - Q_i * G samples are not read in that pass.
A source drawn more than Q_i times in an epoch (weights or temperature above its share) restarts with pass 1,
2, ... -- a fresh shuffle, never the same order twice; these repeats are counted in the plan
(`repeats`), logged at the start of the epoch and carried by every batch (`source_pass`). A source drawn fewer
times leaves samples unread this epoch. Rank r of step t reads samples [r * B, (r + 1) * B) of the global batch,
so all ranks of a step read the same source and never the same sample. The whole plan is a pure function of
(seed, epoch, mixture, world size, batch size); the worker count does not enter it.

Mixed batches: the sources' shards are read as one shard set with the plain plan (shards/plan.py), so every
batch mixes sources in proportion to their sizes: only `sampling: proportional` is allowed there.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from ropebert.errors import InputError

from .format import load_manifest, manifest_hash, read_shard, shard_path
from .plan import range_segments

SAMPLING = ("proportional", "temperature", "weights")
BATCH_SOURCE = ("homogeneous", "mixed")
TOP_KEYS = {"sources", "sampling", "temperature", "batch_source"}
SOURCE_KEYS = {"path", "name", "weight"}


@dataclass(frozen=True)
class Source:
    name: str
    path: str
    weight: Optional[float]
    manifest: dict

    @property
    def samples(self) -> int:
        return sum(int(s["samples"]) for s in self.manifest["shards"])

    @property
    def shard_sizes(self) -> tuple:
        return tuple(int(s["samples"]) for s in self.manifest["shards"])


@dataclass(frozen=True)
class Mixture:
    file: str
    sources: tuple  # of Source
    sampling: Literal["proportional", "temperature", "weights"]
    temperature: Optional[float]
    batch_source: Literal["homogeneous", "mixed"]
    kind: str

    def probabilities(self) -> np.ndarray:
        """p_i of every source (sums to 1)."""
        n = np.array([s.samples for s in self.sources], dtype=np.float64)
        if self.sampling == "proportional":
            w = n
        elif self.sampling == "temperature":
            w = n ** (1.0 / self.temperature)
        else:
            w = np.array([s.weight for s in self.sources], dtype=np.float64)
        return w / w.sum()

    def identity(self) -> dict:
        """What the plan depends on, for the resume fingerprint."""
        return {"sampling": self.sampling, "temperature": self.temperature, "batch_source": self.batch_source,
                "sources": [{"name": s.name, "weight": s.weight, "manifest": manifest_hash(s.manifest)}
                            for s in self.sources]}


def is_mixture_file(path: str) -> bool:
    p = Path(path)
    return p.suffix.lower() in (".yaml", ".yml") and not p.is_dir()


def load_mixture(path: str, kind: Optional[str] = None) -> Mixture:
    """Read and check a mixture file; every problem is an InputError naming the file, the source and the key."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(f"data.train_dir: mixture file {path} does not exist")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: a mixture file is a mapping with `sources:` (a list of shard directories)")
    unknown = sorted(set(cfg) - TOP_KEYS)
    if unknown:
        raise InputError(f"{path}: unknown key(s) {unknown} (known: {sorted(TOP_KEYS)})")
    raw = cfg.get("sources")
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{path}: `sources` must be a non-empty list of shard directories")
    sources, names = [], set()
    for i, s in enumerate(raw):
        if isinstance(s, str):
            s = {"path": s}
        where = f"{path}: sources[{i}]"
        if not isinstance(s, dict):
            raise InputError(f"{where}: must be a directory or a mapping with `path` (and optional name, weight)")
        unknown = sorted(set(s) - SOURCE_KEYS)
        if unknown:
            raise InputError(f"{where}: unknown key(s) {unknown} (known: {sorted(SOURCE_KEYS)})")
        if not isinstance(s.get("path"), str) or not s["path"]:
            raise InputError(f"{where}: `path` (a shard directory) is required")
        d = Path(s["path"]) if Path(s["path"]).is_absolute() else p.parent / s["path"]
        name = s.get("name", d.name)
        if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-." for c in name):
            raise InputError(f"{where}: `name` must be a non-empty string of letters, digits, _ - . (got {name!r})")
        where = f"{path}: source {name!r}"
        if name in names:
            raise InputError(f"{where}: `name` is used twice; give every source a unique name")
        names.add(name)
        w = s.get("weight")
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0):
            raise InputError(f"{where}: `weight` must be a number > 0, got {w!r}")
        if not d.is_dir():
            raise InputError(f"{where}: `path` {d} is not a directory")
        try:
            manifest = load_manifest(d)
        except (FileNotFoundError, InputError) as e:
            raise InputError(f"{where}: `path` {d}: {e}") from None
        sources.append(Source(name, str(d), None if w is None else float(w), manifest))
    has_w = [s.name for s in sources if s.weight is not None]
    sampling = cfg.get("sampling", "weights" if has_w else "proportional")
    if sampling not in SAMPLING:
        raise InputError(f"{path}: `sampling` must be one of {SAMPLING}, got {sampling!r}")
    if sampling == "weights":
        missing = [s.name for s in sources if s.weight is None]
        if missing:
            raise InputError(f"{path}: sampling: weights needs a `weight` on every source; missing on {missing}")
    elif has_w:
        raise InputError(f"{path}: sources {has_w} have a `weight`, but sampling is {sampling!r}; weights apply "
                         "only with `sampling: weights`")
    temperature = cfg.get("temperature")
    if sampling == "temperature":
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise InputError(f"{path}: sampling: temperature needs `temperature` > 0 (p ∝ n^(1/T)), got {temperature!r}")
        temperature = float(temperature)
    elif temperature is not None:
        raise InputError(f"{path}: `temperature` is only used with `sampling: temperature` (sampling is {sampling!r})")
    kinds = {s.name: s.manifest["kind"] for s in sources}
    if len(set(kinds.values())) > 1:
        raise InputError(f"{path}: every source must have the same `kind`; got {kinds}")
    data_kind = next(iter(kinds.values()))
    batch_source = cfg.get("batch_source", "homogeneous" if (kind or data_kind) == "pairs" else "mixed")
    if batch_source not in BATCH_SOURCE:
        raise InputError(f"{path}: `batch_source` must be one of {BATCH_SOURCE}, got {batch_source!r}")
    if batch_source == "mixed" and sampling != "proportional":
        raise InputError(f"{path}: batch_source: mixed reads the sources as one shard set, in proportion to their "
                         f"sizes; `sampling: {sampling}` needs batch_source: homogeneous")
    return Mixture(str(path), tuple(sources), sampling, temperature, batch_source, data_kind)


def mixture_diff(saved: dict, now: dict) -> list[str]:
    """What differs between two Mixture.identity() dicts, one line per difference, naming source and key."""
    out = [f"mixture {k}: checkpoint {saved.get(k)!r} != now {now.get(k)!r}"
           for k in ("sampling", "temperature", "batch_source") if saved.get(k) != now.get(k)]
    a = {s["name"]: s for s in saved.get("sources", [])}
    b = {s["name"]: s for s in now.get("sources", [])}
    for n in a.keys() - b.keys():
        out.append(f"mixture source {n!r}: removed")
    for n in b.keys() - a.keys():
        out.append(f"mixture source {n!r}: added")
    for n in a.keys() & b.keys():
        for k in ("weight", "manifest"):
            if a[n].get(k) != b[n].get(k):
                what = "shards changed" if k == "manifest" else f"checkpoint {a[n][k]!r} != now {b[n][k]!r}"
                out.append(f"mixture source {n!r} {k}: {what}")
    if not out and [s["name"] for s in saved.get("sources", [])] != [s["name"] for s in now.get("sources", [])]:
        out.append("mixture sources: order changed")
    return out


def mixture_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# -- the homogeneous plan -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixturePlan:
    seed: int
    epoch: int
    world_size: int
    batch_size: int
    names: tuple
    shard_sizes: tuple  # per source: samples per manifest shard
    batches: tuple  # Q_i per source
    probabilities: tuple
    steps: tuple  # per step: (source index, pass, batch within pass)

    @property
    def batches_per_rank(self) -> int:
        return len(self.steps)

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    @property
    def repeats(self) -> dict:
        """Per source name: passes started beyond the first this epoch (0 = read at most once)."""
        out = {n: 0 for n in self.names}
        for i, r, _ in self.steps:
            out[self.names[i]] = max(out[self.names[i]], r)
        return out

    @property
    def draws(self) -> dict:
        out = {n: 0 for n in self.names}
        for i, _, _ in self.steps:
            out[self.names[i]] += 1
        return out


SEQUENCE_BLOCK = 10  # steps whose sources are shuffled among themselves


def source_sequence(probabilities: Sequence[float], steps: int, *, seed: int, epoch: int) -> list[int]:
    """The source of each step: a weighted round-robin (each source accrues p_i credit per step, the one with the
    most credit is drawn and pays 1; initial credits from (seed, epoch)) fixes how many times each source is
    drawn in every block of SEQUENCE_BLOCK steps, and the order inside each block is shuffled by (seed, epoch,
    block). After every whole block of m steps each source's count is within about 1 of m * p_i."""
    p = np.asarray(probabilities, dtype=np.float64)
    rng = np.random.default_rng([seed, epoch, 0x4D49])
    credit = rng.random(len(p))
    out: list[int] = []
    while len(out) < steps:
        block = []
        for _ in range(min(SEQUENCE_BLOCK, steps - len(out))):
            credit += p
            i = int(np.argmax(credit))
            credit[i] -= 1.0
            block.append(i)
        out += [block[j] for j in rng.permutation(len(block))]
    return out


def make_mixture_plan(mixture: Mixture, *, seed: int, epoch: int, world_size: int, batch_size: int) -> MixturePlan:
    G = world_size * batch_size
    small = [f"{s.name!r} ({s.samples} samples)" for s in mixture.sources if s.samples < G]
    if small:
        raise InputError(f"{mixture.file}: source(s) {', '.join(small)} smaller than one global batch of {G} "
                         f"({world_size} rank(s) x batch {batch_size}); batch_source: homogeneous draws every global "
                         "batch from one source. Drop or merge them, or use a smaller batch")
    Q = tuple(s.samples // G for s in mixture.sources)
    p = mixture.probabilities()
    seq = source_sequence(p, sum(Q), seed=seed, epoch=epoch)
    count = [0] * len(Q)
    steps = []
    for i in seq:
        k = count[i]
        count[i] += 1
        steps.append((i, k // Q[i], k % Q[i]))
    return MixturePlan(seed, epoch, world_size, batch_size, tuple(s.name for s in mixture.sources),
                       tuple(s.shard_sizes for s in mixture.sources), Q, tuple(float(x) for x in p), tuple(steps))


def pass_order(plan: MixturePlan, source: int, pass_: int) -> tuple[list[int], int]:
    """(shard order, seed key) of one pass of one source."""
    sizes = plan.shard_sizes[source]
    order = np.random.default_rng([plan.seed, plan.epoch, 0x5352, source, pass_]).permutation(len(sizes))
    return [int(x) for x in order], pass_


def within_pass_shard_order(plan: MixturePlan, source: int, pass_: int, shard: int) -> np.ndarray:
    return np.random.default_rng([plan.seed, plan.epoch, 0x5348, source, pass_, shard]).permutation(
        plan.shard_sizes[source][shard])


def step_segments(plan: MixturePlan, step: int, rank: int) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(source, pass, [(shard, lo, hi)]): rank `rank`'s samples of step `step`, as ranges of positions in each
    shard's shuffled order of that pass, in reading order."""
    src, pass_, b = plan.steps[step]
    lo = b * plan.global_batch + rank * plan.batch_size
    order, _ = pass_order(plan, src, pass_)
    return src, pass_, range_segments(order, plan.shard_sizes[src], lo, lo + plan.batch_size)


def step_samples(plan: MixturePlan, step: int, rank: int) -> tuple[int, list[tuple[int, int]]]:
    """Reference: (source, [(shard, sample index)]) of rank `rank`'s batch of step `step`."""
    src, pass_, segs = step_segments(plan, step, rank)
    ids = []
    for idx, a, c in segs:
        ids += [(idx, int(j)) for j in within_pass_shard_order(plan, src, pass_, idx)[a:c]]
    return src, ids


@dataclass(frozen=True)
class PairSource:
    """One shard directory of pairs, read whole: its mixture name (the directory for a plain directory), its
    path, its manifest hash and its (key, sample) rows in shard order."""

    name: str
    path: str
    manifest_hash: str
    rows: list


def read_pair_sources(path: str, command: str, why: str) -> list[PairSource]:
    """Every source of a pair-shard directory or mixture file (in the file's order), read whole. A source whose
    manifest is not of kind pairs is an error; so is a key that two sources share, naming both (`why`: what the
    command does with keys that needs them unique). `command` names the caller in the messages."""
    if is_mixture_file(path):
        mix = load_mixture(path)
        if mix.kind != "pairs":
            raise InputError(f"{path}: {command} reads pair shards; the mixture's sources are {mix.kind!r}")
        dirs = [(s.name, s.path) for s in mix.sources]
    else:
        dirs = [(str(path), str(path))]
    sources, owner = [], {}
    for name, d in dirs:
        m = load_manifest(d)
        if m["kind"] != "pairs":
            raise InputError(f"{d}: {command} reads pair shards (query -> positive); this manifest is {m['kind']!r}")
        rows = []
        for entry in m["shards"]:
            for key, sample in read_shard(shard_path(d, entry)):
                if key in owner:
                    raise InputError(f"{path}: key {key!r} is in source {owner[key]!r} and in source {name!r}; "
                                     f"{why}, so they must be unique across sources")
                owner[key] = name
                rows.append((key, sample))
        sources.append(PairSource(name, str(d), manifest_hash(m), rows))
    return sources
