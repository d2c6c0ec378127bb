"""The checkout's kernels/ directory never stands in for the distribution named `kernels` (Hugging Face kernels,
which transformers imports) when the checkout's root is on sys.path, as under `python -m ropebert` run from it."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_top_level_kernels_is_never_this_package(tmp_path):
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import kernels, ropebert.kernels as ours; "
            "print(kernels.__file__); print(ours.__file__); print(kernels is ours)")
    try:
        importlib.metadata.distribution("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    r = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, cwd=tmp_path)
    if installed:
        assert r.returncode == 0, r.stderr
        theirs, ours, same = r.stdout.split()
        assert Path(theirs).resolve().parent != (REPO / "kernels").resolve() and same == "False"
    else:  # no such distribution: the name resolves as it always did (transformers only probes it)
        assert r.returncode == 0, r.stderr
