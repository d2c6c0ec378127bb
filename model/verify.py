# Copyright ropebert contributors. Apache-2.0.
"""Check an exported directory the way a user loads it: plain transformers and sentence-transformers in a fresh
interpreter that cannot import ropebert (`reload_check.py`), against ropebert's own encode.

`ropebert export SRC --out DIR --verify` runs `verify_export(DIR)` after writing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from ropebert.errors import UserError

from .load import load_source

RELOAD_SCRIPT = Path(__file__).resolve().with_name("reload_check.py")
DEFAULT_TEXTS = (
    "query: how do I parse command line arguments?",
    "passage: " + "Rotary embeddings rotate query and key pairs by position-dependent angles. " * 120,
)


def run_fresh_reload(model_dir: str | os.PathLike, request: dict, timeout: float = 600) -> dict:
    """Run reload_check.py on `model_dir` in a fresh `python -I` process (offline, ropebert blocked); returns its
    JSON report. Raises UserError with the child's stderr when it fails."""
    with tempfile.TemporaryDirectory(prefix="ropebert-reload-") as tmp:
        req, out = Path(tmp, "request.json"), Path(tmp, "out.json")
        req.write_text(json.dumps(request), encoding="utf-8")
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "HOME": tmp}
        r = subprocess.run([sys.executable, "-I", str(RELOAD_SCRIPT), str(model_dir), str(req), str(out)],
                           capture_output=True, text=True, env=env, cwd=tmp, timeout=timeout, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise UserError(f"{model_dir}: plain-transformers reload failed in a fresh process:\n{r.stderr[-3000:]}")
        return json.loads(out.read_text(encoding="utf-8"))


def verify_export(model_dir: str | os.PathLike, texts: Optional[Sequence[str]] = None, tol: float = 1e-5,
                  sentence_transformers: bool = True) -> dict:
    """Embed `texts` with AutoModel (and SentenceTransformer) in a fresh process without ropebert and compare with
    ropebert's encode of the same directory. Returns {"max_abs_diff": {...}, "n_tokens": [...], ...}; raises
    UserError when a difference exceeds `tol` or ropebert was imported there."""
    texts = list(texts or DEFAULT_TEXTS)
    res = run_fresh_reload(model_dir, {"texts": texts, "sentence_transformers": sentence_transformers})
    if res["ropebert_imported"]:
        raise UserError(f"{model_dir}: the exported code imported ropebert")
    ref = load_source(str(model_dir)).encode(texts, max_length=max(res["n_tokens"]) + 8)
    diffs = {"hf": (torch.tensor(res["hf"]) - ref).abs().max().item()}
    if sentence_transformers:
        diffs["st"] = (torch.tensor(res["st"]) - ref).abs().max().item()
    report = {"max_abs_diff": diffs, "n_tokens": res["n_tokens"], "texts": len(texts), "tol": tol}
    bad = {k: v for k, v in diffs.items() if not v <= tol}
    if bad:
        raise UserError(f"{model_dir}: the exported model disagrees with ropebert after a fresh reload: "
                        f"max |diff| {bad} > {tol}")
    return report


def verify_and_describe(model_dir) -> str:
    """`verify_export(model_dir)` as the one line `ropebert export/upcycle --verify` print."""
    rep = verify_export(model_dir)
    return ("verified: fresh-process reload without ropebert, max |diff| "
            + ", ".join(f"{k} {v:.2e}" for k, v in rep["max_abs_diff"].items()) + f" (<= {rep['tol']:g})")
