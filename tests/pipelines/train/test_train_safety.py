"""Training reliability edge cases: `last.ckpt` is the end of the run after a resume with other checkpoint
settings; SIGTERM saves and exits 143, and the resume is exact; changed settings on resume are applied or
refused, and said; a re-planned resume keeps cursor, progress and sample log in step; a truncated checkpoint
names itself and the newest intact one; orphaned temp files go, modes follow the umask; a full disk is one line."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from ropebert.errors import UserError
from ropebert.pipelines.train.fit import PREEMPTED_EXIT, cli_main
from ropebert.pipelines.train.fit import main as fit_main
from ropebert.pipelines.train.strategy import AtomicCheckpointIO, remove_orphaned_temp_files
from tests.pipelines.train.test_train import _base_args


def _ck(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def _weights(path):
    return {k: v for k, v in _ck(path)["state_dict"].items()}


def test_last_ckpt_is_the_end_after_resume_with_other_checkpoint_settings(tiny_bert_dir, pair_shards, tmp_path):
    cli_main(_base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path, steps=3))
    cli_main(_base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path, steps=5,
                        extra=("--ckpt_path", "last", "--checkpoint.every_n_train_steps", "2")))
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert not [n for n in names if n.startswith("last-v")], names
    assert _ck(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 5


def test_sigterm_saves_a_checkpoint_exits_143_and_resumes_exactly(tiny_bert_dir, pair_shards, tmp_path, monkeypatch):
    from ropebert.pipelines.train.module import RopeBertContrastive

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert fit_main(_base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, ref, steps=6)) == 0
    real = RopeBertContrastive.training_step

    def step_then_preempt(self, batch, batch_idx):
        out = real(self, batch, batch_idx)
        if self.global_step == 2:  # after the 2nd optimizer step: no checkpoint is due (every 3 steps)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(RopeBertContrastive, "training_step", step_then_preempt)
    assert fit_main(_base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, cut, steps=6)) == PREEMPTED_EXIT
    assert _ck(cut / "ckpt" / "last.ckpt")["global_step"] == 2  # saved at SIGTERM, not at the last save point
    monkeypatch.setattr(RopeBertContrastive, "training_step", real)
    assert fit_main(_base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, cut, steps=6,
                               extra=("--ckpt_path", "last"))) == 0
    a, b = _weights(ref / "ckpt" / "last.ckpt"), _weights(cut / "ckpt" / "last.ckpt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_changed_settings_on_resume_are_applied_or_refused_and_said(tiny_bert_dir, pair_shards, tmp_path, caplog):
    cli_main(_base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path, steps=3))
    with caplog.at_level(logging.WARNING):
        cli = cli_main(_base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path, steps=4, extra=(
            "--ckpt_path", "last", "--model.lr", "5e-4", "--model.temperature", "0.02")))
    assert "lr 0.001 -> 0.0005" in caplog.text and "temperature 0.01 -> 0.02" in caplog.text
    opt = cli.trainer.optimizers[0]
    assert [g["initial_lr"] for g in opt.param_groups] == [5e-4, 5e-4]
    sched = cli.trainer.lr_scheduler_configs[0].scheduler
    assert sched.base_lrs == [5e-4, 5e-4] and opt.param_groups[0]["lr"] <= 5e-4
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # an explicit path: the command line wins there too (not the ckpt's)
        cli = cli_main(_base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path, steps=5, extra=(
            "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--model.lr", "2e-4")))
    assert "lr 0.0005 -> 0.0002" in caplog.text and "temperature 0.02 -> 0.01" in caplog.text
    assert cli.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [2e-4, 2e-4]
    other = tmp_path / "other-init"
    shutil.copytree(tiny_bert_dir, other)
    with pytest.raises(ValueError, match=r"model.init_from was .* now .*other-init"):
        cli_main(_base_args(other, pair_shards, tiny_bert_dir, tmp_path, steps=5, extra=("--ckpt_path", "last")))


def _log_batches(d):
    return [(r["epoch"], r["batch"]) for r in map(json.loads, (d / "rank-0.jsonl").read_text().splitlines())]


def test_replanned_resume_keeps_cursor_progress_and_sample_log_in_step(tiny_bert_dir, pair_shards, tmp_path):
    a = lambda steps, batch, *extra: _base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path, steps=steps,  # noqa: E731
                                                batch=batch, extra=("--data.sample_log", str(tmp_path / "s"), *extra))
    cli_main(a(3, 8))  # 151 pairs, batch 8: 18 batches per epoch; 3 done
    assert _log_batches(tmp_path / "s") == [(0, 0), (0, 1), (0, 2)]
    cli = cli_main(a(6, 4, "--ckpt_path", "last", "--data.allow_replan", "true"))  # batch 4: 37 per epoch
    # 3/18 of the epoch -> batch 6 of 37 under the new plan; 3 more steps use batches 6, 7, 8
    assert _log_batches(tmp_path / "s")[3:] == [(0, 6), (0, 7), (0, 8)]
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.current.ready == 9
    dm_state = _ck(tmp_path / "ckpt" / "last.ckpt")["ShardDataModule"]
    assert dm_state["cursor"] == {"epoch": 0, "batches_done": 9}
    cli_main(a(8, 4, "--ckpt_path", "last"))  # a plain resume continues after them: nothing re-trained
    assert _log_batches(tmp_path / "s")[6:] == [(0, 9), (0, 10)]


def test_truncated_last_ckpt_names_itself_and_the_newest_intact_one(tiny_bert_dir, pair_shards, tmp_path, capsys):
    args = _base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path, steps=4,
                      extra=("--checkpoint.every_n_train_steps", "2", "--checkpoint.save_top_k", "-1"))
    cli_main(args)
    last = tmp_path / "ckpt" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])
    with pytest.raises(UserError, match=r"last.ckpt: cannot read the checkpoint, it is truncated or corrupt .*"
                                        r"newest intact checkpoint there is .*step0000004.ckpt"):
        cli_main(args + ["--trainer.max_steps", "6", "--ckpt_path", "last"])
    from ropebert.cli import main as cli

    assert cli(["fit", *args, "--trainer.max_steps", "6", "--ckpt_path", str(last)]) == 1
    err = capsys.readouterr().err
    assert "ropebert fit: error:" in err and "step0000004.ckpt" in err and "Traceback" not in err


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_orphaned_temp_checkpoints_are_removed_and_modes_follow_the_umask(tmp_path):
    dead, old = tmp_path / f".last.ckpt.tmp-{_dead_pid()}-x1.tmp", tmp_path / ".step0000003.ckpt.ab12cd.tmp"
    live = tmp_path / f".last.ckpt.tmp-{os.getpid()}-x2.tmp"
    recent_old_style = tmp_path / ".last.ckpt.zz99.tmp"
    for p in (dead, old, live, recent_old_style):
        p.write_bytes(b"a whole checkpoint")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    io = AtomicCheckpointIO()
    prev = os.umask(0o022)
    try:
        io.save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
        assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        io.save_checkpoint({"step": 2}, tmp_path / "other.ckpt")
        assert (tmp_path / "other.ckpt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(prev)
    assert not dead.exists() and not old.exists()
    assert live.exists() and recent_old_style.exists()  # being written / maybe being written
    assert remove_orphaned_temp_files(tmp_path) == []


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 2048"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_full_disk_while_checkpointing_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, failure):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def fail(checkpoint, f):
        f.write(b"partial")
        raise failure

    monkeypatch.setattr(AtomicCheckpointIO, "_write", staticmethod(fail))
    with pytest.raises(UserError, match=r"no space left on device writing .*last.ckpt \(the previous checkpoint"):
        io.save_checkpoint({"step": 2}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"] and _ck(path)["step"] == 1


def test_read_only_checkpoint_dir_is_one_line(tmp_path, monkeypatch):
    import tempfile

    def ro(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", ro)
    with pytest.raises(UserError, match="cannot write checkpoint .*: Read-only file system"):
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")


def test_non_finite_teacher_scores_in_old_shards_are_named(minilm_dir):
    from ropebert.shards.datamodule import BatchCollator

    c = BatchCollator(str(minilm_dir), "hard_negatives", 2, 16, 16, "query: ", "passage: ")
    ok = {"query": "q", "positive": "p", "negatives": ["a", "b"], "scores": [0.9, 0.1, 0.2]}
    bad = dict(ok, scores=[0.9, float("nan"), 0.2])
    assert c([("k1", ok, "shard-000000.tar")])["teacher_scores"].shape == (1, 3)
    with pytest.raises(ValueError, match=r"shard-000000.tar:k2: non-finite teacher scores"):
        c([("k1", ok, "shard-000000.tar"), ("k2", bad, "shard-000000.tar")])
