"""ShardDataModule: real multi-worker loaders, exact resume (standalone and through Lightning), batch format."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from tests.conftest import make_pair_shards

SIZES = [37, 5, 64, 1, 23, 50, 9]


def _dm(shards, tok, rank=0, world=2, **kw):
    from ropebert.shards.datamodule import ShardDataModule

    args = dict(batch_size=4, num_workers=2, max_passage_length=32)
    args.update(kw)
    dm = ShardDataModule(str(shards), str(tok), **args)
    dm._dist = lambda: (world, rank)  # simulate a rank of a `world`-process job
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    make_pair_shards(d, SIZES)
    return d


def test_two_ranks_two_workers_exactly_once(pair_shards, minilm_dir):
    per_rank = []
    for rank in range(2):
        dm = _dm(pair_shards, minilm_dir, rank=rank)
        dl = dm.train_dataloader()
        batches = [b["keys"] for b in dl]
        assert len(batches) == len(dl) == dm.batches_per_rank
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1])  # equal batch counts: no DDP hang
    seen = Counter(k for r in per_rank for b in r for k in b)
    assert max(seen.values()) == 1
    plan = dm.plan(0)
    assert len(seen) == sum(SIZES) - plan.tail and plan.tail < 2 * 2 * 4
    # matches the single-process reference order of the plan
    from ropebert.shards.plan import rank_batches

    ref = [[f"s{s}_{i}" for s, i in b] for b in rank_batches(plan, 1)]
    assert per_rank[1] == ref


def test_worker_start_methods_give_the_same_batches(pair_shards, minilm_dir):
    from ropebert.errors import InputError
    from ropebert.shards.datamodule import ShardDataModule

    got = {}
    for method in ("forkserver", "fork", "spawn"):
        dl = _dm(pair_shards, minilm_dir, rank=1, worker_start=method).train_dataloader()
        assert dl.multiprocessing_context.get_start_method() == method
        got[method] = [b["keys"] for b in dl]
    assert got["forkserver"] == got["fork"] == got["spawn"] and len(got["fork"]) > 1
    assert _dm(pair_shards, minilm_dir).train_dataloader().multiprocessing_context.get_start_method() == "forkserver"
    with pytest.raises(InputError, match="worker_start must be"):
        ShardDataModule(str(pair_shards), str(minilm_dir), worker_start="thread")


def test_batch_format_pairs(pair_shards, minilm_dir):
    dm = _dm(pair_shards, minilm_dir, world=1, num_workers=0, max_query_length=8)
    b = next(iter(dm.train_dataloader()))
    assert set(b) == {"keys", "query", "passage", "hashes"}
    B = 4
    assert len(b["keys"]) == B
    assert set(b["hashes"]) == {"query", "passage"} and b["hashes"]["passage"].dtype == torch.long
    assert b["hashes"]["passage"].shape == (B,) and len(set(b["hashes"]["passage"].tolist())) == B  # distinct texts
    for part in ("query", "passage"):
        ids, mask = b[part]["input_ids"], b[part]["attention_mask"]
        assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape and ids.shape[0] == B
        assert mask[:, -1].sum() >= 1 and mask[:, 0].all()  # padded to the longest in the batch
    assert b["query"]["input_ids"].shape[1] <= 8


def test_resume_from_cursor_continues_exactly(pair_shards, minilm_dir, tmp_path):
    k = 3  # not a multiple of the 2 workers
    full_dm = _dm(pair_shards, minilm_dir, rank=1)
    full = [b["keys"] for b in full_dm.train_dataloader()] + [b["keys"] for b in full_dm.train_dataloader()]
    dm = _dm(pair_shards, minilm_dir, rank=1)
    it = iter(dm.train_dataloader())
    first = [next(it)["keys"] for _ in range(k)]
    state = dm.state_dict()
    assert state["cursor"] == {"epoch": 0, "batches_done": k}
    resumed_dm = _dm(pair_shards, minilm_dir, rank=1)
    resumed_dm.load_state_dict(state)
    rest = [b["keys"] for b in resumed_dm.train_dataloader()]
    nxt = [b["keys"] for b in resumed_dm.train_dataloader()]  # the following epoch starts from its beginning
    assert first + rest + nxt == full
    # an end-of-epoch cursor resumes at the start of the next epoch
    end_dm = _dm(pair_shards, minilm_dir, rank=1)
    end_dm.load_state_dict({"cursor": {"epoch": 0, "batches_done": end_dm.batches_per_rank}, "fingerprint": state["fingerprint"]})
    assert [b["keys"] for b in end_dm.train_dataloader()] == nxt


def test_fingerprint_mismatch_refused_unless_replan(pair_shards, minilm_dir, tmp_path):
    dm = _dm(pair_shards, minilm_dir)
    it = iter(dm.train_dataloader())
    for _ in range(4):
        next(it)
    state = dm.state_dict()
    for change in (dict(world=1), dict(num_workers=1), dict(batch_size=3), dict(seed=5)):
        other = _dm(pair_shards, minilm_dir, **change)
        with pytest.raises(ValueError, match="plan changed.*" + next(iter(change)).replace("world", "world_size")
                           .replace("num_workers", "workers")):
            other.load_state_dict(state)
    # a changed manifest (one more sample in the last shard) is refused too, naming the manifest
    changed = tmp_path / "changed"
    make_pair_shards(changed, SIZES[:-1] + [SIZES[-1] + 1])
    with pytest.raises(ValueError, match="plan changed.*manifest"):
        _dm(changed, minilm_dir).load_state_dict(state)
    other = _dm(pair_shards, minilm_dir, world=1, allow_replan=True)
    other.load_state_dict(state)
    assert other._pending[0] == 0 and 0 < other._pending[1] < other.batches_per_rank


def test_stage2_batches_and_stage2_on_pairs_refused(tmp_path, pair_shards, minilm_dir):
    with pytest.raises(ValueError, match="hard-negative shards"):
        _dm(pair_shards, minilm_dir, kind="hard_negatives")
    d = tmp_path / "hn"
    make_pair_shards(d, [10, 7], kind="hard_negatives")
    dm = _dm(d, minilm_dir, world=1, kind="hard_negatives", num_negatives=7, num_workers=0)
    b = next(iter(dm.train_dataloader()))
    assert b["negatives"]["input_ids"].shape[0] == 4 * 7
    assert b["teacher_scores"].shape == (4, 8) and b["teacher_scores"].dtype == torch.float32
    tok = dm._stream.collate.tok
    # rows i*K..(i+1)*K-1 belong to query i
    for i, key in enumerate(b["keys"]):
        s, n = key[1:].split("_")
        row = tok.decode(b["negatives"]["input_ids"][i * 7 + 3], skip_special_tokens=True)
        assert row == f"passage : wrong {s} {n} 3"


def test_lightning_fit_resume_is_exact(pair_shards, minilm_dir, tmp_path):
    """Uninterrupted 2-epoch fit vs. fit stopped after k steps + trainer.fit(ckpt_path=...): same key sequence;
    the sample log (deduplicated by (epoch, batch)) tells the same story."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(list(batch["keys"]))
            return (self.w * batch["query"]["attention_mask"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def trainer(**kw):
        return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, max_epochs=2, **kw)

    def dm(log):
        from ropebert.shards.datamodule import ShardDataModule

        return ShardDataModule(str(pair_shards), str(minilm_dir), batch_size=8, num_workers=2,
                               max_passage_length=16, sample_log=str(log))

    full = Recorder()
    trainer(enable_checkpointing=False).fit(full, datamodule=dm(tmp_path / "log_full"))
    per_epoch = len(full.seen) // 2
    assert len(full.seen) == 2 * per_epoch and full.seen[:per_epoch] != full.seen[per_epoch:]

    for k in (3, per_epoch + 1):  # mid-epoch 0 and mid-epoch 1, k odd (not a multiple of the workers)
        ck = tmp_path / f"ck{k}"
        log = tmp_path / f"log{k}"
        part = Recorder()
        trainer(max_steps=k, callbacks=[ModelCheckpoint(dirpath=ck, every_n_train_steps=k, save_top_k=-1)]).fit(
            part, datamodule=dm(log))
        assert part.seen == full.seen[:k]
        ckpt = next(ck.glob("*.ckpt"))
        saved = torch.load(ckpt, weights_only=False)["ShardDataModule"]
        assert saved["cursor"] == {"epoch": k // per_epoch, "batches_done": k % per_epoch}
        rest = Recorder()
        trainer(enable_checkpointing=False).fit(rest, datamodule=dm(log), ckpt_path=str(ckpt))
        assert part.seen + rest.seen == full.seen

        lines = [json.loads(x) for x in (log / "rank-0.jsonl").read_text().splitlines()]
        dedup = {(x["epoch"], x["batch"]): x["keys"] for x in lines}
        assert [dedup[key] for key in sorted(dedup)] == full.seen
    # an end-of-epoch checkpoint (ModelCheckpoint default: on_train_epoch_end) resumes at the next epoch's start
    ck = tmp_path / "ck_epoch"
    part = Recorder()
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              max_epochs=1, callbacks=[ModelCheckpoint(dirpath=ck)]).fit(part, datamodule=dm(tmp_path / "log_e"))
    rest = Recorder()
    trainer(enable_checkpointing=False).fit(rest, datamodule=dm(tmp_path / "log_e"), ckpt_path=str(next(ck.glob("*.ckpt"))))
    assert part.seen + rest.seen == full.seen

    # limit_train_batches: the batch Lightning fetched ahead but never trained on is not logged
    short = Recorder()
    trainer(enable_checkpointing=False, limit_train_batches=3).fit(short, datamodule=dm(tmp_path / "log_short"))
    short_log = [json.loads(x) for x in (tmp_path / "log_short" / "rank-0.jsonl").read_text().splitlines()]
    assert [x["keys"] for x in short_log] == short.seen and len(short.seen) == 6
    assert [(x["epoch"], x["batch"]) for x in short_log] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]

    full_log = [json.loads(x)["keys"] for x in (tmp_path / "log_full" / "rank-0.jsonl").read_text().splitlines()]
    assert full_log == full.seen


