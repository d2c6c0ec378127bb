"""Mixtures: the mixture file's checks, the homogeneous plan (one source per global batch, realised frequencies,
repeats), and the DataModule over a mixture (2 ranks, exact resume, refused changes)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from ropebert.errors import InputError
from ropebert.shards.mixture import load_mixture, make_mixture_plan, step_samples
from tests.conftest import make_pair_shards

SOURCES = {"big": [250, 150], "mid": [300], "small": [60, 40]}  # 400 / 300 / 100 samples


@pytest.fixture(scope="module")
def mix_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mix")
    for name, sizes in SOURCES.items():
        make_pair_shards(d / name, sizes)
    make_pair_shards(d / "hn", [40], kind="hard_negatives", num_negatives=2)
    make_pair_shards(d / "tiny", [3])
    return d


def _write(d: Path, text: str, name="mix.yaml") -> Path:
    p = d / name
    p.write_text(text)
    return p


def _mix(d, sampling="weights", extra=""):
    w = {"big": 0.5, "mid": 0.3, "small": 0.2}
    srcs = "".join(f"  - path: {n}\n" + (f"    weight: {w[n]}\n" if sampling == "weights" else "") for n in SOURCES)
    return _write(d, f"sampling: {sampling}\n{extra}sources:\n{srcs}", f"mix-{sampling}.yaml")


@pytest.mark.parametrize("sampling,want", [
    ("weights", {"big": 0.5, "mid": 0.3, "small": 0.2}),
    ("proportional", {"big": 0.5, "mid": 0.375, "small": 0.125}),
    ("temperature", None),  # T = 2: p ∝ sqrt(n)
])
def test_two_ranks_one_source_per_step_and_frequencies(mix_dir, sampling, want):
    m = load_mixture(str(_mix(mix_dir, sampling, "temperature: 2\n" if sampling == "temperature" else "")))
    if want is None:
        r = {n: sum(s) ** 0.5 for n, s in SOURCES.items()}
        want = {n: v / sum(r.values()) for n, v in r.items()}
    assert dict(zip([s.name for s in m.sources], m.probabilities())) == pytest.approx(want)
    plan = make_mixture_plan(m, seed=3, epoch=0, world_size=2, batch_size=2)  # global batch 4
    assert plan.batches == (100, 75, 25) and plan.batches_per_rank == 200  # an epoch = every source's batches
    names = [s.name for s in m.sources]
    keys_seen = Counter()
    for t in range(plan.batches_per_rank):
        per_rank = [step_samples(plan, t, r) for r in range(2)]
        assert per_rank[0][0] == per_rank[1][0]  # both ranks: one source
        src = per_rank[0][0]
        for _, ids in per_rank:
            assert len(ids) == 2
            keys_seen.update((names[src], plan.steps[t][1], i) for i in ids)
    assert max(keys_seen.values()) == 1  # within a pass no sample twice, across ranks and steps
    freq = Counter(names[i] for i, _, _ in plan.steps[:200])
    for n in names:
        assert abs(freq[n] / 200 - want[n]) <= 0.02, (n, freq[n], want[n])
    # every prefix stays close too (low-discrepancy, not i.i.d.)
    for n in names:
        got = Counter(names[i] for i, _, _ in plan.steps[:50])[n]
        assert abs(got - 50 * want[n]) <= 1.5
    if sampling == "weights":  # "small" (25 batches) is drawn 40 times: one repeat, with a fresh shuffle
        assert plan.draws == {"big": 100, "mid": 60, "small": 40}
        assert plan.repeats == {"big": 0, "mid": 0, "small": 1}
        first = [step_samples(plan, t, 0)[1] for t in range(200) if plan.steps[t][0] == 2]
        assert first[0] != first[25] and sorted(sum(first[:25], [])) != sum(first[:25], [])
    else:
        assert set(plan.repeats.values()) <= {0, 1}


def test_plan_is_a_pure_function(mix_dir):
    m = load_mixture(str(_mix(mix_dir)))
    a = make_mixture_plan(m, seed=1, epoch=2, world_size=2, batch_size=2)
    assert a == make_mixture_plan(m, seed=1, epoch=2, world_size=2, batch_size=2)
    assert a.steps != make_mixture_plan(m, seed=1, epoch=3, world_size=2, batch_size=2).steps
    assert a.steps != make_mixture_plan(m, seed=2, epoch=2, world_size=2, batch_size=2).steps


def test_bad_mixture_files(mix_dir, tmp_path):
    def bad(text, match):
        p = _write(mix_dir, text, "bad.yaml")
        with pytest.raises(InputError, match=match):
            load_mixture(str(p))

    bad("sources:\n  - path: nowhere\n", r"source 'nowhere': `path` .*nowhere is not a directory")
    bad("sources:\n  - {path: big, weight: 0}\n", r"source 'big': `weight` must be a number > 0, got 0")
    bad("sources:\n  - {path: big, weight: -1}\n  - {path: mid, weight: 1}\n", r"source 'big': `weight`")
    bad("sources:\n  - big\n  - hn\n", r"same `kind`.*'big': 'pairs'.*'hn': 'hard_negatives'")
    bad("sources:\n  - big\nshuffle: true\n", r"unknown key\(s\) \['shuffle'\]")
    bad("sources:\n  - {path: big, wieght: 2}\n", r"sources\[0\]: unknown key\(s\) \['wieght'\]")
    bad("sampling: weights\nsources:\n  - {path: big, weight: 1}\n  - mid\n", r"missing on \['mid'\]")
    bad("sampling: temperature\nsources:\n  - big\n", "needs `temperature` > 0")
    bad("sampling: proportional\nsources:\n  - {path: big, weight: 2}\n", "only with `sampling: weights`")
    bad("batch_source: mixed\nsources:\n  - {path: big, weight: 2}\n  - {path: mid, weight: 1}\n",
        "batch_source: mixed")
    bad("sources:\n  - {path: big, name: a}\n  - {path: mid, name: a}\n", "source 'a': `name` is used twice")
    bad("sources: []\n", "non-empty list")
    p = _write(mix_dir, "sources:\n  - big\n  - tiny\n", "small.yaml")
    with pytest.raises(InputError, match=r"source\(s\) 'tiny' \(3 samples\) smaller than one global batch of 8"):
        make_mixture_plan(load_mixture(str(p)), seed=0, epoch=0, world_size=2, batch_size=4)
    with pytest.raises(InputError, match="does not exist"):
        load_mixture(str(tmp_path / "none.yaml"))


# -- the DataModule over a mixture ------------------------------------------------------------------------------


def _dm(train_dir, tok, rank=0, world=2, **kw):
    from ropebert.shards.datamodule import ShardDataModule

    args = dict(batch_size=2, num_workers=2, max_passage_length=16)
    args.update(kw)
    dm = ShardDataModule(str(train_dir), str(tok), **args)
    dm._dist = lambda: (world, rank)
    dm.setup("fit")
    return dm


def test_datamodule_two_ranks_homogeneous_and_exact_resume(mix_dir, minilm_dir):
    mix = _mix(mix_dir)
    per_rank = []
    for rank in range(2):
        dm = _dm(mix, minilm_dir, rank=rank)
        per_rank.append([(b["source"], b["source_pass"], tuple(b["keys"])) for b in dm.train_dataloader()])
        assert len(per_rank[-1]) == dm.batches_per_rank == 200
        assert set(dm.train_dataloader().dataset.plan(0).names) == set(SOURCES)
    plan = dm.plan(0)
    names = [plan.names[i] for i, _, _ in plan.steps]
    for t in range(200):
        assert per_rank[0][t][0] == per_rank[1][t][0] == names[t]  # every step: one source on both ranks
        for r in range(2):  # the keys are the plan's samples of that source
            want = tuple(f"s{s}_{i}" for s, i in step_samples(plan, t, r)[1])
            assert per_rank[r][t][2] == want and per_rank[r][t][1] == plan.steps[t][1], (t, r)
        assert not set(per_rank[0][t][2]) & set(per_rank[1][t][2])

    # resume from a cursor (7: not a multiple of the 2 workers) -> the same continuation
    dm = _dm(mix, minilm_dir, rank=1)
    it = iter(dm.train_dataloader())
    first = [next(it)["keys"] for _ in range(7)]
    state = dm.state_dict()
    assert state["cursor"] == {"epoch": 0, "batches_done": 7} and state["fingerprint"]["mixture"]["sampling"] == "weights"
    resumed = _dm(mix, minilm_dir, rank=1)
    resumed.load_state_dict(state)
    rest = [b["keys"] for b in resumed.train_dataloader()]
    assert first + rest == [list(k) for _, _, k in per_rank[1]]


def test_changed_mixture_refused_naming_the_difference(mix_dir, minilm_dir):
    dm = _dm(_mix(mix_dir), minilm_dir)
    it = iter(dm.train_dataloader())
    next(it)
    state = dm.state_dict()
    text = _mix(mix_dir).read_text().replace("weight: 0.3", "weight: 0.4")
    other = _write(mix_dir, text, "mix-changed.yaml")
    with pytest.raises(InputError, match=r"plan changed.*mixture source 'mid' weight: checkpoint 0.3 != now 0.4"):
        _dm(other, minilm_dir).load_state_dict(state)
    with pytest.raises(InputError, match=r"mixture: the checkpoint read a mixture file, now one shard directory"):
        _dm(mix_dir / "big", minilm_dir).load_state_dict(state)
    replanned = _dm(other, minilm_dir, allow_replan=True)
    replanned.load_state_dict(state)
    assert replanned._pending == (0, 1)


def test_mixed_batches_read_every_source_as_one_shard_set(mix_dir, minilm_dir):
    p = _write(mix_dir, "batch_source: mixed\nsources:\n  - big\n  - mid\n  - small\n", "mixed.yaml")
    dm = _dm(p, minilm_dir, world=1, num_workers=0, batch_size=8)
    batches = list(dm.train_dataloader())
    assert len(batches) == 800 // 8 and "source" not in batches[0]
    assert dm.fingerprint()["mixture"]["batch_source"] == "mixed"
