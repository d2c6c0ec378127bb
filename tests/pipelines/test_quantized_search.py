"""Quantised search (pipelines/search.py) on a small fixed set against independent computations: int8 by hand from
the corpus calibration ranges, binary as sign-bit Hamming distances, and sentence-transformers-style rescoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ropebert.errors import InputError
from ropebert.pipelines.search import bytes_per_vector, hamming_topk, matryoshka_prefix, quantized_search


def _data(C=20, N=40, Q=6):
    g = torch.Generator().manual_seed(0)
    docs = F.normalize(torch.randn(N, C, generator=g), dim=-1)
    queries = F.normalize(docs[:Q] + 0.3 * torch.randn(Q, C, generator=g), dim=-1)  # query i is near doc i
    return queries, docs


def test_binary_is_hamming_distance_of_sign_bits():
    q, d = _data()
    k = 7
    scores, idx = quantized_search(q, d, k, "binary", index="exact")
    assert idx.shape == (6, k)
    qb, db = (q > 0), (d > 0)  # the bits, unpacked: bit = value > 0
    for i in range(q.shape[0]):
        ham = [int((qb[i] != db[j]).sum()) for j in range(d.shape[0])]
        want = sorted(range(d.shape[0]), key=lambda j: (ham[j], j))[:k]  # nearest first, ties by document order
        assert idx[i].tolist() == want, i
        assert (-scores[i]).long().tolist() == [ham[j] for j in want]


def test_int8_matches_a_hand_calibrated_quantisation():
    q, d = _data()
    k = 5
    scores, idx = quantized_search(q, d, k, "int8", index="exact")
    lo, hi = d.numpy().min(0), d.numpy().max(0)  # per-channel ranges of the corpus
    steps = (hi - lo) / 255

    def q8(x):
        return np.clip(np.floor((x.numpy() - lo) / steps) - 128, -128, 127).astype(np.int64)

    dots = q8(q) @ q8(d).T  # (Q, N) exact integer dots
    for i in range(q.shape[0]):
        want = sorted(range(d.shape[0]), key=lambda j: (-dots[i, j], j))[:k]
        assert sorted(scores[i].long().tolist(), reverse=True) == [int(dots[i, j]) for j in want]
        assert [int(dots[i, j]) for j in idx[i].tolist()] == scores[i].long().tolist()  # each hit's own dot


def test_rescore_orders_the_top_candidates_by_float_query_against_stored_vectors():
    q, d = _data()
    k, K = 4, 12
    _, cand = quantized_search(q, d, K, "binary", index="exact")  # the binary top K
    scores, idx = quantized_search(q, d, k, "binary", rescore=K, index="exact")
    pm1 = (d > 0).float() * 2 - 1  # stored bits as +-1
    for i in range(q.shape[0]):
        s = {j: float(q[i] @ pm1[j]) for j in cand[i].tolist()}
        want = sorted(s, key=lambda j: -s[j])[:k]
        assert idx[i].tolist() == want
        assert scores[i].tolist() == pytest.approx([s[j] for j in want], abs=1e-5)
    # float32 is exact search
    fs, fi = quantized_search(q, d, 3, "float32", index="exact")
    torch.testing.assert_close(fs, (q @ d.T).topk(3, dim=1).values)


def test_packed_popcount_and_helpers():
    bits = torch.tensor([[0b10110000, 0xFF], [0, 0], [0xFF, 0x0F]], dtype=torch.uint8)
    dist, idx = hamming_topk(bits[:1], bits, 3, index="exact", block_size=2)  # blocks of 2 documents
    assert idx.tolist() == [[0, 2, 1]] and dist.tolist() == [[0, 9, 11]]
    assert [bytes_per_vector(384, p) for p in ("float32", "int8", "binary")] == [1536, 384, 48]
    assert bytes_per_vector(20, "binary") == 3
    x = torch.tensor([[3.0, 4.0, 12.0]])
    torch.testing.assert_close(matryoshka_prefix(x, 2), torch.tensor([[0.6, 0.8]]))
    with pytest.raises(InputError, match="outside 1..3"):
        matryoshka_prefix(x, 4)
    with pytest.raises(InputError, match="float32,int8,binary"):
        bytes_per_vector(8, "int4")
    with pytest.raises(InputError, match="--rescore must be >= 1"):
        quantized_search(x, x, 1, "int8", rescore=0)


def test_faiss_binary_index_agrees_with_packed_popcount():
    """With faiss installed, --index faiss / auto searches binary vectors with IndexBinaryFlat: the same Hamming
    distances as the packed-bits popcount, and the same documents up to the order of equal distances."""
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(3)
    q_bits = torch.randint(0, 256, (7, 6), generator=g, dtype=torch.uint8)  # 48-bit codes
    d_bits = torch.randint(0, 256, (50, 6), generator=g, dtype=torch.uint8)
    fd, fi = hamming_topk(q_bits, d_bits, 10, index="faiss")
    ed, ei = hamming_topk(q_bits, d_bits, 10, index="exact")
    assert torch.equal(fd, ed)
    full = torch.tensor([[bin(int(a) ^ int(b)).count("1") for a, b in zip(qr.tolist(), dr.tolist())]
                         for qr in q_bits for dr in d_bits]).view(7, 50, 6).sum(-1)  # independent popcount
    for i in range(7):
        assert torch.equal(full[i, fi[i]], fd[i])  # faiss's distances are the documents' true distances
        kth = int(fd[i, -1])
        assert set(fi[i][fd[i] < kth].tolist()) == set(ei[i][ed[i] < kth].tolist())
    # the end-to-end binary search (sign bits of float vectors) returns the same top-k through either index
    q, d = torch.randn(5, 64, generator=g), torch.randn(40, 64, generator=g)
    for rescore in (None, 20):
        fs, fidx = quantized_search(q, d, 5, "binary", rescore=rescore, index="faiss")
        es, eidx = quantized_search(q, d, 5, "binary", rescore=rescore, index="exact")
        torch.testing.assert_close(fs, es)
        if rescore:
            assert torch.equal(fidx, eidx)  # float rescoring breaks the Hamming ties
