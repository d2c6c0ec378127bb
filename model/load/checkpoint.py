# Copyright ropebert contributors. Apache-2.0.
"""Read the model out of a ropebert training checkpoint (a Lightning `.ckpt`), without importing the trainer.

The training module (ropebert.pipelines.train.module) stores, besides Lightning's own keys:
    checkpoint["ropebert"] = {
        "format": 1,
        "config": RopeBertConfig.to_dict(),
        "tokenizer_files": {file name: bytes},   # the tokenizer, so a checkpoint exports on any machine
        "model_prefix": "model.",                 # where the encoder's weights sit in checkpoint["state_dict"]
    }
This module only reads that layout (tensors, dicts, strings, bytes: `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ropebert.errors import InputError

from ..configuration_ropebert import RopeBertConfig
from ..modeling_ropebert import RopeBertModel
from .moe import check_moe_weights

CHECKPOINT_FORMAT = 1
CHECKPOINT_KEY = "ropebert"


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The files `tokenizer.save_pretrained` writes, as {name: bytes} ({} without a tokenizer)."""
    files: dict[str, bytes] = {}
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as d:
            tokenizer.save_pretrained(d)
            for p in sorted(Path(d).iterdir()):
                if p.is_file():
                    files[p.name] = p.read_bytes()
    return files


def checkpoint_payload(model: RopeBertModel, files: dict[str, bytes], model_prefix: str = "model.") -> dict:
    """What a training checkpoint carries under CHECKPOINT_KEY (written by the training module); `files` from
    tokenizer_files()."""
    cfg = model.config.to_dict()
    for k in ("auto_map", "architectures", "_name_or_path", "transformers_version"):
        cfg.pop(k, None)
    return {"format": CHECKPOINT_FORMAT, "config": cfg, "tokenizer_files": files, "model_prefix": model_prefix}


def load_training_checkpoint(path: str | os.PathLike, map_location="cpu") -> RopeBertModel:
    """RopeBertModel (weights, config, tokenizer attached) from a ropebert Lightning checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated / not a torch file / foreign pickles
        raise InputError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__}: {str(e)[:300]})") from None
    if not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt or "state_dict" not in ckpt:
        raise InputError(f"{path}: not a ropebert training checkpoint (no {CHECKPOINT_KEY!r} / 'state_dict' entry)")
    meta = ckpt[CHECKPOINT_KEY]
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: ropebert checkpoint format {meta.get('format')!r}, this version reads {CHECKPOINT_FORMAT}")
    config = RopeBertConfig(**meta["config"])
    prefix = meta.get("model_prefix", "model.")
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    check_moe_weights(path, config, {k: tuple(v.shape) for k, v in state.items()})
    model = RopeBertModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"{path}: checkpoint weights do not match the config: missing={sorted(missing)[:8]} "
                         f"unexpected={sorted(unexpected)[:8]}")
    files = meta.get("tokenizer_files") or {}
    if files:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as d:
            for name, data in files.items():
                if "/" in name or name.startswith("."):
                    raise InputError(f"{path}: bad tokenizer file name {name!r} in checkpoint")
                Path(d, name).write_bytes(bytes(data))
            model.tokenizer = AutoTokenizer.from_pretrained(d, trust_remote_code=False)
    return model.eval()
