"""`ropebert shards pack`: long-document pairs from short ones (lengths, fillers, determinism, bad input)."""

from __future__ import annotations

import json
import random

from ropebert.cli import main as cli
from ropebert.shards.format import iter_shard, load_manifest, shard_path
from ropebert.shards.pack import KEY_SUFFIX, SEPARATOR, pack_document


def _rows(n=40):
    # passage i: i % 5 + 3 words, all distinct
    return [{"q": f"question {i}", "p": " ".join(f"w{i}x{j}" for j in range(i % 5 + 3)), "id": f"d{i}"} for i in range(n)]


def _shards(tmp_path, name="in", rows=None):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in (rows or _rows())))
    assert cli(["shards", "build", "--input", str(src), "--format", "jsonl", "--query-field", "q", "--passage-field",
                "p", "--key-field", "id", "--out", str(tmp_path / name), "--no-progress"]) == 0
    return tmp_path / name


def _read(d):
    return [(k, s) for e in load_manifest(d)["shards"] for k, s in iter_shard(shard_path(d, e))]


def _pack(src, out, *extra):
    return cli(["shards", "pack", "--input", str(src), "--out", str(out), "--min-length", "20", "--max-length", "30",
                "--limit", "10", *extra])


def test_pack_document_rules():
    fillers = [" ".join(["f"] * n) for n in (4, 9, 2, 7, 30)]
    for seed in range(20):
        doc, n, used, pos = pack_document("p q r", fillers, 12, 14, random.Random(seed), lambda t: len(t.split()))
        parts = doc.split(SEPARATOR)
        assert parts[pos] == "p q r" and len(parts) == used + 1
        assert n == len(doc.split()) <= 14  # never past the limit (the 30-word filler never fits)
        assert n >= 12 or all(len(f.split()) + n > 14 for f in fillers if f not in parts)  # stops once at the target
    # a positive already at the target gets no filler; one over the limit stays whole
    assert pack_document("a " * 15, fillers, 12, 14, random.Random(0), lambda t: len(t.split()))[2] == 0


def test_pack_shards_fillers_keys_and_determinism(tmp_path, capsys):
    src = _shards(tmp_path)
    assert _pack(src, tmp_path / "long") == 0
    assert "wrote 10 packed pairs" in capsys.readouterr().out
    m = load_manifest(tmp_path / "long")
    assert m["kind"] == "pairs" and m["total_samples"] == 10
    assert m["source"]["format"] == "pack" and m["source"]["unit"] == "words" and m["source"]["filler_passages"] == 30
    by_key = {r["id"]: r for r in _rows()}
    rows = _read(tmp_path / "long")
    assert all(k.endswith(KEY_SUFFIX) for k, _ in rows)  # unique beside the input's keys in a mixture
    packed_positives = {by_key[k.removesuffix(KEY_SUFFIX)]["p"] for k, _ in rows}
    for key, s in rows:
        r = by_key[key.removesuffix(KEY_SUFFIX)]
        assert s["query"] == r["q"]
        parts = s["positive"].split(SEPARATOR)
        assert parts[s["meta"]["pack"]["position"]] == r["p"]
        assert 20 <= len(s["positive"].split()) <= 30 and s["meta"]["pack"]["words"] == len(s["positive"].split())
        # no packed document holds another packed sample's positive: in-batch negatives stay negatives
        assert not (set(parts) - {r["p"]}) & packed_positives
    assert _pack(src, tmp_path / "again") == 0
    assert _read(tmp_path / "again") == rows  # same input + arguments: same shards
    assert _pack(src, tmp_path / "other", "--seed", "1") == 0
    assert _read(tmp_path / "other") != rows


def test_pack_counts_tokens_with_a_tokenizer(tmp_path, minilm_dir):
    src = _shards(tmp_path)
    assert _pack(src, tmp_path / "long", "--tokenizer", str(minilm_dir)) == 0
    m = load_manifest(tmp_path / "long")
    assert m["source"]["unit"] == "tokens" and m["source"]["tokenizer"] == str(minilm_dir)
    from ropebert.shards.datamodule import load_fast_tokenizer

    tok = load_fast_tokenizer(str(minilm_dir))
    for _, s in _read(tmp_path / "long"):
        n = len(tok(s["positive"], add_special_tokens=False)["input_ids"])
        assert n <= 30 and s["meta"]["pack"]["tokens"] >= n - s["meta"]["pack"]["fillers"]  # separators add none


