"""The built wheel: what `pip install ropebert` (not an editable checkout) gets."""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO


def _tracked_copy(dest: Path) -> Path:
    """The checkout's tracked files under dest: setuptools builds in the source tree (build/, *.egg-info), and a
    stale build/ of the checkout could put files in the wheel that the sources no longer have."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know the tracked files")
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


def test_wheel_ships_every_recipe_and_an_spdx_license(tmp_path):
    pytest.importorskip("setuptools", minversion="77")  # the build backend pyproject.toml asks for
    src = _tracked_copy(tmp_path / "src")
    # no build isolation: the environment's setuptools builds it, so the test needs no package index
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "is absent from the `packages` configuration" not in r.stderr, r.stderr
    (wheel,) = (tmp_path / "dist").glob("ropebert-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = email.message_from_bytes(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    # every shipped config, the demo's CPU recipes included (`ropebert demo` reads them through config_path)
    want = {f"ropebert/configs/{p.relative_to(REPO / 'configs').as_posix()}"
            for p in (REPO / "configs").rglob("*.yaml")}
    assert any(n.startswith("ropebert/configs/demo/") for n in want)
    assert want <= names, sorted(want - names)
    assert meta["License-Expression"] == "Apache-2.0"