def test_collator_matches_transformers_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    from ropebert.shards.datamodule import BatchCollator

    texts = ["short", "a much longer passage " * 20, "Ünïcödé text — with punctuation!"]
    col = BatchCollator(str(minilm_dir), "pairs", 7, 8, 24, "query: ", "passage: ")
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    for prefix, L in (("query: ", 8), ("passage: ", 24)):
        got = col._encode(texts, prefix, L)
        ref = tok([prefix + t for t in texts], padding="longest", truncation=True, max_length=L, return_tensors="pt")
        assert torch.equal(got["input_ids"], ref["input_ids"]) and torch.equal(got["attention_mask"], ref["attention_mask"])


def test_val_loader_fixed_order(tmp_path, pair_shards, minilm_dir):
    v = tmp_path / "val"
    make_pair_shards(v, [11, 6])
    dm = _dm(pair_shards, minilm_dir, world=1, val_dir=str(v), num_workers=2)
    a = [b["keys"] for b in dm.val_dataloader()]
    assert len(a) == len(dm.val_dataloader()) == 4 and a == [b["keys"] for b in dm.val_dataloader()]
    assert len({k for b in a for k in b}) == 16
    assert _dm(pair_shards, minilm_dir, world=1).val_dataloader() == []


def test_lightningcli_can_parse_the_init_args():
    from jsonargparse import ArgumentParser

    from ropebert.shards.datamodule import ShardDataModule

    p = ArgumentParser()
    p.add_class_arguments(ShardDataModule, "data")
    cfg = p.parse_args(["--data.train_dir", "d", "--data.tokenizer", "t", "--data.batch_size", "8",
                        "--data.kind", "hard_negatives", "--data.sample_log", "logs", "--data.allow_replan", "true"])
    assert cfg.data.batch_size == 8 and cfg.data.sample_log == "logs" and cfg.data.allow_replan is True
    assert cfg.data.num_negatives == 7 and cfg.data.query_prefix == "query: " and cfg.data.val_dir is None
    helps = {a.dest: a.help for a in p._actions}
    assert "manifest.json" in (helps.get("data.train_dir") or "")
