"""`load_source("org/name")`: Hugging Face Hub ids through the huggingface_hub cache, offline (nothing downloads)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ropebert.errors import UserError
from ropebert.model import RopeBertModel
from ropebert.model.load import load_source
from tests.conftest import tiny_config

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An HF_HUB_CACHE laid out as huggingface_hub writes it (models--org--name/{blobs,refs/main,snapshots/REV}),
    with huggingface_hub in offline mode."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _cache_model(cache: Path, repo: str, src: Path) -> None:
    """Files as blobs, symlinked from the snapshot (what snapshot_download leaves behind)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap, blobs = root / "snapshots" / REV, root / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REV)
    for i, f in enumerate(sorted(p for p in src.rglob("*") if p.is_file())):
        blob = blobs / f"blob{i:04d}"
        shutil.copyfile(f, blob)
        target = snap / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(blob)


def test_hub_id_loads_from_the_offline_cache(offline_cache, tmp_path, minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    torch.manual_seed(0)
    model = RopeBertModel(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=512)).eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    _cache_model(offline_cache, "someorg/tiny-rope", src)

    for ref in ("someorg/tiny-rope", "someorg/tiny-rope@main", f"someorg/tiny-rope@{REV}"):
        got = load_source(ref)
        assert isinstance(got, RopeBertModel)
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), model.state_dict().values()))
    text = ["query: where are hub snapshots cached?"]
    torch.testing.assert_close(got.encode(text), model.encode(text, tokenizer=tok))  # its tokenizer comes along


def test_hub_id_not_cached_offline_is_a_clear_error(offline_cache):
    with pytest.raises(UserError, match=r"not in the huggingface_hub cache .* HF_HUB_OFFLINE is set"):
        load_source("someorg/not-cached")
    with pytest.raises(FileNotFoundError):  # not shaped like a hub id: a missing local path
        load_source("./runs/nope")


def test_cli_reports_an_uncached_hub_id_in_one_line(offline_cache, capsys):
    from ropebert.cli import main

    assert main(["eval", "passkey", "--model", "dwzhu/e5rope-base", "--lengths", "256"]) == 1
    err = capsys.readouterr().err
    assert "dwzhu/e5rope-base" in err and "HF_HUB_OFFLINE" in err and "Traceback" not in err
