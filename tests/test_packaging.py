"""The built wheel: what `pip install ropebert` (not an editable checkout) gets."""

from __future__ import annotations

import email
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO


def test_wheel_ships_every_recipe_and_an_spdx_license(tmp_path):
    pytest.importorskip("setuptools", minversion="77")  # the build backend pyproject.toml asks for
    # no build isolation: the environment's setuptools builds it, so the test needs no package index
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "-q", "-w", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # every shipped config, the demo's CPU recipes included (`ropebert demo` reads them through config_path)
    assert "is absent from the `packages` configuration" not in r.stderr, r.stderr
    (wheel,) = tmp_path.glob("ropebert-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = email.message_from_bytes(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    want = {f"ropebert/configs/{p.relative_to(REPO / 'configs').as_posix()}"
            for p in (REPO / "configs").rglob("*.yaml")}
    assert any(n.startswith("ropebert/configs/demo/") for n in want)
    assert want <= names, sorted(want - names)
    assert meta["License-Expression"] == "Apache-2.0"
