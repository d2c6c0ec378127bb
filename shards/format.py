# Copyright ropebert contributors. Apache-2.0.
"""The on-disk shard format: webdataset tar shards + manifest.json.

One training example = one tar member `<key>.json` (webdataset groups members by the part of the name before
the first dot, so keys never contain dots). Its JSON object is

    pairs:           {"query": str, "positive": str, "meta": {...}?}
    hard_negatives:  {"query": str, "positive": str, "negatives": [str] * K, "scores": [float] * (1+K)?, ...}

so a stage-2 query travels with its positive, its K negatives and its teacher scores (positive first) in ONE
sample and can never be separated from them. Shards are written deterministically (sorted order, mtime 0,
uid/gid 0), so the same input gives byte-identical shards and sha256s.

manifest.json:
    {"format": "ropebert-shards", "version": 1, "kind": "pairs"|"hard_negatives", "schema": {...},
     "source": {...free-form description of the input...},
     "shards": [{"url": "shard-000000.tar", "samples": n, "bytes": b, "sha256": "..."}],
     "total_samples": N, "total_bytes": B, "skipped": {"count": n, "by_reason": {...}, "examples": [...]}}
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator, Optional

from ropebert.errors import InputError

MANIFEST = "manifest.json"
FORMAT_NAME = "ropebert-shards"
FORMAT_VERSION = 1
KINDS = ("pairs", "hard_negatives")
SHARD_PATTERN = "shard-{:06d}.tar"
KEY_RE = re.compile(r"^[A-Za-z0-9_\-:@+=,]+$")
MAX_KEY_LEN = 100 - len(".json")  # a USTAR member name holds 100 bytes (keys have no '/' to split on)

SCHEMAS = {
    "pairs": {"member": "<key>.json", "fields": {"query": "str", "positive": "str", "meta": "object (optional)"}},
    "hard_negatives": {
        "member": "<key>.json",
        "fields": {
            "query": "str",
            "positive": "str",
            "negatives": "list[str] (num_negatives)",
            "scores": "list[float] (1 + num_negatives, positive first; optional teacher scores)",
            "meta": "object (optional)",
        },
    },
}


def check_key(key: str) -> str:
    """Raise ValueError unless `key` is a valid sample key (non-empty, no dots, no slashes, no spaces)."""
    if not isinstance(key, str) or not key or not KEY_RE.match(key):
        raise InputError(f"invalid sample key {key!r}: keys must be non-empty and use only [A-Za-z0-9_-:@+=,] (no dots)")
    if len(key) > MAX_KEY_LEN:
        raise InputError(f"sample key {key[:40]!r}... is {len(key)} characters; a tar member name allows {MAX_KEY_LEN}")
    return key


def sanitize_key(text: str) -> str:
    """Map an arbitrary id to a valid key: every character outside the key alphabet (dots included) becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_\-:@+=,]", "_", str(text)) or "_"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def parse_size(text: str | int | None) -> Optional[int]:
    """'64MB' / '1.5GiB' / '1000000' -> bytes (None passes through)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise InputError(f"cannot parse size {text!r} (examples: 500000, 64MB, 1GiB)")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    return int(num * base ** " KMGT".index(unit or " "))


# -- writing ------------------------------------------------------------------------------------------------


class ShardWriter:
    """Write samples into numbered tar shards (`shard-000000.tar`, ...), rolling over at maxcount samples or
    maxsize bytes. Each shard is written to a `.tmp` name and renamed when complete. `close()` returns the
    manifest entries of the shards written."""

    def __init__(self, out_dir: str | os.PathLike, maxcount: int = 10000, maxsize: Optional[int] = None,
                 start_index: int = 0):
        if maxcount < 1:
            raise InputError(f"maxcount must be >= 1, got {maxcount}")
        if maxsize is not None and maxsize < 1:
            raise InputError(f"maxsize must be >= 1 byte, got {maxsize}")
        self.out = Path(out_dir)
        self.maxcount, self.maxsize = maxcount, maxsize
        self.index = start_index
        self.entries: list[dict] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._count = 0
        self._bytes = 0

    def _open(self) -> None:
        name = SHARD_PATTERN.format(self.index)
        self._tmp = self.out / (name + ".tmp")
        self._final = self.out / name
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0
        self._bytes = 0

    def write(self, key: str, sample: dict) -> None:
        check_key(key)
        data = json.dumps(sample, ensure_ascii=False, sort_keys=True).encode("utf-8")
        if self._tar is not None and self.maxsize is not None and self._count and self._bytes + len(data) + 1024 > self.maxsize:
            self.finish_shard()
        if self._tar is None:
            self._open()
        info = tarfile.TarInfo(name=f"{key}.json")
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += len(data) + 1024
        if self._count >= self.maxcount:
            self.finish_shard()

    def finish_shard(self) -> Optional[dict]:
        if self._tar is None:
            return None
        self._tar.close()
        self._tar = None
        os.replace(self._tmp, self._final)
        entry = {
            "url": self._final.name,
            "samples": self._count,
            "bytes": self._final.stat().st_size,
            "sha256": sha256_file(self._final),
        }
        self.entries.append(entry)
        self.index += 1
        return entry

    def close(self) -> list[dict]:
        self.finish_shard()
        return self.entries


def write_manifest(out_dir: str | os.PathLike, *, kind: str, shards: list[dict], source: dict,
                   skipped: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
    if kind not in KINDS:
        raise InputError(f"unknown shard kind {kind!r} (known: {KINDS})")
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": kind,
        "schema": SCHEMAS[kind],
        "source": source,
        "shards": shards,
        "total_samples": sum(s["samples"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "skipped": skipped or {"count": 0, "by_reason": {}, "examples": []},
    }
    if extra:
        manifest.update(extra)
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return manifest


def shards_owned(d: Path) -> Optional[set]:
    """What a shard directory's manifest says it holds (manifest.json + the relative shard files it lists), or
    None when there is no readable ropebert manifest: the `owned` rule of `--overwrite` for shard outputs."""
    path = Path(d) / MANIFEST
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME or not isinstance(m.get("shards"), list):
        return None
    urls = {s.get("url") for s in m["shards"] if isinstance(s, dict)}
    return {MANIFEST} | {u for u in urls if isinstance(u, str) and "/" not in u and not os.path.isabs(u)}


# -- reading ------------------------------------------------------------------------------------------------


def load_manifest(shard_dir: str | os.PathLike) -> dict:
    """Read and validate DIR/manifest.json (clear errors for a missing or malformed manifest)."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest.json (build shards with `ropebert shards build`)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise InputError(f"{path}: not a ropebert shard manifest (format={m.get('format') if isinstance(m, dict) else None!r})")
    if m.get("kind") not in KINDS:
        raise InputError(f"{path}: unknown kind {m.get('kind')!r} (known: {KINDS})")
    shards = m.get("shards")
    if not isinstance(shards, list) or not shards:
        raise InputError(f"{path}: manifest lists no shards")
    for i, s in enumerate(shards):
        for f, t in (("url", str), ("samples", int), ("bytes", int), ("sha256", str)):
            if not isinstance(s.get(f), t):
                raise InputError(f"{path}: shards[{i}] lacks a valid {f!r}")
    return m


