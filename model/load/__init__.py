# Copyright ropebert contributors. Apache-2.0.
"""Loading: the entry point of every stage (training, mining, evaluation, export, similarity, MTEB).

`load_source(SRC)` accepts
    * an exported ropebert / RoPE BERT / E5-RoPE directory (weights under BERT names, optionally `e5rope.`),
    * an APE BERT directory, converted on the way (`convert.from_bert`: position table dropped),
    * a file handled by a SOURCE_LOADERS entry (a ropebert training checkpoint `.ckpt`: `checkpoint.py`),
    * a Hugging Face Hub id `org/name` (optionally `org/name@revision`) that is not a local path: the snapshot in
      the huggingface_hub cache (HF_HUB_CACHE), downloaded first unless HF_HUB_OFFLINE is set; then as a directory.
Anything else is a clear error; weights transformers cannot match are never replaced by random ones.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable, Optional

from ropebert.errors import InputError, UserError

from ..configuration_ropebert import RopeBertConfig
from ..modeling_ropebert import RopeBertModel
from .checkpoint import load_training_checkpoint
from .convert import from_bert
from .moe import check_moe_weights, safetensors_shapes

logger = logging.getLogger(__name__)

# Loaders for SRC kinds other than HF directories (e.g. training checkpoints), keyed by file suffix.
# A loader takes the path and returns a RopeBertModel (with its tokenizer attached when known).
SOURCE_LOADERS: dict[str, Callable[[str], RopeBertModel]] = {".ckpt": load_training_checkpoint}


def is_ape_bert(config: dict) -> bool:
    """True for a config.json of an absolute-position BERT (what `from_bert` converts)."""
    return config.get("model_type") == "bert" and "rope_theta" not in config and "rope_parameters" not in config


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


HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")
# what a model needs from a hub snapshot: configs, weights, tokenizer files; never other frameworks' exports
HUB_IGNORE = ["*.onnx", "onnx/*", "openvino/*", "coreml/*", "*.msgpack", "*.h5", "*.ot", "*.tflite", "*.gguf"]


def hub_offline() -> bool:
    """huggingface_hub's offline switch (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read when it was imported)."""
    from huggingface_hub import constants

    fn = getattr(constants, "is_offline_mode", None)
    return bool(fn() if fn is not None else constants.HF_HUB_OFFLINE)


def resolve_hub_id(src: str) -> Optional[Path]:
    """The local snapshot directory of hub id `src` (`org/name[@revision]`), or None when `src` is not shaped like
    one. Offline: only the huggingface_hub cache is consulted (UserError naming HF_HUB_OFFLINE when the model is not
    there); online: snapshot_download fetches what is missing. Other failures are UserErrors too."""
    m = HUB_ID.match(src)
    if m is None:
        return None
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo, rev = m.group("repo"), m.group("rev")
    offline = hub_offline()
    what = f"{src!r} is not a local path; as a Hugging Face Hub model id ({repo}{'@' + rev if rev else ''})"
    try:
        path = snapshot_download(repo, revision=rev, local_files_only=offline, ignore_patterns=HUB_IGNORE)
    except LocalEntryNotFoundError as e:
        if offline:
            raise UserError(f"{what} it is not in the huggingface_hub cache {constants.HF_HUB_CACHE} and "
                            "HF_HUB_OFFLINE is set: download it once with network access (`hf download "
                            f"{repo}`) or unset HF_HUB_OFFLINE") from None
        raise UserError(f"{what} it could not be fetched and is not cached: {e}") from None
    except RepositoryNotFoundError:
        raise UserError(f"{what} no such (accessible) repository on the Hub") from None
    except HfHubHTTPError as e:
        raise UserError(f"{what} the Hub answered: {e}") from None
    logger.info("%s: hub snapshot %s", src, path)
    return Path(path)


def load_source(src: str) -> RopeBertModel:
    """Load what a `--model` / `init_from` / `ropebert export SRC` argument names (see the module docstring)."""
    p = Path(src)
    if not p.exists():
        snapshot = resolve_hub_id(str(src))
        if snapshot is not None:
            return load_source(str(snapshot))
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
        check_moe_weights(src, RopeBertConfig.from_pretrained(str(p)), safetensors_shapes(p))
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


__all__ = ["SOURCE_LOADERS", "from_bert", "is_ape_bert", "load_source", "load_training_checkpoint", "read_config",
           "resolve_hub_id"]
