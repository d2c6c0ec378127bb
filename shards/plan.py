# Copyright ropebert contributors. Apache-2.0.
"""The streaming plan: which samples every (rank, worker) slot reads, as a pure function of
(seed, epoch, world size, workers per rank, batch size, shard sample counts).

Epoch e's virtual sequence: the shards in an order shuffled by (seed, e), each shard's samples in an order
shuffled by (seed, e, shard index). With S = world_size * workers slots and B = batch size, every slot gets
the same quota of Q = N // (S * B) batches: slot s = rank * workers + worker reads the contiguous range
[s * Q * B, (s + 1) * Q * B) of the virtual sequence, so every rank yields exactly workers * Q batches and no
DDP rank waits for another. The last N - S * Q * B (< S * B) samples of the sequence are dropped; because the
order changes every epoch, so does the dropped tail. A slot's range covers few, consecutive shards: reads
stay sequential, and resuming seeks into the right shard without replaying anything.

Batch order on a rank: torch's DataLoader takes batch b from worker b % workers, so rank batch b is the
(b // workers)-th batch of slot rank * workers + b % workers. After a resume at rank batch n, the new loader's
worker w plays the role of worker (w + n) % workers (see `logical_worker`), so the sequence continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ropebert.errors import InputError


@dataclass(frozen=True)
class EpochPlan:
    seed: int
    epoch: int
    world_size: int
    workers: int
    batch_size: int
    shard_order: tuple  # manifest shard indices in reading order
    shard_sizes: tuple  # samples per manifest shard (manifest order)
    batches_per_slot: int  # Q

    @property
    def slots(self) -> int:
        return self.world_size * self.workers

    @property
    def batches_per_rank(self) -> int:
        return self.workers * self.batches_per_slot

    @property
    def samples_used(self) -> int:
        return self.slots * self.batches_per_slot * self.batch_size

    @property
    def tail(self) -> int:
        """Samples dropped this epoch (< slots * batch_size)."""
        return sum(self.shard_sizes) - self.samples_used


def check_layout(world_size: int, workers: int, batch_size: int) -> None:
    for name, v in (("world_size", world_size), ("workers", workers), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive int, got {v!r}")


def make_plan(shard_sizes: Sequence[int], *, seed: int, epoch: int, world_size: int, workers: int,
              batch_size: int) -> EpochPlan:
    check_layout(world_size, workers, batch_size)
    sizes = tuple(int(s) for s in shard_sizes)
    total = sum(sizes)
    slots = world_size * workers
    q = total // (slots * batch_size)
    if q == 0:
        raise InputError(
            f"{total} samples are too few for {world_size} rank(s) x {workers} worker(s) x batch {batch_size} "
            f"(one batch per slot needs {slots * batch_size}); use fewer workers or a smaller batch")
    order = np.random.default_rng([seed, epoch, 0x5A4D]).permutation(len(sizes))
    return EpochPlan(seed, epoch, world_size, workers, batch_size, tuple(int(i) for i in order), sizes, q)


def within_shard_order(plan: EpochPlan, shard_index: int) -> np.ndarray:
    """The order in which the samples of manifest shard `shard_index` appear in epoch `plan.epoch`."""
    return np.random.default_rng([plan.seed, plan.epoch, 0x5348, shard_index]).permutation(plan.shard_sizes[shard_index])


def slot_segments(plan: EpochPlan, slot: int, start_batch: int = 0) -> list[tuple[int, int, int]]:
    """[(shard_index, lo, hi)]: slot `slot`'s samples from its batch `start_batch` on, as ranges of positions in
    each shard's shuffled order, in reading order."""
    if not 0 <= slot < plan.slots:
        raise InputError(f"slot {slot} out of range (slots={plan.slots})")
    per_slot = plan.batches_per_slot * plan.batch_size
    lo = slot * per_slot + min(start_batch, plan.batches_per_slot) * plan.batch_size
    hi = (slot + 1) * per_slot
    return range_segments(plan.shard_order, plan.shard_sizes, lo, hi)


def range_segments(order: Sequence[int], sizes: Sequence[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """[(shard_index, lo, hi)]: positions lo..hi of the concatenation of shards `order` (sizes by shard index),
    as ranges within each shard, in reading order."""
    segs, pos = [], 0
    for idx in order:
        n = sizes[idx]
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            segs.append((idx, a - pos, b - pos))
        pos += n
        if pos >= hi:
            break
    return segs


def logical_worker(physical: int, workers: int, start_batch: int) -> int:
    """After resuming at rank batch `start_batch`, the loader's physical worker `physical` serves the batches of
    logical worker (physical + start_batch) % workers (the DataLoader restarts its round-robin at worker 0)."""
    return (physical + start_batch) % workers


def consumed_by_worker(logical: int, workers: int, start_batch: int) -> int:
    """How many batches logical worker `logical` had produced when the rank had consumed `start_batch`."""
    return max(0, -(-(start_batch - logical) // workers))


def rank_batches(plan: EpochPlan, rank: int) -> list[list[tuple[int, int]]]:
    """Reference (single-process) order of a rank's batches: list of batches of (shard_index, sample_index)."""
    per_worker = []
    for w in range(plan.workers):
        ids = []
        for idx, a, b in slot_segments(plan, rank * plan.workers + w):
            order = within_shard_order(plan, idx)
            ids += [(idx, int(j)) for j in order[a:b]]
        per_worker.append([ids[i:i + plan.batch_size] for i in range(0, len(ids), plan.batch_size)])
    return [per_worker[b % plan.workers][b // plan.workers] for b in range(plan.batches_per_rank)]
