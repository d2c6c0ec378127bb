# Copyright ropebert contributors. Apache-2.0.
"""APE BERT -> RoPE BERT conversion (E5-RoPE recipe): copy every BERT weight under its own name except the
absolute position table, the pooler and the pre-training heads. Conversion tooling, not part of the exported
model file."""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

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
              first_token_id: Optional[int] = None, rotary_basis: bool = False,
              calibration: Optional[Sequence[Sequence[int]]] = None, keep_positions: int = 0,
              **config_overrides) -> RopeBertModel:
    """Build a RoPE BERT from an HF BERT checkpoint (directory or BertModel): copies every weight except the
    absolute position table and the pooler (and pre-training heads), keeping BERT weight names.

    fold_positions: 0 (the E5-RoPE recipe as published: the table is simply dropped) or N > 0: add the mean of the
    first N position vectors to every token-type embedding. The embedding LayerNorm then sees inputs whose mean over
    positions 0..N-1 equals the APE model's, instead of inputs shifted by that mean; no position information is
    added (the same vector for every position). With all-MiniLM-L6-v2 and N = 128 (its training length) this lifts
    the untrained conversion's held-out docstring nDCG@10 from 0.47 to 0.62 (BENCHMARKS.md) and gives distillation
    a better start.

    first_token_id: the token that always sits at position 0 (BERT's [CLS]): its word embedding gets the APE
    model's position-0 vector (minus the folded mean), which is exact, since that token is never anywhere else.
    Position 0 carries much of what all-MiniLM-L6-v2 takes from its table: with every other position at the mean,
    keeping position 0 is worth 7 held-out nDCG@10 points (BENCHMARKS.md).

    keep_positions: K > 0 keeps the APE model's first K position vectors (minus the folded mean; row 0 is zero
    when first_token_id already holds it) as the model's `leading_positions` table: tokens 0..K-1 of every
    sequence get their absolute vector back, later tokens only rotary. With all-MiniLM-L6-v2 the parent with
    positions 0..15 kept and the rest at the mean scores as the parent itself on held-out docstrings, and the
    RoPE conversion with K = 16 matches it there (0.880 vs 0.877) and is 1.6 MS MARCO points below it untrained,
    0.5 after the demo's distillation (BENCHMARKS.md).

    rotary_basis: re-express each head's q and k in a basis that puts their score-carrying directions on the
    lowest rotary frequencies (`align_rotary_basis`; exact without rotary, calibrated on `calibration` token-id
    sequences, else on seeded random tokens)."""
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
    if isinstance(keep_positions, bool) or not isinstance(keep_positions, int) or keep_positions < 0:
        raise InputError(f"from_bert: keep_positions must be an int >= 0, got {keep_positions!r}")
    if keep_positions:
        cfg_kwargs["leading_positions"] = keep_positions
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
    table = next((v for k, v in state.items() if k.endswith("embeddings.position_embeddings.weight")), None)  # (P, C)
    we = next((k for k in converted if k.endswith("embeddings.word_embeddings.weight")), None)
    mean = 0.0  # the folded mean of the first fold_positions vectors (0: nothing folded)
    if fold_positions:
        tt = next((k for k in converted if k.endswith("embeddings.token_type_embeddings.weight")), None)
        if table is None or tt is None:
            raise InputError(f"from_bert: fold_positions needs {src}'s position table and token-type embeddings")
        if not 0 < int(fold_positions) <= table.shape[0]:
            raise InputError(f"from_bert: fold_positions must be in 1..{table.shape[0]}, got {fold_positions}")
        mean = table[: int(fold_positions)].float().mean(0)  # (C,)
        converted[tt] = converted[tt] + mean.to(converted[tt].dtype)
    if first_token_id is not None:
        if table is None or we is None:
            raise InputError(f"from_bert: first_token_id needs {src}'s position table and word embeddings")
        if not 0 <= int(first_token_id) < converted[we].shape[0]:
            raise InputError(f"from_bert: first_token_id {first_token_id} is not in {src}'s vocabulary "
                             f"(0..{converted[we].shape[0] - 1})")
        converted[we] = converted[we].clone()
        converted[we][int(first_token_id)] += (table[0].float() - mean).to(converted[we].dtype)
    if keep_positions:
        if table is None or we is None:
            raise InputError(f"from_bert: keep_positions needs {src}'s position table")
        if keep_positions > table.shape[0]:
            raise InputError(f"from_bert: keep_positions must be in 0..{table.shape[0]} (the position table of "
                             f"{src}), got {keep_positions}")
        lead = table[:keep_positions].float() - mean  # (K, C), a new tensor
        if first_token_id is not None:
            lead[0] = 0.0  # position 0 is in the first token's word embedding already
        converted[we.replace("word_embeddings", "leading_position_embeddings")] = lead.to(table.dtype)
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
    if rotary_basis:
        if calibration is None:
            calibration = random_token_sequences(config.vocab_size, special_ids=_special_ids(bert_cfg),
                                                 first_token_id=first_token_id)
        align_rotary_basis(model, calibration)
    return model


