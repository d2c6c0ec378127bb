"""`make gpu-check GPU_CHECK_ARGS=--dry-run` on CPU: the plan, every import and every command line of the GPU check
(bench/gpu_check.py) are fine without a CUDA device, and nothing is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GPU_CHECK = REPO / "bench" / "gpu_check.py"


def _run(*args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, str(GPU_CHECK), *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_dry_run_checks_the_plan_on_cpu(minilm_dir, monkeypatch):
    monkeypatch.setenv("ROPEBERT_REQUIRE_TESTS", "1")  # as under `make test`: the checks must not inherit it
    before = sorted(p.name for p in REPO.iterdir())
    r = _run("--dry-run", "--tokenizer", str(minilm_dir))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    out = r.stdout
    for part in ("cuda_tests", "train_step", "batch_memory", "kernels", "fit"):
        assert f"imports for {part}" in out, out
    assert "[FAIL]" not in out and "dry run: all checks passed" in out, out
    assert "cuda-marked tests selected" in out
    for cmd in ("bench/train_step.py --device cuda --shape bert-base --pairs 256 --dtype bf16",
                "bench/batch_memory.py --device cuda --shape base --batches 1024 4096 16384",
                "bench/kernels.py --device cuda --lengths 4096,8192,16384,32768",
                "--trainer.precision bf16-mixed", "--ckpt_path last", "shards build --format docstrings"):
        assert cmd in out, cmd
    assert sorted(p.name for p in REPO.iterdir()) == before  # no artifacts/, no report


def test_bad_command_lines_are_refused_clearly(tmp_path):
    r = _run("--cap", "kernels=abc", "--dry-run")
    assert r.returncode == 2 and "--cap kernels=abc: expected PART=SECONDS" in r.stderr, r.stderr
    r = _run("--budget", "0", "--dry-run")
    assert r.returncode == 2 and "--budget must be > 0" in r.stderr, r.stderr
    r = _run("--install-wheels", str(tmp_path / "missing"))
    assert r.returncode == 2 and "not a directory" in r.stderr, r.stderr
    (tmp_path / "empty").mkdir()
    r = _run("--install-wheels", str(tmp_path / "empty"))
    assert r.returncode != 0 and "no *.whl there" in r.stderr, r.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    r = _run("--prepare-wheels", str(mine))
    assert r.returncode != 0 and "not written by --prepare-wheels" in r.stderr, r.stderr
    assert (mine / "notes.txt").read_text() == "keep"


def test_without_cuda_the_check_itself_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("this test checks the no-CUDA error path")
    r = _run("--out", str(tmp_path / "report"))
    assert r.returncode != 0 and "needs a CUDA device" in r.stderr and "--dry-run" in r.stderr, r.stderr
    assert not (tmp_path / "report").exists()
