# Copyright ropebert contributors. Apache-2.0.
"""APE BERT -> RoPE BERT conversion (E5-RoPE recipe): copy every BERT weight under its own name except the
absolute position table, the pooler and the pre-training heads. Conversion tooling, not part of the exported
model file."""

from __future__ import annotations

import json
import logging
import os

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from ropebert.errors import InputError

from ..configuration_ropebert import RopeBertConfig
from ..modeling_ropebert import RopeBertModel

logger = logging.getLogger(__name__)

# BERT checkpoint keys that have no counterpart in RoPE BERT (absolute positions, pooler, pre-training heads)
_BERT_DROPPED_PREFIXES = ("embeddings.position_embeddings.", "pooler.", "cls.")
_BERT_DROPPED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")


def from_bert(path_or_model, rope_theta: float = 10000.0, fold_positions: int = 0,
              **config_overrides) -> RopeBertModel:
    """Build a RoPE BERT from an HF BERT checkpoint (directory or BertModel): copies every weight except the
    absolute position table and the pooler (and pre-training heads), keeping BERT weight names.

    fold_positions: 0 (the E5-RoPE recipe as published: the table is simply dropped) or N > 0: add the mean of the
    first N position vectors to every token-type embedding. The embedding LayerNorm then sees inputs whose mean over
    positions 0..N-1 equals the APE model's, instead of inputs shifted by that mean; no position information is
    added (the same vector for every position). With all-MiniLM-L6-v2 and N = 128 (its training length) this lifts
    the untrained conversion's held-out docstring nDCG@10 from 0.47 to 0.62 (BENCHMARKS.md) and gives distillation
    a better start."""
    if isinstance(path_or_model, PreTrainedModel):
        bert_cfg = path_or_model.config.to_dict()
        state = path_or_model.state_dict()
        src = type(path_or_model).__name__
        src_dir = getattr(path_or_model, "name_or_path", None)
    elif isinstance(path_or_model, (str, os.PathLike)):
        src_dir = src = os.fspath(path_or_model)
        cfg_path = os.path.join(src, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"from_bert: no config.json in {src!r}")
        with open(cfg_path, encoding="utf-8") as f:
            bert_cfg = json.load(f)
        state = None  # loaded after the config is known to be a BERT's
    else:
        raise TypeError(f"from_bert expects a path or a transformers BertModel, got {type(path_or_model).__name__}")

    model_type = bert_cfg.get("model_type")
    if model_type != "bert":
        raise InputError(f"from_bert: {src} is not a BERT checkpoint (config model_type={model_type!r}, expected 'bert')")
    pet = bert_cfg.get("position_embedding_type", "absolute")
    if pet != "absolute":
        raise InputError(f"from_bert: {src} uses position_embedding_type={pet!r}; only absolute-position BERTs convert")
    keys = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
        "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
        "initializer_range", "layer_norm_eps", "pad_token_id",
    )
    cfg_kwargs = {k: bert_cfg[k] for k in keys if k in bert_cfg}
    cfg_kwargs.update(config_overrides)
    config = RopeBertConfig(rope_theta=rope_theta, **cfg_kwargs)
    if state is None:
        state = load_state_dict_from_dir(src)

    converted, dropped = {}, []
    for k, v in state.items():
        name = k[len("bert."):] if k.startswith("bert.") else k
        if name in _BERT_DROPPED_KEYS or name.startswith(_BERT_DROPPED_PREFIXES):
            dropped.append(k)
            continue
        converted[name] = v
    if fold_positions:
        table = next((v for k, v in state.items() if k.endswith("embeddings.position_embeddings.weight")), None)
        tt = next((k for k in converted if k.endswith("embeddings.token_type_embeddings.weight")), None)
        if table is None or tt is None:
            raise InputError(f"from_bert: fold_positions needs {src}'s position table and token-type embeddings")
        if not 0 < int(fold_positions) <= table.shape[0]:
            raise InputError(f"from_bert: fold_positions must be in 1..{table.shape[0]}, got {fold_positions}")
        converted[tt] = converted[tt] + table[: int(fold_positions)].float().mean(0).to(converted[tt].dtype)
    model = RopeBertModel(config)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise InputError(
            f"from_bert: {src} does not match the BERT layout: missing={sorted(missing)[:8]} "
            f"unexpected={sorted(unexpected)[:8]}"
        )
    if not any(k.endswith("position_embeddings.weight") for k in dropped):
        raise InputError(f"from_bert: {src} has no absolute position table; is it really an APE BERT?")
    logger.info("from_bert: dropped %d BERT tensors (position table, pooler, heads): %s%s", len(dropped), dropped,
                f"; mean of the first {fold_positions} positions folded into the token-type embeddings"
                if fold_positions else "")
    if src_dir and os.path.isdir(str(src_dir)):
        model.name_or_path = str(src_dir)
    return model


def load_state_dict_from_dir(path: str) -> dict[str, torch.Tensor]:
    """Load model weights from an HF directory: model.safetensors (sharded or not) or pytorch_model.bin."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for fn in files:
            state.update(load_file(os.path.join(path, fn)))
        return state
    binf = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(binf):
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {path!r}")
