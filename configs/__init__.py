"""ropebert.configs: the training recipes (LightningCLI YAML), shipped as package data.

    pretrain.yaml / finetune.yaml   stage 1 / stage 2 for 8 GPUs x N nodes
    demo/*.yaml                     the CPU recipes `ropebert demo` runs

`config_path("demo/pretrain.yaml")` gives a file path usable with `ropebert fit --config`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def config_path(name: str) -> Path:
    """Path of a shipped config (e.g. "finetune.yaml", "demo/pretrain.yaml"); FileNotFoundError names the known ones."""
    root = resources.files(__name__)
    f = root.joinpath(*name.split("/"))
    if not f.is_file():
        known = sorted(str(p.name) for p in root.iterdir() if p.name.endswith(".yaml"))
        raise FileNotFoundError(f"no shipped config {name!r} (known: {known} and demo/*.yaml)")
    return Path(str(f))
