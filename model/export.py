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
from typing import Optional

from transformers import AutoTokenizer

from ropebert.errors import InputError
from ropebert.io import OutputDir

from .configuration_ropebert import RopeBertConfig
from .load import from_bert, is_ape_bert, load_source, read_config
from .modeling_ropebert import RopeBertModel
from .verify import verify_and_describe

logger = logging.getLogger(__name__)

MODEL_FILES = ("configuration_ropebert.py", "modeling_ropebert.py")
# packages the exported code must never import: ropebert itself and optional GPU backends
FORBIDDEN_IMPORTS = ("ropebert", "flash_attn", "xformers", "triton")
DEFAULT_PROMPTS = {"query": "query: ", "passage": "passage: "}
MARKER = "ropebert-export.json"  # lists what export wrote: how `--overwrite` recognises a directory it may replace


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
    if getattr(config, "embedding_dim", None) is not None and config.embedding_dim != config.hidden_size:
        # sentence-transformers cuts after the modules (after Normalize): cosine similarity (the default
        # similarity_fn_name) is unaffected; normalize_embeddings=True gives the unit vectors ropebert's embed does
        st_cfg["truncate_dim"] = int(config.embedding_dim)
    files = {
        "modules.json": modules,
        "1_Pooling/config.json": pooling,
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        "config_sentence_transformers.json": st_cfg,
    }
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def shrink_model(model: RopeBertModel, dim: Optional[int] = None, layers: Optional[int] = None) -> RopeBertModel:
    """A Matryoshka cut of `model`, in place: embeddings of its first `dim` channels (config.embedding_dim; the
    modeling code cuts and renormalises) and/or only its first `layers` encoder layers (the upper ones dropped).
    A size the model was not trained for (config.matryoshka_dims / matryoshka_layers) is allowed with a warning
    naming the trained ones; one out of range is an InputError."""
    cfg = model.config
    if layers is not None:
        n = int(cfg.num_hidden_layers)
        if not 1 <= layers <= n:
            raise InputError(f"export --layers {layers}: the model has {n} layers; give 1..{n}")
        trained = getattr(cfg, "matryoshka_layers", None)
        if layers != n and layers not in (trained or []):
            logger.warning("export --layers %d: the model was %s; its layer-%d embeddings may be poor", layers,
                           f"trained at layers {trained}" if trained else "not trained with matryoshka_layers", layers)
        model.encoder.layer = model.encoder.layer[:layers]
        cfg.num_hidden_layers = int(layers)
    if dim is not None:
        h = int(cfg.hidden_size)
        if not 1 <= dim <= h:
            raise InputError(f"export --dim {dim}: the model's embeddings have {h} channels; give 1..{h}")
        trained = getattr(cfg, "matryoshka_dims", None)
        if dim != h and dim not in (trained or []):
            logger.warning("export --dim %d: the model was %s; its %d-dim prefix may be poor", dim,
                           f"trained for dims {trained}" if trained else "not trained with matryoshka_dims", dim)
        cfg.embedding_dim = None if dim == h else int(dim)
    cfg.validate_ropebert()
    return model


def _declare_tokenizer_class(out: Path, tokenizer) -> None:
    """tokenizer_config.json names the tokenizer's (built-in) class and carries no auto_map: the tokenizer needs no
    custom code, and with `tokenizer_class` transformers 4.x resolves it without reading the model config (whose
    auto_map would make AutoTokenizer ask to run custom code). transformers 5's AutoTokenizer resolves the model
    config before it reads this file, so there only `tokenizer_type="bert"` or `trust_remote_code=True` avoids the
    prompt (README's introduction). No content of the directory can, short of a built-in model_type, which would
    make AutoModel without trust_remote_code build a plain BertModel from these weights."""
    p = out / "tokenizer_config.json"
    cfg = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    cfg["tokenizer_class"] = cfg.get("tokenizer_class") or type(tokenizer).__name__
    cfg.pop("auto_map", None)
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_model(
    model: RopeBertModel,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    max_seq_length: Optional[int] = None,
    prompts: Optional[dict] = None,
    overwrite: bool = False,
    source: Optional[str | os.PathLike] = None,
) -> Path:
    """Write `model` (+ tokenizer) as a self-contained HF + sentence-transformers directory; returns its path.

    The directory is written aside (a temporary sibling) and swapped in only when complete. An existing
    non-empty `out_dir` is replaced only with overwrite=True and only when it is a previous export (its
    ropebert-export.json lists every entry in it); `out_dir` equal to or inside `source` is refused."""
    out = Path(out_dir)
    if tokenizer is None:
        try:
            tokenizer = model.tokenizer  # read now: the source may be the directory being replaced
        except ValueError as e:
            raise InputError(f"export: no tokenizer for the model ({e}); pass --tokenizer DIR") from None
    src_dir = Path(__file__).resolve().parent
    for name in MODEL_FILES:
        check_exported_source(src_dir / name)
    config = model.config
    config.validate_ropebert()
    with OutputDir(out, marker=MARKER, overwrite=overwrite, source=source, what="export",
                   marker_info={"format": 1, "source": None if source is None else str(source)}) as tmp:
        config.architectures = ["RopeBertModel"]
        config.auto_map = {
            "AutoConfig": "configuration_ropebert.RopeBertConfig",
            "AutoModel": "modeling_ropebert.RopeBertModel",
        }
        model.save_pretrained(str(tmp), safe_serialization=True)
        if not (tmp / "model.safetensors").is_file() and not (tmp / "model.safetensors.index.json").is_file():
            raise RuntimeError(f"export: save_pretrained wrote no safetensors file into {tmp}")
        for stale in ("pytorch_model.bin",):
            if (tmp / stale).exists():
                raise RuntimeError(f"export: unexpected pickle {stale} in {tmp}")
        for name in MODEL_FILES:
            shutil.copyfile(src_dir / name, tmp / name)
        tokenizer.save_pretrained(str(tmp))
        _declare_tokenizer_class(tmp, tokenizer)
        msl = int(max_seq_length or config.max_position_embeddings)
        _sentence_transformers_files(tmp, config, msl, prompts or dict(DEFAULT_PROMPTS))
    logger.info("export: wrote %s", out)
    return out


