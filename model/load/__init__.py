# Copyright ropebert contributors. Apache-2.0.
"""Loading: the entry point of every stage (training, mining, evaluation, export, similarity, MTEB).

`load_source(SRC)` accepts
    * an exported ropebert / RoPE BERT / E5-RoPE directory (weights under BERT names, optionally `e5rope.`),
    * an APE BERT directory, converted on the way (`convert.from_bert`: position table dropped),
    * a file handled by a SOURCE_LOADERS entry (a ropebert training checkpoint `.ckpt`: `checkpoint.py`).
Anything else is a clear error; weights transformers cannot match are never replaced by random ones.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from ropebert.errors import InputError

from ..modeling_ropebert import RopeBertModel
from .checkpoint import load_training_checkpoint
from .convert import from_bert

logger = logging.getLogger(__name__)

# Loaders for SRC kinds other than HF directories (e.g. training checkpoints), keyed by file suffix.
# A loader takes the path and returns a RopeBertModel (with its tokenizer attached when known).
SOURCE_LOADERS: dict[str, Callable[[str], RopeBertModel]] = {".ckpt": load_training_checkpoint}


def is_ape_bert(config: dict) -> bool:
    """True for a config.json of an absolute-position BERT (what `from_bert` converts)."""
    return config.get("model_type") == "bert" and "rope_theta" not in config


def read_config(src: str | Path) -> dict:
    """The config.json of a model directory, as a dict (clear errors when absent or malformed)."""
    p = Path(src) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{src}: no config.json (not a model directory)")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{p}: expected a JSON object")
    return cfg


def load_source(src: str) -> RopeBertModel:
    """Load what a `--model` / `init_from` / `ropebert export SRC` argument names (see the module docstring)."""
    p = Path(src)
    if p.is_file():
        for suffix, loader in SOURCE_LOADERS.items():
            if p.name.endswith(suffix):
                return loader(str(p))
        raise InputError(f"{src}: don't know how to load this file (known suffixes: {sorted(SOURCE_LOADERS)})")
    if not p.is_dir():
        raise FileNotFoundError(f"{src!r} does not exist")
    cfg = read_config(p)
    try:
        if is_ape_bert(cfg):
            logger.info("%s is an APE BERT; converting it to RoPE BERT (position table dropped)", src)
            return from_bert(str(p))
        model, info = RopeBertModel.from_pretrained(str(p), output_loading_info=True)
    except ValueError as e:  # a config value the model refuses: name the file
        if isinstance(e, InputError):
            raise
        raise InputError(f"{p / 'config.json'}: {e}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # never hand back randomly initialised weights (e.g. a checkpoint under an unknown prefix)
        unexpected = sorted(info.get("unexpected_keys") or [])
        raise InputError(f"{src}: {len(missing)} model weights missing from the checkpoint (e.g. {missing[:4]}); "
                         f"unexpected keys there: {unexpected[:4]} — weights must use BERT names, optionally under "
                         "'e5rope.'")
    return model


__all__ = ["SOURCE_LOADERS", "from_bert", "is_ape_bert", "load_source", "load_training_checkpoint", "read_config"]