# ----------------------------------------------------------------------------------------------------------
# Rotary-aware basis. An APE BERT's q.k scores were learned without rotation. Rotary embedding turns pair p of
# head dims (d, d + D/2, rotate-half pairing) by position * theta^(-2p/D): the pairs with large p turn slowly and
# keep content matching intact over the distances of a sentence; the pairs with small p turn by ~1 radian per
# token and scramble any content score they carry. Any orthogonal R applied to BOTH q and k of a head leaves q.k
# (and so the APE-free model) unchanged, but moves where the score mass sits. align_rotary_basis picks, per head,
# the eigenvectors of S = Cq / tr Cq + Ck / tr Ck (Cq, Ck: second moments of q and k over calibration tokens,
# bias included), most important first, and lays them on the slowest pairs first. Values are not touched.
# With all-MiniLM-L6-v2 (folded, untrained) this lifts held-out docstring nDCG@10 from 0.62 to 0.68 (random tokens)
# - 0.73 (text), the same model with rotary switched off scoring 0.73; with position 0 folded into [CLS] as well,
# 0.81 (BENCHMARKS.md).
# ----------------------------------------------------------------------------------------------------------


def _special_ids(bert_cfg: dict) -> set[int]:
    return {int(v) for k, v in bert_cfg.items() if k.endswith("_token_id") and isinstance(v, int)}


def random_token_sequences(vocab_size: int, num: int = 256, length: int = 64, seed: int = 0,
                           special_ids: Sequence[int] = (), first_token_id: Optional[int] = None,
                           low: int = 1000) -> list[list[int]]:
    """Seeded random token-id sequences: a data-free calibration set. Ids below `low` (BERT vocabularies keep
    [PAD], [unused*], [CLS], [SEP], [MASK] there) and `special_ids` are never drawn; `first_token_id`, when given,
    starts every sequence, as [CLS] does."""
    g = torch.Generator().manual_seed(seed)
    lo = min(low, max(vocab_size - 1, 0))
    ids = torch.randint(lo, vocab_size, (num, length), generator=g)
    for s in special_ids:
        ids[ids == s] = lo
    if first_token_id is not None:
        ids[:, 0] = int(first_token_id)
    return ids.tolist()


@torch.no_grad()
def align_rotary_basis(model: RopeBertModel, sequences: Sequence[Sequence[int]], max_length: int = 512) -> dict:
    """Rotate each head's q/k basis in place (see the comment above); statistics of every layer's attention input
    are taken from `sequences` (token ids, one forward each, no padding) before any weight changes.
    Returns {"tokens": n, "layers": L}."""
    cfg = model.config
    H, C = cfg.num_attention_heads, cfg.hidden_size
    D = C // H
    P = D // 2
    layers = [layer.attention.self for layer in model.encoder.layer]
    moments = [torch.zeros(C + 1, C + 1, dtype=torch.float64) for _ in layers]  # E[[x,1][x,1]^T] per layer
    count = [0]

    def hook(i):
        def pre(_mod, args):
            x = args[0].reshape(-1, C).double()  # (T, C): one unpadded sequence
            xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            moments[i].add_(xa.T @ xa)
        return pre

    handles = [sa.register_forward_pre_hook(hook(i)) for i, sa in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for seq in sequences:
            ids = torch.as_tensor(list(seq)[:max_length], dtype=torch.long)[None]  # (1, L)
            if ids.numel() == 0:
                continue
            model(ids, torch.ones_like(ids), torch.zeros_like(ids))
            count[0] += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count[0] == 0:
        raise InputError("align_rotary_basis: the calibration set has no tokens")
    # slots from the slowest rotary pair down: (P-1, 2P-1), (P-2, 2P-2), ...
    slots = [d for p in range(P - 1, -1, -1) for d in (p, p + P)]
    for sa, m in zip(layers, moments):
        m = m / count[0]
        wq = torch.cat([sa.query.weight, sa.query.bias[:, None]], 1).double().view(H, D, C + 1)  # (H, D, C+1)
        wk = torch.cat([sa.key.weight, sa.key.bias[:, None]], 1).double().view(H, D, C + 1)
        new_q, new_k = wq.clone(), wk.clone()
        for h in range(H):
            cq = wq[h] @ m @ wq[h].T  # (D, D) E[q q^T]
            ck = wk[h] @ m @ wk[h].T
            s = cq / cq.trace().clamp_min(1e-30) + ck / ck.trace().clamp_min(1e-30)
            _, vecs = torch.linalg.eigh(s)  # ascending eigenvalues, columns
            vecs = vecs.flip(-1)  # most important first
            r = torch.zeros(D, D, dtype=torch.float64)
            r[slots] = vecs.T  # row slots[j] = j-th direction
            new_q[h], new_k[h] = r @ wq[h], r @ wk[h]
        for lin, w in ((sa.query, new_q), (sa.key, new_k)):
            w = w.view(C, C + 1)
            lin.weight.copy_(w[:, :C].to(lin.weight.dtype))
            lin.bias.copy_(w[:, C].to(lin.bias.dtype))
    logger.info("align_rotary_basis: q/k of %d layers re-based on %d calibration tokens", len(layers), count[0])
    return {"tokens": count[0], "layers": len(layers)}


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
