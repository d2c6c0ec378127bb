"""`ropebert fit` end to end on CPU: stage 1 -> export, stage 2 from the stage-1 checkpoint, exact resume after
SIGKILL (2 ranks, gloo), crash-safe checkpoints, two torchrun "nodes", non-finite handling, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ropebert.model import from_bert
from ropebert.pipelines.train.fit import cli_main
from ropebert.pipelines.train.strategy import AtomicCheckpointIO
from tests.conftest import make_mixture, make_pair_shards

REPO = Path(__file__).resolve().parents[3]


def _base_args(init, shards, tok, out: Path, *, steps=4, batch=8, extra=()):
    return [
        "--model.init_from", str(init), "--model.warmup_steps", "2", "--model.gradcache_chunk", "4",
        "--model.lr", "1e-3",
        "--data.train_dir", str(shards), "--data.tokenizer", str(tok), "--data.batch_size", str(batch),
        "--data.num_workers", "0", "--data.max_query_length", "16", "--data.max_passage_length", "32",
        "--trainer.max_steps", str(steps), "--trainer.accelerator", "cpu", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--checkpoint.dirpath", str(out / "ckpt"), "--checkpoint.every_n_train_steps", "3",
        "--model.step_log", str(out / "steps"), "--trainer.default_root_dir", str(out), *extra,
    ]


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _last_per_step(path: Path, key=("epoch", "batch")) -> dict:
    """Last line per (epoch, batch): a resumed run redoes the steps after its checkpoint."""
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[tuple(rec[k] for k in key)] = rec
    return out


# -- single process -------------------------------------------------------------------------------------------


def test_stage1_fit_export_and_stage2(tiny_bert_dir, pair_shards, hn_shards, tmp_path):
    from ropebert.model import RopeBertModel
    from ropebert.model.export import main as export_main

    cli = cli_main(_base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path / "s1", steps=4))
    assert cli.trainer.global_step == 4
    ckpt = tmp_path / "s1" / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    steps = [json.loads(x) for x in (tmp_path / "s1" / "steps" / "step-rank-0.jsonl").read_text().splitlines()]
    assert [s["global_step"] for s in steps] == [1, 2, 3, 4] and all(not s["skipped"] for s in steps)
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    # the trained weights moved away from the converted initialisation
    init = from_bert(str(tiny_bert_dir))
    trained = cli.model.model
    assert (trained.encoder.layer[0].attention.self.query.weight - init.encoder.layer[0].attention.self.query.weight).abs().max() > 1e-4

    # checkpoint -> HF directory; same embeddings as the in-memory model
    assert export_main([str(ckpt), "--out", str(tmp_path / "exported")]) == 0
    exported = RopeBertModel.from_pretrained(str(tmp_path / "exported"))
    texts = ["query: what is a rotary embedding", "passage: " + "tokens " * 60]
    a = trained.eval().encode(texts, tokenizer=exported.tokenizer)
    b = exported.encode(texts)
    assert (a - b).abs().max().item() <= 1e-5

    # stage 2 from the stage-1 checkpoint, 7 hard negatives + distillation
    cli2 = cli_main(_base_args(ckpt, hn_shards, tiny_bert_dir, tmp_path / "s2", steps=3, batch=4, extra=(
        "--model.stage", "finetune", "--data.kind", "hard_negatives", "--model.teacher_temperature", "0.05")))
    assert cli2.trainer.global_step == 3
    s2 = [json.loads(x) for x in (tmp_path / "s2" / "steps" / "step-rank-0.jsonl").read_text().splitlines()]
    assert len(s2) == 3 and all(torch.isfinite(torch.tensor(s["loss"])) for s in s2)
    # stage 2 started from the stage-1 weights, not from the BERT initialisation
    w1 = torch.load(ckpt, weights_only=True)["state_dict"]["model.encoder.layer.0.attention.self.query.weight"]
    s2_init = torch.load(tmp_path / "s2" / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert (s2_init["model.encoder.layer.0.attention.self.query.weight"] - w1).abs().max() < 0.05


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tiny_bert_dir, pair_shards, tmp_path, monkeypatch):
    from ropebert.pipelines.train import module as module_mod

    real = module_mod.RopeBertContrastive._loss_fn
    bad_batches = {1}

    def patched(self, batch, *args):
        fn = real(self, batch, *args)
        idx = self.trainer.fit_loop.epoch_loop.batch_idx

        def wrapped(embs):
            loss, stats = fn(embs)
            return (loss * float("nan"), stats) if idx in bad_batches else (loss, stats)

        return wrapped

    monkeypatch.setattr(module_mod.RopeBertContrastive, "_loss_fn", patched)
    cli = cli_main(_base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path / "a", steps=4))
    steps = [json.loads(x) for x in (tmp_path / "a" / "steps" / "step-rank-0.jsonl").read_text().splitlines()]
    assert [s["skipped"] for s in steps] == [False, True, False, False, False]  # 5 batches for 4 optimizer steps
    assert cli.model.nonfinite_total == 1 and cli.trainer.global_step == 4

    bad_batches.update(range(100))
    with pytest.raises(RuntimeError, match="3 consecutive non-finite"):
        cli_main(_base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path / "b", steps=4,
                            extra=("--model.max_nonfinite", "3")))


# -- bad input: clear errors before training -------------------------------------------------------------------


def test_unknown_config_key_is_an_error(tiny_bert_dir, pair_shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(_base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path, extra=("--model.learning_rate", "1")))
    assert e.value.code != 0
    assert "learning_rate" in capsys.readouterr().err
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  init_from: x\n  bogus_key: 1\n")
    with pytest.raises(SystemExit):
        cli_main(["--config", str(cfg)])
    assert "bogus_key" in capsys.readouterr().err


def test_init_model_that_is_not_bert(tmp_path, pair_shards, tiny_bert_dir):
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ValueError, match="gpt2"):
        cli_main(_base_args(gpt, pair_shards, tiny_bert_dir, tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli_main(_base_args(tmp_path / "nope", pair_shards, tiny_bert_dir, tmp_path))


def test_stage2_on_pair_shards_is_an_error(tiny_bert_dir, pair_shards, tmp_path):
    with pytest.raises(ValueError, match="hard-negative shards"):
        cli_main(_base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path, extra=(
            "--model.stage", "finetune", "--data.kind", "hard_negatives")))
    with pytest.raises(ValueError, match="stage 2 needs hard-negative shards"):
        cli_main(_base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path, extra=("--model.stage", "finetune")))


def test_resume_with_other_batch_size_or_data_is_refused(tiny_bert_dir, pair_shards, hn_shards, tmp_path):
    cli_main(_base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path, steps=3))
    with pytest.raises(ValueError, match="batch_size"):
        cli_main(_base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path, steps=6, batch=4,
                            extra=("--ckpt_path", "last")))
    other = tmp_path / "other-shards"
    make_pair_shards(other, [40, 60])
    with pytest.raises(ValueError, match="manifest"):
        cli_main(_base_args(tiny_bert_dir, other, tiny_bert_dir, tmp_path, steps=6, extra=("--ckpt_path", "last")))


def test_resume_with_a_changed_or_dropped_teacher_is_refused(tiny_bert_dir, pair_shards, tmp_path):
    """The checkpoint records the teacher's content hash; a resume whose teacher files differ (or that has no
    teacher) stops before any step, naming both hashes. The same files under another path resume."""
    import shutil

    from ropebert.errors import InputError

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_bert_dir, teacher)
    run = lambda t, steps, resume: cli_main(_base_args(  # noqa: E731
        tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path / "run", steps=steps,
        extra=(*(("--model.teacher", str(t), "--model.teacher_embed_weight", "1.0") if t else ()),
               *(("--ckpt_path", "last") if resume else ()))))
    run(teacher, 3, False)
    ck = tmp_path / "run" / "ckpt" / "last.ckpt"
    before = ck.read_bytes()
    cfg = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps(dict(cfg, layer_norm_eps=1e-5)))
    changed = r"the teacher changed since the checkpoint was written \(checkpoint: .* sha256 [0-9a-f]{12}; now: "
    with pytest.raises(InputError, match=changed + r".* sha256 [0-9a-f]{12}\)"):
        run(teacher, 6, True)
    with pytest.raises(InputError, match=changed + r"None sha256 -\)"):
        run(None, 6, True)
    assert ck.read_bytes() == before  # refused before a step, nothing written
    moved = tmp_path / "teacher-copy"
    shutil.copytree(tiny_bert_dir, moved)
    run(moved, 6, True)
    assert torch.load(ck, weights_only=True, map_location="cpu")["global_step"] == 6


def test_print_config(tiny_bert_dir, capsys):
    for cfg in ("configs/pretrain.yaml", "configs/finetune.yaml", "configs/demo/pretrain.yaml", "configs/demo/finetune.yaml",
                "configs/demo/pretrain-long.yaml"):
        with pytest.raises(SystemExit) as e:
            cli_main(["--config", str(REPO / cfg), "--print_config"])
        assert e.value.code in (0, None)
        out = capsys.readouterr().out
        assert "init_from" in out and "strategy" in out
    pre = (REPO / "configs/pretrain.yaml").read_text()
    assert "batch_size: 512" in pre and "num_nodes: 4" in pre and "devices: 8" in pre  # 8 x 4 x 512 = 16,384
    assert "max_steps: 20000" in pre and "lr: 2.0e-4" in pre and "warmup_steps: 1000" in pre


# -- crash-safe checkpoints ------------------------------------------------------------------------------------


class _Boom(Exception):
    pass


def test_crash_while_writing_checkpoint_keeps_previous(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(10)}, path)

    def half_then_crash(checkpoint, f):
        f.write(b"\x80\x02partial checkpoint bytes")
        raise _Boom("disk full / killed while writing")

    monkeypatch.setattr(AtomicCheckpointIO, "_write", staticmethod(half_then_crash))
    with pytest.raises(_Boom):
        io.save_checkpoint({"step": 2, "w": torch.arange(20)}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left behind


KILL_IN_WRITE = Path(__file__).with_name("kill_in_write.py")


def test_sigkill_during_checkpoint_write_then_resume(tiny_bert_dir, pair_shards, tmp_path):
    args = _base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path, steps=8, extra=("--checkpoint.save_last", "true"))
    # checkpoint writes at step 3: step0000003.ckpt, last.ckpt; at step 6: killed while writing the first file
    r = subprocess.run([sys.executable, str(KILL_IN_WRITE), *args], env=dict(_env(), KILL_AT_WRITE="3"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    last = tmp_path / "ckpt" / "last.ckpt"
    ck = torch.load(last, weights_only=True, map_location="cpu")
    assert ck["global_step"] == 3
    cli = cli_main(args + ["--ckpt_path", "last"])
    assert cli.trainer.global_step == 8


# -- 2 ranks, SIGKILL at an arbitrary step, resume: identical sample keys and losses ---------------------------


# the APE BERT the student is converted from, as its frozen teacher with every teacher term on
TEACHER_ARGS = ("--model.teacher_hidden_weight", "1", "--model.teacher_hidden_kind", "mse",
                "--model.teacher_embed_weight", "1", "--model.teacher_score_weight", "1")


def _two_rank_args(tiny_bert_dir, train_dir, out: Path, variant: str):
    extra = {"teacher": ("--model.teacher", str(tiny_bert_dir), *TEACHER_ARGS),
             # one run for both: an upcycled MoE student (4 experts, top-2; routers and aux term in the state) on a
             # homogeneous mixture (the plan's cursor and the sources' draws in the state)
             "mixture-moe": ("--model.moe.num_experts", "4", "--model.moe.top_k", "2", "--model.seed", "3")}
    return _base_args(tiny_bert_dir, train_dir, tiny_bert_dir, out, steps=14, batch=8, extra=(
        "--trainer.devices", "2", "--trainer.strategy", "ropebert_ddp", "--data.sample_log", str(out / "samples"),
        "--data.num_workers", "1", *extra[variant]))


def _fit_cmd(args):
    return [sys.executable, "-m", "ropebert", "fit", *args]


def _run_ranks(cmd, timeout=300) -> subprocess.CompletedProcess:
    """Run a multi-rank fit in its own process group. A run that outlives `timeout` (it takes ~20 s) is stalled:
    every process of the group (ranks, their data workers) is sent SIGABRT, whose fault handler prints each one's
    Python stack, and the test fails with those stacks."""
    p = subprocess.Popen(cmd, env=dict(_env(), PYTHONFAULTHANDLER="1"), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGABRT)
        time.sleep(5)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = p.communicate()
        pytest.fail(f"the run stalled for {timeout} s; the stacks of its processes:\n{out[-12000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, out)


@pytest.fixture
def two_rank_mixture(tmp_path):
    """Three homogeneous sources for 2 ranks x 8 (every source holds at least one global batch of 16)."""
    return make_mixture(tmp_path / "mixture")


@pytest.mark.slow
# "teacher" is the plain run plus a frozen teacher (same data, same epoch crossing), so it also covers the run
# without one; "mixture-moe" covers the mixture plan's and the routers' state
@pytest.mark.parametrize("variant", ["teacher", "mixture-moe"])
def test_two_rank_sigkill_resume_is_bitwise_identical(tiny_bert_dir, pair_shards, tmp_path, variant, request):
    data = request.getfixturevalue("two_rank_mixture") if variant == "mixture-moe" else pair_shards
    ref, cut = tmp_path / "uninterrupted", tmp_path / "killed"
    r = _run_ranks(_fit_cmd(_two_rank_args(tiny_bert_dir, data, ref, variant)))
    assert r.returncode == 0, r.stderr[-3000:]

    # the same run, SIGKILLed (whole process group: both ranks) once rank 0 has logged its 5th step
    p = subprocess.Popen(_fit_cmd(_two_rank_args(tiny_bert_dir, data, cut, variant)), env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    log0 = cut / "steps" / "step-rank-0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if log0.is_file() and len(log0.read_text().splitlines()) >= 5:
            os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = len(log0.read_text().splitlines())
    assert killed_at < 14
    ck = torch.load(cut / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert 3 <= ck["global_step"] < 14

    r = _run_ranks(_fit_cmd(_two_rank_args(tiny_bert_dir, data, cut, variant) + ["--ckpt_path", "last"]))
    assert r.returncode == 0, r.stderr[-3000:]

    for rank in (0, 1):
        a = _last_per_step(ref / "samples" / f"rank-{rank}.jsonl")
        b = _last_per_step(cut / "samples" / f"rank-{rank}.jsonl")
        assert len(a) == 14 and a == b, f"rank {rank}: sample keys differ after resume"
        la = _last_per_step(ref / "steps" / f"step-rank-{rank}.jsonl")
        lb = _last_per_step(cut / "steps" / f"step-rank-{rank}.jsonl")
        assert [x["loss"] for x in la.values()] == [x["loss"] for x in lb.values()], f"rank {rank}: losses differ"
    if variant == "teacher":  # the teacher terms were on, and the resumed run checked the teacher's hash
        assert ck["ropebert_teacher"]["path"] == str(tiny_bert_dir) and len(ck["ropebert_teacher"]["sha256"]) == 64
        assert ck["hyper_parameters"]["teacher_hidden_weight"] == 1
    if variant == "mixture-moe":  # upcycled from the dense init; the logged losses above include the aux term
        assert ck["hyper_parameters"]["moe"]["num_experts"] == 4
        assert any(".moe.router.weight" in k for k in ck["state_dict"])
        # both ranks drew every step from one source; the resumed run drew the same ones
        src = [[rec["source"] for rec in _last_per_step(out / "samples" / f"rank-{r_}.jsonl").values()]
               for out in (ref, cut) for r_ in (0, 1)]
        assert src[0] == src[1] == src[2] == src[3] and set(src[0]) <= {"wiki", "code", "news"} and len(set(src[0])) > 1
        for rec in _last_per_step(ref / "samples" / "rank-0.jsonl").values():
            assert rec["source"] != "news" or all(k.startswith("s0_") for k in rec["keys"])
        return
    # the epoch boundary was crossed (151 pairs, 2 ranks x 8: 9 batches per rank per epoch)
    assert {k[0] for k in _last_per_step(ref / "samples" / "rank-0.jsonl")} == {0, 1}
    # every sample at most once per epoch across both ranks
    for epoch in (0, 1):
        keys = [k for r_ in (0, 1) for (e, _), rec in _last_per_step(ref / "samples" / f"rank-{r_}.jsonl").items()
                if e == epoch for k in rec["keys"]]
        assert len(keys) == len(set(keys))


# -- two torchrun "nodes" on 127.0.0.1 ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_nodes_agree_on_final_weights(tiny_bert_dir, pair_shards, tmp_path):
    port = _free_port()
    args = _base_args(tiny_bert_dir, pair_shards, tiny_bert_dir, tmp_path, steps=4, batch=4, extra=(
        "--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ropebert_ddp"))
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(Path(__file__).with_name("fit_digest.py")), str(tmp_path / "digests"), *args]
        procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    d = [(tmp_path / "digests" / f"digest-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert d[0] == d[1] and d[0][1:] == ["4", "2"]  # same weights, 4 steps, world size 2


# -- options applied outside the model: activation checkpointing, torch.compile, trained length ---------------


@pytest.mark.slow
def test_activation_checkpointing_and_compile_keep_gradients(tiny_bert_dir):
    from ropebert.pipelines.train.gradcache import contrastive_step
    from ropebert.pipelines.train.module import RopeBertContrastive
    from tests.conftest import padded_batch

    q, p = padded_batch([5, 9, 3, 7], vocab=1000, seed=1), padded_batch([12, 4, 8, 6], vocab=1000, seed=2)
    groups = {"query": {"input_ids": q[0], "attention_mask": q[1]}, "passage": {"input_ids": p[0], "attention_mask": p[1]}}
    grads = []
    for opts in ({}, {"activation_checkpointing": True}, {"compile": True}):
        torch.manual_seed(0)
        m = RopeBertContrastive(str(tiny_bert_dir), hidden_dropout=0.0, attention_dropout=0.0,
                                original_max_position_embeddings=64, **opts)
        m.configure_model()
        assert m.model.config.original_max_position_embeddings == 64
        if opts.get("activation_checkpointing"):
            assert m.model.encoder.gradient_checkpointing
        if opts.get("compile"):
            assert m._compiled
        res = contrastive_step(m._embed, groups, m._loss_fn({}), chunk_size=2)
        assert res.finite
        grads.append({k: v.grad.clone() for k, v in m.model.named_parameters()})
    for other in grads[1:]:  # same gradients up to fp32 reassociation (fused kernels under compile; tau = 0.01)
        for k in grads[0]:
            rel = (other[k] - grads[0][k]).norm() / grads[0][k].norm().clamp(min=1e-12)
            assert rel < 1e-4, (k, rel.item())
    with pytest.raises(ValueError, match="cannot be combined"):
        RopeBertContrastive(str(tiny_bert_dir), activation_checkpointing=True, compile=True)
