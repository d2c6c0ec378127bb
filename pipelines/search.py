# Copyright ropebert contributors. Apache-2.0.
"""Exact top-k retrieval by inner product, shared by mining and evaluation (`--index auto|exact|faiss`).

    exact   blocked matmul over the documents on the tensors' own device: memory O(Q * (block + k))
    faiss   faiss IndexFlatIP (exact too; CPU), when the optional faiss package is installed
    auto    faiss when importable, else exact
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import numpy as np
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


# ----------------------------------------------------------------------------------------------------------
# Quantised search (Matryoshka prefixes x float32 / int8 / binary)
# ----------------------------------------------------------------------------------------------------------

PRECISIONS = ("float32", "int8", "binary")


def bytes_per_vector(dim: int, precision: str) -> int:
    """Storage of one document vector: float32 4 * dim, int8 dim, binary ceil(dim / 8)."""
    if precision not in PRECISIONS:
        raise InputError(f"--quantize: precision must be one of {','.join(PRECISIONS)}, got {precision!r}")
    return {"float32": 4 * dim, "int8": dim, "binary": (dim + 7) // 8}[precision]


def matryoshka_prefix(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, C) -> (N, dim): the first dim channels, L2-renormalised (how a Matryoshka model is used at dim)."""
    if not 1 <= dim <= x.shape[1]:
        raise InputError(f"--dims: {dim} is outside 1..{x.shape[1]} (the embeddings' size)")
    return torch.nn.functional.normalize(x[:, :dim].float(), dim=-1)


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of every uint8 (np.bitwise_count on numpy >= 2, a 256-entry table before)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    table = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)
    return table[x]


def hamming_topk(q_bits: torch.Tensor, d_bits: torch.Tensor, k: int, index: str = "auto",
                 block_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by Hamming distance of packed bits: q_bits (Q, B), d_bits (N, B) uint8 -> (distances (Q, k'),
    indices (Q, k')), nearest first, k' = min(k, N). faiss IndexBinaryFlat when installed (index auto/faiss),
    else XOR + popcount of the packed bytes, blocked over documents and queries."""
    k = min(int(k), d_bits.shape[0])
    if index == "faiss" and not faiss_available():
        raise UserError("--index faiss needs the faiss package (pip install faiss-cpu)")
    if index == "faiss" or (index == "auto" and faiss_available()):
        import faiss  # optional

        ix = faiss.IndexBinaryFlat(d_bits.shape[1] * 8)
        ix.add(d_bits.cpu().contiguous().numpy())
        dist, idx = ix.search(q_bits.cpu().contiguous().numpy(), k)
        return torch.from_numpy(dist).long(), torch.from_numpy(idx).long()
    qn, dn = q_bits.cpu().numpy(), d_bits.cpu().numpy()
    q_block = max(1, (1 << 24) // max(1, block_size * qn.shape[1]))  # bounds the (q, b, B) XOR buffer at 16 MB
    best_d = torch.empty((qn.shape[0], 0), dtype=torch.long)
    best_i = torch.empty((qn.shape[0], 0), dtype=torch.long)
    for start in range(0, dn.shape[0], block_size):
        blk = dn[start : start + block_size]  # (b, B)
        dist = torch.from_numpy(np.concatenate([
            _popcount(np.bitwise_xor(qn[s0 : s0 + q_block, None, :], blk[None, :, :])).sum(-1, dtype=np.int64)
            for s0 in range(0, qn.shape[0], q_block)]))  # (Q, b)
        cat_d = torch.cat([best_d, dist], dim=1)
        cat_i = torch.cat([best_i, torch.arange(start, start + blk.shape[0]).expand(qn.shape[0], -1)], dim=1)
        # stable sort: equal distances keep document order (the same tie order as one full sort)
        order = torch.sort(cat_d, dim=1, stable=True).indices[:, :k]
        best_d, best_i = cat_d.gather(1, order), cat_i.gather(1, order)
    return best_d, best_i


def quantized_search(queries: torch.Tensor, docs: torch.Tensor, k: int, precision: str,
                     rescore: Optional[int] = None, index: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k documents per query with the documents (and queries) stored at `precision`, as in
    sentence-transformers' quantisation recipe (sentence_transformers.util.quantization.quantize_embeddings):

        float32  exact inner product
        int8     both sides int8 with per-channel ranges calibrated on the document embeddings; int32 dot
        binary   sign bits (ubinary, packed); Hamming distance (faiss IndexBinaryFlat or popcount)

    rescore: with int8 / binary, take the top max(k, rescore) candidates, re-score the first `rescore` of them
    with the float32 query against the stored vectors (int8 values; binary bits as +-1) and put them first, in
    that order. Returns (scores (Q, k'), indices (Q, k')), best first; scores are those of the final ordering
    (higher is better: -Hamming distance for binary)."""
    from sentence_transformers.util.quantization import quantize_embeddings

    bytes_per_vector(docs.shape[1], precision)  # checks the name
    if rescore is not None and rescore < 1:
        raise InputError(f"--rescore must be >= 1, got {rescore}")
    q, d = queries.float().cpu(), docs.float().cpu()
    if precision == "float32":
        return exact_topk(q, d, k, index=index)
    n_cand = min(max(int(k), int(rescore or 0)), d.shape[0])
    if precision == "int8":
        d_np = d.numpy()
        d8 = torch.from_numpy(quantize_embeddings(d_np, "int8", calibration_embeddings=d_np))  # (N, C) int8
        q8 = torch.from_numpy(quantize_embeddings(q.numpy(), "int8", calibration_embeddings=d_np))  # (Q, C)
        scores, idx = topk_blocked(q8.float(), d8.float(), n_cand)  # integer dots, exact in fp32 for C <= 1024
        stored = d8.float()  # (N, C)
    else:
        db = torch.from_numpy(quantize_embeddings(d.numpy(), "ubinary"))  # (N, ceil(C/8)) uint8
        qb = torch.from_numpy(quantize_embeddings(q.numpy(), "ubinary"))
        dist, idx = hamming_topk(qb, db, n_cand, index=index)
        scores = -dist.float()
        stored = None
    if rescore:
        r = min(int(rescore), idx.shape[1])
        cand = idx[:, :r]  # (Q, r)
        if stored is None:  # binary: unpack the candidates' bits to +-1 (sentence-transformers' rescoring)
            bits = torch.from_numpy(np.unpackbits(db[cand.reshape(-1)].numpy(), axis=1))
            vec = (bits[:, : d.shape[1]].float() * 2 - 1).view(*cand.shape, d.shape[1])  # (Q, r, C)
        else:
            vec = stored[cand]  # (Q, r, C)
        s = torch.einsum("qc,qrc->qr", q, vec)  # (Q, r)
        s_sorted, order = torch.sort(s, dim=1, descending=True, stable=True)
        head = cand.gather(1, order)
        # rescored candidates first (their float scores), then the rest in quantised order, below all of them
        tail_scores = s_sorted[:, -1:] - 1.0 - torch.arange(idx.shape[1] - r, dtype=torch.float32)[None, :]
        idx = torch.cat([head, idx[:, r:]], dim=1)
        scores = torch.cat([s_sorted, tail_scores.expand(idx.shape[0], -1)], dim=1)
    return scores[:, :k], idx[:, :k]
