"""The streaming plan (pure function): exactly-once, equal batches per rank, documented tail, resume seeks."""

from __future__ import annotations

from collections import Counter

import pytest

from ropebert.shards.plan import (
    consumed_by_worker,
    logical_worker,
    make_plan,
    rank_batches,
    slot_segments,
    within_shard_order,
)

SIZES = [37, 5, 64, 1, 23, 50, 9]  # uneven shards, 189 samples


def _epoch_batches(seed, epoch, world, workers, batch):
    plan = make_plan(SIZES, seed=seed, epoch=epoch, world_size=world, workers=workers, batch_size=batch)
    return plan, [rank_batches(plan, r) for r in range(world)]


@pytest.mark.parametrize("world,workers,batch", [(2, 2, 4), (2, 2, 7), (3, 1, 5), (1, 4, 3)])
def test_exactly_once_equal_batches_and_tail(world, workers, batch):
    for epoch in range(3):
        plan, per_rank = _epoch_batches(0, epoch, world, workers, batch)
        counts = [len(b) for b in per_rank]
        assert len(set(counts)) == 1 and counts[0] == plan.batches_per_rank > 0  # no rank waits for another
        seen = Counter(x for batches in per_rank for b in batches for x in b)
        assert all(len(b) == batch for batches in per_rank for b in batches)
        assert max(seen.values()) == 1  # at most once
        total = sum(SIZES)
        assert len(seen) == total - plan.tail == plan.samples_used  # all but the tail
        assert 0 <= plan.tail < world * workers * batch  # documented bound


def test_tail_changes_with_epoch_and_plan_is_pure():
    tails = []
    for epoch in range(4):
        plan, per_rank = _epoch_batches(1, epoch, 2, 2, 4)
        seen = {x for batches in per_rank for b in batches for x in b}
        all_ids = {(s, i) for s, n in enumerate(SIZES) for i in range(n)}
        tails.append(frozenset(all_ids - seen))
        assert len(tails[-1]) == plan.tail
        # pure: the same inputs give the same plan
        assert _epoch_batches(1, epoch, 2, 2, 4)[1] == per_rank
    assert len(set(tails)) > 1
    assert _epoch_batches(1, 0, 2, 2, 4)[1] != _epoch_batches(2, 0, 2, 2, 4)[1]  # seed matters


def test_reads_stay_sequential_few_shards_per_slot():
    plan = make_plan(SIZES, seed=0, epoch=0, world_size=2, workers=2, batch_size=4)
    for slot in range(plan.slots):
        segs = slot_segments(plan, slot)
        idx = [s for s, _, _ in segs]
        order_pos = [plan.shard_order.index(s) for s in idx]
        assert order_pos == sorted(order_pos) and len(set(idx)) == len(idx)  # each shard once, in epoch order
        assert sum(b - a for _, a, b in segs) == plan.batches_per_slot * plan.batch_size


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_resume_mapping_reproduces_uninterrupted_sequence(k):
    """Simulate the DataLoader round-robin after a resume at rank batch k (k not a multiple of workers)."""
    world, workers, batch = 2, 2, 4
    plan, per_rank = _epoch_batches(0, 0, world, workers, batch)
    for rank in range(world):
        full = per_rank[rank]
        streams = []
        for phys in range(workers):
            lw = logical_worker(phys, workers, k)
            ids = []
            for idx, a, b in slot_segments(plan, rank * workers + lw, consumed_by_worker(lw, workers, k)):
                ids += [(idx, int(j)) for j in within_shard_order(plan, idx)[a:b]]
            streams.append([ids[i:i + batch] for i in range(0, len(ids), batch)])
        resumed, i = [], 0
        while any(streams):  # torch's in-order round robin over workers, skipping exhausted ones
            if streams[i % workers]:
                resumed.append(streams[i % workers].pop(0))
            i += 1
        assert resumed == full[k:]


def test_too_small_data_is_a_clear_error():
    with pytest.raises(ValueError, match="too few"):
        make_plan([3, 2], seed=0, epoch=0, world_size=2, workers=2, batch_size=4)
    with pytest.raises(ValueError, match="world_size"):
        make_plan([30], seed=0, epoch=0, world_size=0, workers=2, batch_size=4)
