# Copyright ropebert contributors. Apache-2.0.
"""A frozen teacher for distillation during training: typically the APE BERT a run was converted from.

`Teacher(DIR)` loads
    * an APE BERT / sentence-transformers directory (its Transformer module at the root or in a sub-folder named by
      modules.json; pooling from 1_Pooling/config.json: mean or CLS) through transformers' AutoModel,
    * an exported ropebert / RoPE BERT directory through ropebert's loader.
It is frozen (eval mode, no gradient), never registered as a sub-module of the training module (so it is neither
in the optimizer nor in a checkpoint's weights: the checkpoint records its path and a content hash), and it reads
at most its own position range (an APE BERT: max_position_embeddings tokens; longer inputs are truncated to it).

What the loss terms use (pipelines/train/loss.py):
    pooled(ids, mask)          -> (N, C) L2-normalised embeddings                        (embed / score terms)
    hidden(ids, mask)          -> [(N, L', C)] hidden states of the mapped layers         (hidden term)
`layer_map(student_layers)`: student layer l <-> teacher layer l when the depths match; otherwise student layer l
(1-based) <-> teacher layer round(l * T / S), the uniform mapping of TinyBERT / MiniLM distillation. Index 0 is
the embedding output and is not aligned (the student has no position table there, by design).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from ropebert.errors import InputError
from ropebert.model import RopeBertModel, mean_pool
from ropebert.model.load import load_source, read_config

logger = logging.getLogger(__name__)

# encoder families a teacher may be (a decoder / seq2seq model is not a text encoder for this purpose)
ENCODER_TYPES = ("bert", "ropebert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "deberta-v2")
HASHED_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model", ".py")


def content_hash(root: str | Path) -> str:
    """sha256 over the relative names and bytes of the directory's config, weight and tokenizer files."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in HASHED_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(root).parts):
            h.update(str(p.relative_to(root)).encode() + b"\0")
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def _transformer_dir(root: Path) -> tuple[Path, str]:
    """(directory of the transformer weights, pooling mode) of an HF or sentence-transformers directory."""
    modules = root / "modules.json"
    pooling = "mean"
    model_dir = root
    if modules.is_file():
        try:
            mods = json.loads(modules.read_text(encoding="utf-8"))
        except ValueError as e:
            raise InputError(f"{modules}: not valid JSON ({e})") from None
        for m in mods:
            t = str(m.get("type", ""))
            if t.endswith("models.Transformer"):
                model_dir = root / m.get("path", "")
            elif t.endswith("models.Pooling"):
                pc = root / m.get("path", "") / "config.json"
                if pc.is_file():
                    cfg = json.loads(pc.read_text(encoding="utf-8"))
                    if cfg.get("pooling_mode_cls_token"):
                        pooling = "cls"
                    elif not cfg.get("pooling_mode_mean_tokens", True):
                        raise InputError(f"{pc}: teacher pooling {cfg} is not supported (mean or CLS)")
    return model_dir, pooling


class Teacher(nn.Module):
    def __init__(self, path: str, student_tokenizer=None):
        super().__init__()
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"model.teacher: {path!r} is not a directory")
        self.path = str(path)
        model_dir, self.pooling = _transformer_dir(root)
        cfg = read_config(model_dir)
        mt = cfg.get("model_type")
        if mt not in ENCODER_TYPES or cfg.get("is_decoder") or cfg.get("is_encoder_decoder"):
            raise InputError(f"model.teacher: {path} is a {mt!r} model, not a text encoder (expected one of "
                             f"{', '.join(ENCODER_TYPES)})")
        self.sha256 = content_hash(root)
        if mt == "ropebert" or (mt == "bert" and "rope_theta" in cfg):
            self.encoder = load_source(str(model_dir))
            self.kind, self.max_positions = "ropebert", None
            tok = self.encoder.tokenizer
        else:
            self.encoder = AutoModel.from_pretrained(str(model_dir), config=AutoConfig.from_pretrained(str(model_dir)),
                                                     attn_implementation="sdpa")
            self.kind = "hf"
            mp = getattr(self.encoder.config, "max_position_embeddings", None)
            pet = getattr(self.encoder.config, "position_embedding_type", "absolute")
            self.max_positions = int(mp) if mp and pet == "absolute" else None
            tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
        self.encoder.eval().requires_grad_(False)
        self.num_layers = int(self.encoder.config.num_hidden_layers)
        self.hidden_size = int(self.encoder.config.hidden_size)
        if student_tokenizer is not None and tok.get_vocab() != student_tokenizer.get_vocab():
            raise InputError(f"model.teacher: {path} uses another tokenizer vocabulary than the student "
                             f"({len(tok.get_vocab())} vs {len(student_tokenizer.get_vocab())} entries); the teacher "
                             "reads the student's token ids, so both must share one vocabulary")

    def train(self, mode: bool = True):  # always frozen
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "kind": self.kind, "pooling": self.pooling,
                "layers": self.num_layers, "hidden_size": self.hidden_size, "max_positions": self.max_positions}

    def layer_map(self, student_layers: int) -> list[tuple[int, int]]:
        """[(student hidden_states index, teacher hidden_states index)], 1-based layers (0 = embeddings)."""
        S, T = int(student_layers), self.num_layers
        return [(s, s if S == T else max(1, round(s * T / S))) for s in range(1, S + 1)]

    def _truncate(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.max_positions is not None and ids.shape[1] > self.max_positions:
            ids, mask = ids[:, : self.max_positions], mask[:, : self.max_positions]
        return ids, mask

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor, hidden: bool = False):
        """(pooled (N, C) L2-normalised fp32, hidden states list or None, the mask the teacher saw)."""
        ids, mask = self._truncate(ids, mask)
        out = self.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=hidden, return_dict=True)
        last = out.last_hidden_state
        if self.pooling == "cls":
            pooled = torch.nn.functional.normalize(last[:, 0].float(), dim=-1)
        else:
            pooled = mean_pool(last, mask)
        return pooled, (list(out.hidden_states) if hidden else None), mask

    def pooled(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.forward(ids, mask)[0]


def student_hidden(model: RopeBertModel, ids: torch.Tensor, mask: torch.Tensor):
    """(pooled (N, C) L2-normalised, hidden states (N, L, C) per layer incl. embeddings) of the student, with graph."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
    return mean_pool(out.last_hidden_state, mask), list(out.hidden_states)


__all__ = ["Teacher", "content_hash", "student_hidden"]
