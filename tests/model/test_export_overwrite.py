"""`ropebert export --overwrite` never loses anything: the source, a checkpoint directory and directories holding
files export did not write are refused before anything is touched; the output is swapped in whole."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from ropebert.cli import main as cli
from ropebert.errors import InputError, UserError
from ropebert.model import RopeBertModel
from ropebert.model.export import MARKER, export_model
from ropebert.model.load import load_source
from ropebert.model.load.checkpoint import CHECKPOINT_KEY, checkpoint_payload, tokenizer_files
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def tok(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


@pytest.fixture
def tiny(tok):
    torch.manual_seed(0)
    m = RopeBertModel(tiny_config(vocab_size=tok.vocab_size)).eval()
    m.tokenizer = tok
    return m


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_in_place_re_export_is_refused_and_keeps_the_model(tiny, tmp_path, capsys):
    out = export_model(tiny, tmp_path / "exp")
    before = _snapshot(out)
    assert cli(["export", str(out), "--out", str(out), "--overwrite"]) == 1
    assert "is the source directory" in capsys.readouterr().err
    assert cli(["export", str(out), "--out", str(out / "sub"), "--overwrite"]) == 1
    assert "inside the source" in capsys.readouterr().err
    assert _snapshot(out) == before and isinstance(load_source(str(out)), RopeBertModel)


def test_out_equal_to_the_checkpoint_directory_is_refused(tiny, tok, tmp_path, capsys):
    ck = tmp_path / "ckpt"
    ck.mkdir()
    state = {"model." + k: v for k, v in tiny.state_dict().items()}
    payload = {CHECKPOINT_KEY: checkpoint_payload(tiny, tokenizer_files(tok)), "state_dict": state}
    for name in ("step0000003.ckpt", "last.ckpt"):
        torch.save(payload, ck / name)
    before = _snapshot(ck)
    assert cli(["export", str(ck / "last.ckpt"), "--out", str(ck), "--overwrite"]) == 1
    assert "is the source directory" in capsys.readouterr().err
    assert _snapshot(ck) == before
    assert cli(["export", str(ck / "last.ckpt"), "--out", str(tmp_path / "hf")]) == 0  # beside it: fine


def test_unrelated_files_are_never_deleted(tiny, tmp_path, capsys):
    out = export_model(tiny, tmp_path / "exp")
    (out / "my-notes.txt").write_text("not export's")
    with pytest.raises(FileExistsError, match="my-notes.txt"):
        export_model(tiny, out, overwrite=True)
    assert (out / "my-notes.txt").read_text() == "not export's"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "data.bin").write_bytes(b"1")
    assert cli(["export", str(out), "--out", str(plain), "--overwrite"]) == 1
    assert "not the output of a previous export" in capsys.readouterr().err
    assert sorted(p.name for p in plain.iterdir()) == ["data.bin"]
    (out / "my-notes.txt").unlink()
    export_model(tiny, out, overwrite=True)  # a previous export (only its own files) is replaced
    assert (out / MARKER).is_file()


def test_tokenizer_is_read_before_anything_is_replaced(tiny, tmp_path):
    out = export_model(tiny, tmp_path / "exp")
    before = _snapshot(out)
    bare = RopeBertModel(tiny.config)  # no tokenizer attached, none on disk
    with pytest.raises(InputError, match="no tokenizer"):
        export_model(bare, out, overwrite=True)
    assert _snapshot(out) == before


def test_full_disk_mid_export_keeps_the_old_export_and_no_temp_dir(tiny, tmp_path, monkeypatch):
    out = export_model(tiny, tmp_path / "exp")
    before = _snapshot(out)

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "tokenizer.json"))

    monkeypatch.setattr(type(tiny.tokenizer), "save_pretrained", full)
    with pytest.raises(UserError, match="no space left on device writing .*tokenizer.json"):
        export_model(tiny, out, overwrite=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
