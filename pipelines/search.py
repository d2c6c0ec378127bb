# Copyright ropebert contributors. Apache-2.0.
"""Exact top-k retrieval by inner product, shared by mining and evaluation (`--index auto|exact|faiss`).

    exact   blocked matmul over the documents on the tensors' own device: memory O(Q * (block + k))
    faiss   faiss IndexFlatIP (exact too; CPU), when the optional faiss package is installed
    auto    faiss when importable, else exact
"""

from __future__ import annotations

import importlib.util

import torch

from ropebert.errors import InputError, UserError

INDEXES = ("auto", "exact", "faiss")


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def topk_blocked(q: torch.Tensor, docs: torch.Tensor, k: int, block_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products: q (Q, C), docs (N, C) -> scores (Q, k'), indices (Q, k'), best first,
    k' = min(k, N)."""
    k = min(int(k), docs.shape[0])
    q = q.float()
    best_s = q.new_empty((q.shape[0], 0))
    best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
    for start in range(0, docs.shape[0], block_size):
        s = q @ docs[start : start + block_size].float().T  # (Q, b)
        s_top, i_top = s.topk(min(k, s.shape[1]), dim=1)
        cat_s = torch.cat([best_s, s_top], dim=1)
        cat_i = torch.cat([best_i, i_top + start], dim=1)
        best_s, pos = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
        best_i = cat_i.gather(1, pos)
    return best_s, best_i


def exact_topk(queries: torch.Tensor, docs: torch.Tensor, k: int, index: str = "auto",
               block_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k documents per query by inner product with the chosen index (see the module docstring)."""
    if queries.ndim != 2 or docs.ndim != 2 or queries.shape[1] != docs.shape[1]:
        raise InputError(f"exact_topk: shapes {tuple(queries.shape)} and {tuple(docs.shape)} do not match")
    if index not in INDEXES:
        raise InputError(f"--index must be one of {'|'.join(INDEXES)}, got {index!r}")
    if index == "faiss" and not faiss_available():
        raise UserError("--index faiss needs the faiss package (pip install faiss-cpu)")
    if index == "faiss" or (index == "auto" and faiss_available()):
        import faiss  # optional

        ix = faiss.IndexFlatIP(docs.shape[1])
        ix.add(docs.float().cpu().contiguous().numpy())
        s, i = ix.search(queries.float().cpu().contiguous().numpy(), min(int(k), docs.shape[0]))
        return torch.from_numpy(s).to(queries.device), torch.from_numpy(i).long().to(queries.device)
    return topk_blocked(queries, docs, k, block_size)