def read_calibration(path: str, tokenizer, max_length: int = 128) -> list[list[int]]:
    """Token ids of a calibration text file (UTF-8, one text per line, blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--calibration: {path!r} does not exist")
    try:
        texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise InputError(f"--calibration: {path} is not UTF-8 text ({e})") from None
    texts = [t for t in texts if t]
    if not texts:
        raise InputError(f"--calibration: {path} has no text (one text per line)")
    return [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]


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
    ap.add_argument("--fold-positions", type=int, default=0, metavar="N",
                    help="APE BERT sources: fold the mean of the first N position vectors into the token-type "
                         "embeddings instead of only dropping the table (0: drop only, the published recipe)")
    ap.add_argument("--fold-first-token", action="store_true",
                    help="APE BERT sources: add the position-0 vector to the word embedding of the token that always "
                         "starts a sequence (the tokenizer's [CLS]); exact, since that token sits nowhere else")
    ap.add_argument("--rotary-basis", action="store_true",
                    help="APE BERT sources: re-base each head's q and k so their score-carrying directions sit on "
                         "the slowest rotary frequencies (exact without rotary; see model/load/convert.py)")
    ap.add_argument("--keep-positions", type=int, default=0, metavar="K",
                    help="APE BERT sources: keep the first K position vectors (minus the folded mean) as an absolute "
                         "table for the first K tokens of each sequence (config leading_positions; later tokens: "
                         "rotary only). 0: none, the E5-RoPE layout")
    ap.add_argument("--calibration", default=None, metavar="FILE",
                    help="--rotary-basis statistics from these texts (UTF-8, one per line) instead of seeded random "
                         "tokens")
    ap.add_argument("--query-prompt", default=None, help="sentence-transformers prompt of queries (default 'query: ')")
    ap.add_argument("--passage-prompt", default=None, help="prompt of passages (default 'passage: ')")
    ap.add_argument("--max-seq-length", type=int, default=None, help="sentence-transformers max_seq_length")
    ap.add_argument("--dim", type=int, default=None, metavar="D",
                    help="Matryoshka: embeddings of the first D channels, renormalised (config embedding_dim; "
                         "sentence-transformers truncate_dim); warns when D is not one of the trained matryoshka_dims")
    ap.add_argument("--layers", type=int, default=None, metavar="N",
                    help="2-D Matryoshka: keep the first N encoder layers (the upper ones are dropped); warns when "
                         "N is not one of the trained matryoshka_layers")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace OUT when it is a previous `ropebert export` (nothing else in it)")
    ap.add_argument("--verify", action="store_true",
                    help="reload OUT with plain transformers + sentence-transformers in a fresh process (ropebert "
                         "blocked) and compare embeddings with ropebert's (max |diff| <= 1e-5)")
    args = ap.parse_args(argv)
    conversion = {"--fold-positions": bool(args.fold_positions), "--fold-first-token": args.fold_first_token,
                  "--rotary-basis": args.rotary_basis, "--calibration": args.calibration is not None,
                  "--keep-positions": bool(args.keep_positions)}
    if args.keep_positions < 0:
        raise InputError(f"--keep-positions must be >= 0, got {args.keep_positions}")
    if any(conversion.values()):
        named = ", ".join(k for k, v in conversion.items() if v)
        if not (Path(args.src).is_dir() and is_ape_bert(read_config(args.src))):
            raise InputError(f"{named}: applies to an APE BERT source directory only ({args.src} is not one)")
        if args.calibration is not None and not args.rotary_basis:
            raise InputError("--calibration: only used with --rotary-basis")
        src_tok = AutoTokenizer.from_pretrained(args.tokenizer or args.src, trust_remote_code=False)
        first = None
        if args.fold_first_token:
            first = src_tok.cls_token_id
            if first is None:
                raise InputError(f"--fold-first-token: the tokenizer of {args.tokenizer or args.src} has no "
                                 "cls_token (the token that starts every sequence)")
        calibration = read_calibration(args.calibration, src_tok) if args.calibration else None
        model = from_bert(args.src, fold_positions=args.fold_positions, first_token_id=first,
                          rotary_basis=args.rotary_basis, calibration=calibration, keep_positions=args.keep_positions)
    else:
        model = load_source(args.src)
    prompts = dict(DEFAULT_PROMPTS)
    if args.query_prompt is not None:
        prompts["query"] = args.query_prompt
    if args.passage_prompt is not None:
        prompts["passage"] = args.passage_prompt
    tok = None
    if args.tokenizer:
        tok = AutoTokenizer.from_pretrained(args.tokenizer, trust_remote_code=False)
    if args.rope_theta is not None:
        model.config.rope_theta = args.rope_theta
    if args.dim is not None or args.layers is not None:
        shrink_model(model, dim=args.dim, layers=args.layers)
    out = export_model(model, args.out, tokenizer=tok, max_seq_length=args.max_seq_length, overwrite=args.overwrite,
                       source=args.src, prompts=prompts)
    n = sum(p.numel() for p in model.parameters())
    print(f"exported {type(model).__name__} ({n / 1e6:.1f}M parameters, {model.config.num_hidden_layers} layers, "
          f"{model.config.output_dim}-dim embeddings, rope_theta={model.config.rope_theta}) to {out}")
    if args.verify:
        print(verify_and_describe(out))
    return 0