def manifest_hash(manifest: dict) -> str:
    """Identity of the data a plan is computed from: kind + (url, samples, sha256) of every shard, in order."""
    ident = {"kind": manifest["kind"], "shards": [[s["url"], s["samples"], s["sha256"]] for s in manifest["shards"]]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def shard_path(shard_dir: str | os.PathLike, entry: dict) -> Path:
    url = entry["url"]
    return Path(url) if os.path.isabs(url) else Path(shard_dir) / url


def iter_shard(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield (key, sample) from one shard, in file order (sequential read)."""
    try:
        with tarfile.open(path, "r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, ext = info.name.partition(".")
                if ext != "json":
                    raise InputError(f"{path}: unexpected member {info.name!r} (expected <key>.json)")
                data = tar.extractfile(info).read()
                try:
                    yield key, json.loads(data.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise InputError(f"{path}:{key}: corrupt sample ({e})") from None
    except tarfile.TarError as e:
        raise InputError(f"{path}: unreadable tar shard ({e})") from None


def read_shard(path: str | os.PathLike) -> list[tuple[str, dict]]:
    return list(iter_shard(path))


def verify_shards(shard_dir: str | os.PathLike, manifest: Optional[dict] = None, progress: bool = False) -> list[str]:
    """Re-read every shard against the manifest. Returns one problem line per bad shard, per shard listed twice,
    per shard file on disk the manifest does not list, and for wrong totals (empty list = OK)."""
    manifest = manifest or load_manifest(shard_dir)
    problems = []
    entries = manifest["shards"]
    seen: dict = {}
    for i, e in enumerate(entries):
        p = shard_path(shard_dir, e).resolve()
        if p in seen:
            problems.append(f"{e['url']}: listed twice in {MANIFEST} (shards[{seen[p]}] and shards[{i}]): it would "
                            "be read twice per epoch")
        seen.setdefault(p, i)
    for p in sorted(Path(shard_dir).glob("*.tar")):
        if p.resolve() not in seen:
            problems.append(f"{p.name}: shard file on disk but not listed in {MANIFEST} (it would be ignored)")
    for field, what in (("total_samples", "samples"), ("total_bytes", "bytes")):
        total = sum(e[what] for e in entries)
        if manifest.get(field) != total:
            problems.append(f"{MANIFEST}: {field} is {manifest.get(field)!r} but its shards hold {total} {what}")
    it = entries
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(entries, desc="verify", unit="shard")
    for entry in it:
        p = shard_path(shard_dir, entry)
        if not p.is_file():
            problems.append(f"{entry['url']}: missing")
            continue
        size = p.stat().st_size
        if size < entry["bytes"]:
            problems.append(f"{entry['url']}: truncated ({size} of {entry['bytes']} bytes)")
            continue
        if size > entry["bytes"]:
            problems.append(f"{entry['url']}: altered (size {size} bytes, manifest says {entry['bytes']})")
            continue
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            problems.append(f"{entry['url']}: altered (sha256 {digest[:12]}…, manifest says {entry['sha256'][:12]}…)")
            continue
        try:
            n = sum(1 for _ in iter_shard(p))
        except ValueError as e:
            problems.append(f"{entry['url']}: unreadable ({e})")
            continue
        if n != entry["samples"]:
            problems.append(f"{entry['url']}: holds {n} samples, manifest says {entry['samples']}")
    return problems