def test_pack_bad_input(tmp_path, capsys):
    src = _shards(tmp_path)
    cases = [
        (["--input", str(tmp_path / "nope")], "does not exist"),
        (["--min-length", "0"], "need 1 <= min <= max"),
        (["--min-length", "40"], "need 1 <= min <= max"),
        (["--limit", "40"], "no passage is left to fill"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--tokenizer", str(tmp_path)], "not a tokenizer"),
    ]
    for extra, msg in cases:
        args = ["shards", "pack", "--input", str(src), "--out", str(tmp_path / "o"), "--min-length", "20",
                "--max-length", "30", "--limit", "10"] + extra
        capsys.readouterr()
        assert cli(args) == 1, extra
        assert msg in capsys.readouterr().err, extra
        assert not (tmp_path / "o").exists(), extra  # nothing written on a refused run
    # output inside the input, or an existing directory it did not write: refused
    assert cli(["shards", "pack", "--input", str(src), "--out", str(src / "sub"), "--min-length", "2",
                "--max-length", "3"]) == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    assert _pack(src, tmp_path / "mine", "--overwrite") == 1
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x"
    # hard-negative shards are not pairs
    hn = tmp_path / "hn.jsonl"
    hn.write_text("".join(json.dumps({"q": f"q{i}", "p": f"p{i}", "n": [f"n{i}"]}) + "\n" for i in range(5)))
    assert cli(["shards", "build", "--input", str(hn), "--format", "jsonl", "--query-field", "q", "--passage-field",
                "p", "--negatives-field", "n", "--out", str(tmp_path / "hn"), "--no-progress"]) == 0
    capsys.readouterr()
    assert _pack(tmp_path / "hn", tmp_path / "o") == 1
    assert "reads pair shards" in capsys.readouterr().err
    # a re-run over its own output replaces it (--overwrite), otherwise refuses
    assert _pack(src, tmp_path / "long") == 0
    assert _pack(src, tmp_path / "long") == 1
    assert _pack(src, tmp_path / "long", "--overwrite") == 0


def test_pack_reads_a_mixture(tmp_path):
    a = _shards(tmp_path, "a", _rows(20))
    b = _shards(tmp_path, "b", [dict(r, id=f"b{r['id']}", p=r["p"] + " b") for r in _rows(20)])
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"sources:\n  - {{path: {a}}}\n  - {{path: {b}}}\n")
    assert _pack(mix, tmp_path / "long") == 0
    m = load_manifest(tmp_path / "long")
    assert set(m["source"]["input_manifests"]) == {str(a), str(b)} and m["total_samples"] == 10


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_full_disk_mid_pack_keeps_the_previous_output(tmp_path, monkeypatch, capsys):
    """ENOSPC while shards are written: exit 1 with a one-line message; the previous --out is untouched and no
    temporary directory is left beside it."""
    import errno

    from ropebert.shards import format as fmt

    src = _shards(tmp_path)
    assert _pack(src, tmp_path / "long") == 0
    before = _snapshot(tmp_path / "long")
    calls = []

    def full(self, key, sample):
        calls.append(key)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, sample)

    real = fmt.ShardWriter.write
    monkeypatch.setattr(fmt.ShardWriter, "write", full)
    capsys.readouterr()
    assert _pack(src, tmp_path / "long", "--seed", "1", "--overwrite") == 1
    assert "no space left on device" in capsys.readouterr().err
    assert _snapshot(tmp_path / "long") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "in.jsonl", "long"]


KILLER = """
import os, signal, sys
from ropebert.shards import format as fmt
real, n = fmt.ShardWriter.write, [0]
def write(self, key, sample):
    n[0] += 1
    if n[0] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, key, sample)
fmt.ShardWriter.write = write
from ropebert.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_mid_pack_then_rerun(tmp_path):
    """SIGKILL while shards are written: the previous --out is untouched; the re-run clears the dead run's
    temporary directory and writes exactly what an uninterrupted run writes."""
    import subprocess
    import sys

    src = _shards(tmp_path)
    assert _pack(src, tmp_path / "long") == 0
    before = _snapshot(tmp_path / "long")
    args = ["shards", "pack", "--input", str(src), "--out", str(tmp_path / "long"), "--min-length", "20",
            "--max-length", "30", "--limit", "10", "--seed", "1", "--overwrite"]
    r = subprocess.run([sys.executable, "-c", KILLER, *args], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    assert _snapshot(tmp_path / "long") == before
    assert any(p.name.startswith(".long.tmp-") for p in tmp_path.iterdir())  # the dead run's, aside
    assert cli(args) == 0
    assert cli(args[:5] + [str(tmp_path / "clean")] + args[6:-1]) == 0
    assert _snapshot(tmp_path / "long") == _snapshot(tmp_path / "clean") != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "in", "in.jsonl", "long"]
