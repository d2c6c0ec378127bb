# Copyright ropebert contributors. Apache-2.0.
"""Export a RoPE BERT to a self-contained Hugging Face directory.

The directory holds config.json (with auto_map), model.safetensors under BERT / E5-RoPE weight names, the
tokenizer files, the modeling code copied verbatim from this package (configuration_ropebert.py,
modeling_ropebert.py: the single source of truth), and sentence-transformers files (mean pooling, Normalize,
`query: ` / `passage: ` prompts). Load it with `AutoModel.from_pretrained(DIR, trust_remote_code=True)` or
`SentenceTransformer(DIR, trust_remote_code=True)`; ropebert itself is not needed.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from .configuration_ropebert import RopeBertConfig
from .modeling_ropebert import RopeBertModel
from .training_checkpoint import load_training_checkpoint

logger = logging.getLogger(__name__)

MODEL_FILES = ("configuration_ropebert.py", "modeling_ropebert.py")
# packages the exported code must never import: ropebert itself and optional GPU backends
FORBIDDEN_IMPORTS = ("ropebert", "flash_attn", "xformers", "triton")
DEFAULT_PROMPTS = {"query": "query: ", "passage": "passage: "}

# Loaders for SRC kinds other than HF directories (e.g. training checkpoints), keyed by file suffix.
# A loader takes the path and returns a RopeBertModel (with its tokenizer attached when known).
SOURCE_LOADERS: dict[str, Callable[[str], RopeBertModel]] = {".ckpt": load_training_checkpoint}


def check_exported_source(path: Path) -> None:
    """Raise if a modeling file imports ropebert or an optional GPU package (must stay self-contained)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for n in names:
            if n.split(".")[0] in FORBIDDEN_IMPORTS:
                raise RuntimeError(f"{path}:{node.lineno}: exported modeling code must not import {n!r}")


def load_source(src: str) -> RopeBertModel:
    """Load what `ropebert export SRC` names: a RopeBert/E5-RoPE directory, a BERT directory (converted by
    dropping its absolute position table), or a file handled by a registered SOURCE_LOADERS entry."""
    p = Path(src)
    if p.is_file():
        for suffix, loader in SOURCE_LOADERS.items():
            if p.name.endswith(suffix):
                return loader(str(p))
        raise ValueError(f"export: don't know how to load file {src!r} (known suffixes: {sorted(SOURCE_LOADERS)})")
    if not p.is_dir():
        raise FileNotFoundError(f"export: {src!r} does not exist")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"export: no config.json in {src!r}")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("model_type") == "bert" and "rope_theta" not in cfg:
        logger.info("export: %s is an APE BERT; converting it to RoPE BERT (position table dropped)", src)
        return RopeBertModel.from_bert(str(p))
    model, info = RopeBertModel.from_pretrained(str(p), output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # never hand back randomly initialised weights (e.g. a checkpoint under an unknown prefix)
        unexpected = sorted(info.get("unexpected_keys") or [])
        raise ValueError(f"{src}: {len(missing)} model weights missing from the checkpoint (e.g. {missing[:4]}); "
                         f"unexpected keys there: {unexpected[:4]} — weights must use BERT names, optionally under "
                         "'e5rope.'")
    return model


def _sentence_transformers_files(out: Path, config: RopeBertConfig, max_seq_length: int, prompts: dict) -> None:
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "2_Normalize").mkdir(exist_ok=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    pooling = {
        "word_embedding_dimension": config.hidden_size,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    st_cfg = {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}
    files = {
        "modules.json": modules,
        "1_Pooling/config.json": pooling,
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        "config_sentence_transformers.json": st_cfg,
    }
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def export_model(
    model: RopeBertModel,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    max_seq_length: Optional[int] = None,
    prompts: Optional[dict] = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (+ tokenizer) as a self-contained HF + sentence-transformers directory; returns its path."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"export: output directory {out} is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    if tokenizer is None:
        try:
            tokenizer = model.tokenizer
        except ValueError as e:
            raise ValueError(f"export: no tokenizer for the model ({e}); pass --tokenizer DIR") from None
    src_dir = Path(__file__).resolve().parent
    for name in MODEL_FILES:
        check_exported_source(src_dir / name)
    out.mkdir(parents=True, exist_ok=True)

    config = model.config
    config.validate_ropebert()
    config.architectures = ["RopeBertModel"]
    config.auto_map = {
        "AutoConfig": "configuration_ropebert.RopeBertConfig",
        "AutoModel": "modeling_ropebert.RopeBertModel",
    }
    model.save_pretrained(str(out), safe_serialization=True)
    if not (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").is_file():
        raise RuntimeError(f"export: save_pretrained wrote no safetensors file into {out}")
    for stale in ("pytorch_model.bin",):
        if (out / stale).exists():
            raise RuntimeError(f"export: unexpected pickle {stale} in {out}")
    for name in MODEL_FILES:
        shutil.copyfile(src_dir / name, out / name)
    tokenizer.save_pretrained(str(out))
    msl = int(max_seq_length or config.max_position_embeddings)
    _sentence_transformers_files(out, config, msl, prompts or dict(DEFAULT_PROMPTS))
    logger.info("export: wrote %s", out)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="ropebert export",
        description="Export a model directory (RoPE BERT, E5-RoPE, or an APE BERT to convert) or a training "
        "checkpoint to a self-contained Hugging Face + sentence-transformers directory.",
    )
    ap.add_argument("src", help="model directory or checkpoint file")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the source's own)")
    ap.add_argument("--rope-theta", type=float, default=None, help="override rope_theta in the exported config")
    ap.add_argument("--max-seq-length", type=int, default=None, help="sentence-transformers max_seq_length")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = ap.parse_args(argv)
    model = load_source(args.src)
    tok = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=False)
    if args.rope_theta is not None:
        model.config.rope_theta = args.rope_theta
    out = export_model(model, args.out, tokenizer=tok, max_seq_length=args.max_seq_length, overwrite=args.overwrite)
    n = sum(p.numel() for p in model.parameters())
    print(f"exported {type(model).__name__} ({n / 1e6:.1f}M parameters, rope_theta={model.config.rope_theta}) to {out}")
    return 0
