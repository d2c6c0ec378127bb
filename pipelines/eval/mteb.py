# Copyright ropebert contributors. Apache-2.0.
"""MTEB encoder for ropebert models, so users with internet can run MTEB / LongEmbed tasks directly:

    import mteb
    from ropebert.pipelines.eval.mteb import RopeBertMTEBEncoder
    model = RopeBertMTEBEncoder("path/to/exported_or_bert_dir", max_length=8192, long_context_method="ntk")
    mteb.evaluate(model, mteb.get_tasks(tasks=["LEMBPasskeyRetrieval"]))

Protocol (mteb 2.x `EncoderProtocol`): `encode(inputs: DataLoader[BatchedInput], *, task_metadata, hf_split,
hf_subset, prompt_type=None, **kwargs) -> array (N, C)`, `similarity`, `similarity_pairwise` and a
`mteb_model_meta`. Batches are dicts whose "text" column holds the strings. The legacy (mteb 1.x) call
`encode(list_of_str, task_name=..., prompt_type=...)` is accepted too.

Prompts: {"query": "query: ", "document": "passage: "} by default (E5 convention); keys may also be
"<TaskName>-query", "<TaskName>", "<TaskType>-query", "<TaskType>" (mteb's priority order).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ropebert.errors import InputError
from ropebert.model.load import load_source
from ropebert.model.long_context import apply_long_context_method

try:  # mteb is optional: the wrapper still works as a plain encoder without it
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder as _Base
except ImportError:  # pragma: no cover - exercised only without mteb
    ModelMeta = None
    _Base = object

DEFAULT_PROMPTS = {"query": "query: ", "document": "passage: "}


def _value(x) -> Optional[str]:
    return None if x is None else str(getattr(x, "value", x))


def resolve_prompt(prompts: dict[str, str], task_name: Optional[str], task_type: Optional[str],
                   prompt_type: Optional[str]) -> str:
    """mteb's prompt priority: task-type, task, tasktype-type, tasktype, type; '' when none matches."""
    candidates = []
    if task_name and prompt_type:
        candidates.append(f"{task_name}-{prompt_type}")
    if task_name:
        candidates.append(task_name)
    if task_type and prompt_type:
        candidates.append(f"{task_type}-{prompt_type}")
    if task_type:
        candidates.append(task_type)
    if prompt_type:
        candidates.append(prompt_type)
        if prompt_type == "document":
            candidates.append("passage")
    for c in candidates:
        if c in prompts:
            return prompts[c]
    return ""


class RopeBertMTEBEncoder(_Base):
    """Wrap a ropebert model (exported dir, RoPE BERT dir, or APE BERT dir converted on the fly)."""

    def __init__(self, model_name: str = "", revision: Optional[str] = None, *, device: Optional[str] = None,
                 model=None, prompts: Optional[dict[str, str]] = None, batch_size: int = 32,
                 max_length: Optional[int] = None, max_tokens: Optional[int] = 16384,
                 long_context_method: str = "none", show_progress_bar: bool = False, **kwargs: Any):
        if model is None:
            if not model_name:
                raise InputError("RopeBertMTEBEncoder: pass model_name (a directory) or model=")
            model = load_source(model_name)
        self.model = model.eval()
        if device:
            self.model.to(device)
        self.device = device
        self.model_prompts = dict(DEFAULT_PROMPTS if prompts is None else prompts)
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_tokens = max_tokens
        self.show_progress_bar = show_progress_bar
        self.encode_kwargs: dict = {}
        if long_context_method != "none":
            if not max_length:
                raise InputError("RopeBertMTEBEncoder: long_context_method needs max_length (the target length)")
            self.encode_kwargs = apply_long_context_method(self.model, long_context_method, max_length)
        self.long_context_method = long_context_method
        if ModelMeta is not None:
            from mteb.models.model_meta import ScoringFunction

            name = model_name or getattr(self.model, "name_or_path", "") or "ropebert/model"
            if "/" not in name.strip("/"):
                name = f"ropebert/{name}"
            self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
                name=name.rstrip("/"),
                revision=revision,
                loader=RopeBertMTEBEncoder,
                max_tokens=max_length or int(self.model.config.max_position_embeddings),
                embed_dim=int(self.model.config.output_dim),
                similarity_fn_name=ScoringFunction.COSINE,
                framework=["PyTorch"],
                n_parameters=sum(p.numel() for p in self.model.parameters()),
            ))

    def _texts(self, inputs) -> list[str]:
        if isinstance(inputs, str):
            return [inputs]
        if isinstance(inputs, (list, tuple)) and all(isinstance(t, str) for t in inputs):
            return list(inputs)
        texts: list[str] = []
        for batch in inputs:  # DataLoader[BatchedInput]: dict batches with a "text" column
            if not isinstance(batch, dict) or "text" not in batch:
                raise TypeError(f"RopeBertMTEBEncoder.encode: expected dict batches with a 'text' column, got "
                                f"{type(batch).__name__} {list(batch) if isinstance(batch, dict) else ''}")
            texts.extend(batch["text"])
        return texts

    def encode(self, inputs, *, task_metadata=None, hf_split: str = "", hf_subset: str = "",
               prompt_type=None, task_name: Optional[str] = None, **kwargs: Any) -> np.ndarray:
        texts = self._texts(inputs)
        if task_metadata is not None:
            task_name = task_metadata.name
            task_type = _value(task_metadata.type)
        else:
            task_type = None
        prompt = resolve_prompt(self.model_prompts, task_name, task_type, _value(prompt_type))
        if not texts:
            return np.zeros((0, int(self.model.config.output_dim)), dtype=np.float32)
        emb = self.model.encode(
            texts, prefix=prompt, batch_size=int(kwargs.get("batch_size", self.batch_size)),
            max_length=self.max_length, max_tokens=self.max_tokens, device=self.device,
            show_progress_bar=self.show_progress_bar, **self.encode_kwargs,
        )
        return emb.numpy()

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        a, b = torch.as_tensor(np.asarray(embeddings1)), torch.as_tensor(np.asarray(embeddings2))
        a, b = a.reshape(-1, a.shape[-1]).float(), b.reshape(-1, b.shape[-1]).float()
        return torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        a, b = torch.as_tensor(np.asarray(embeddings1)).float(), torch.as_tensor(np.asarray(embeddings2)).float()
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)
