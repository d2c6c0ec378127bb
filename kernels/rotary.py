# Copyright ropebert contributors. Apache-2.0.
"""Fused rotate-half rotary embedding for q and k together (Triton), with a pure-torch reference.

    out[..., :D/2] = x1 * cos - x2 * sin          x1 = x[..., :D/2], x2 = x[..., D/2:]
    out[..., D/2:] = x2 * cos + x1 * sin          angle = position * inv_freq[i]   (fp64)

One program handles one token: it forms the angles of its position in fp64 from an fp64 inv_freq, reduces them
to (-2 pi, 2 pi) in fp64 and takes cos/sin of the reduced angle in fp32 (no cos/sin table, so 32k-token inputs
cost nothing extra; fp32 angles would be off by ~1e-3 at 32k positions), then rotates all H heads of q and of k.
Positions are per token and may be integer or fractional (fp64: offsets, GP / RP remaps, PI fractions). inv_freq
is (D/2,) or per token (N, D/2) (dynamic NTK gives each sequence its own theta). Backward is the same rotation by
-angle.

Triton is imported lazily: importing this module never requires it. On CPU the kernel runs only under the
Triton interpreter (TRITON_INTERPRET=1 set before triton is first imported).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


def triton_available() -> bool:
    """Whether Triton can be imported here (the kernel then runs on CUDA, or anywhere under TRITON_INTERPRET=1)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------------
# Pure-torch reference
# ----------------------------------------------------------------------------------------------------------


def rotary_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (..., H, D); positions (...); inv_freq (D/2,) or (..., D/2). Angles and cos/sin in fp64; the rotation
    in fp32 (fp64 for fp64 inputs); returns input dtypes."""
    freqs = positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)  # (..., D/2)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    cos, sin = freqs.cos().to(work)[..., None, :], freqs.sin().to(work)[..., None, :]  # (..., 1, D/2)

    def rot(x):
        x1, x2 = x.to(work).chunk(2, dim=-1)  # (..., H, D/2) each
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rot(q), rot(k)


# ----------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rotary_qk_kernel(
        Q, K, QO, KO, POS, INV_FREQ,
        stride_qn, stride_qh, stride_kn, stride_kh,  # input strides (token, head); last dim contiguous
        stride_on, stride_oh,  # output strides (QO and KO share the layout)
        stride_fn,  # inv_freq stride per token: 0 when shared by all tokens
        H: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        CONJ: tl.constexpr,  # rotate by -angle (the backward pass)
    ):
        n = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
        d = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
        dmask = d < HALF
        m = (h < H) & dmask
        pos = tl.load(POS + n).to(tl.float64)
        inv = tl.load(INV_FREQ + n * stride_fn + d, mask=dmask, other=0.0).to(tl.float64)  # (1, BLOCK_D)
        ang = pos * inv  # fp64: exact to ~1e-12 rad at 32k positions
        two_pi = tl.full((1, BLOCK_D), 6.283185307179586, tl.float64)
        turns = (ang / two_pi).to(tl.int64).to(tl.float64)  # whole turns (truncated)
        red = (ang - turns * two_pi).to(tl.float32)  # in (-2 pi, 2 pi): fp32 cos/sin are accurate there
        cos = tl.cos(red)
        sin = tl.sin(red)
        if CONJ:
            sin = -sin
        # q
        q_ptr = Q + n * stride_qn + h * stride_qh + d
        x1 = tl.load(q_ptr, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(q_ptr + HALF, mask=m, other=0.0).to(tl.float32)
        o_ptr = QO + n * stride_on + h * stride_oh + d
        tl.store(o_ptr, (x1 * cos - x2 * sin).to(QO.dtype.element_ty), mask=m)
        tl.store(o_ptr + HALF, (x2 * cos + x1 * sin).to(QO.dtype.element_ty), mask=m)
        # k
        k_ptr = K + n * stride_kn + h * stride_kh + d
        y1 = tl.load(k_ptr, mask=m, other=0.0).to(tl.float32)
        y2 = tl.load(k_ptr + HALF, mask=m, other=0.0).to(tl.float32)
        o_ptr = KO + n * stride_on + h * stride_oh + d
        tl.store(o_ptr, (y1 * cos - y2 * sin).to(KO.dtype.element_ty), mask=m)
        tl.store(o_ptr + HALF, (y2 * cos + y1 * sin).to(KO.dtype.element_ty), mask=m)

    return triton, rotary_qk_kernel


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(..., H, D) -> (N, H, D) view when possible, last dim contiguous."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _launch(q, k, positions, inv_freq, conj: bool):
    """Rotate q and k ((..., H, D), same shape) -> new contiguous tensors of the same shape and dtype."""
    triton, kernel = _kernel()
    shape = q.shape
    H, D = shape[-2], shape[-1]
    q3, k3 = _as_tokens(q), _as_tokens(k)  # (N, H, D)
    N = q3.shape[0]
    pos = positions.reshape(-1)
    if pos.dtype not in (torch.float64, torch.float32, torch.int32, torch.int64):
        pos = pos.to(torch.float64)
    pos = pos.contiguous()
    inv = inv_freq.to(torch.float64)
    if inv.dim() == 1:
        inv, stride_fn = inv.contiguous(), 0
    else:
        inv = inv.reshape(-1, D // 2).contiguous()  # (N, D/2)
        stride_fn = inv.stride(0)
    qo = torch.empty((N, H, D), dtype=q.dtype, device=q.device)
    ko = torch.empty((N, H, D), dtype=k.dtype, device=k.device)
    if N > 0:
        kernel[(N,)](
            q3, k3, qo, ko, pos, inv,
            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1),
            qo.stride(0), qo.stride(1), stride_fn,
            H=H, HALF=D // 2, BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D // 2),
            CONJ=conj,
        )
    return qo.view(shape), ko.view(shape)


class RotaryQK(torch.autograd.Function):
    """Autograd wrapper: forward rotates by +angle, backward rotates the incoming gradients by -angle."""

    @staticmethod
    def forward(ctx, q, k, positions, inv_freq):
        ctx.save_for_backward(positions, inv_freq)
        return _launch(q, k, positions, inv_freq, conj=False)

    @staticmethod
    def backward(ctx, gq, gk):
        positions, inv_freq = ctx.saved_tensors
        gq = torch.zeros_like(gk) if gq is None else gq
        gk = torch.zeros_like(gq) if gk is None else gk
        dq, dk = _launch(gq, gk, positions, inv_freq, conj=True)
        return dq, dk, None, None


def rotary_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused rotary for q and k: (..., H, D) each (packed (T, H, D) or padded (B, L, H, D)), positions (...)
    integer or fractional, inv_freq (D/2,) or (..., D/2). fp32 / bf16 / fp16; returns contiguous tensors."""
    if q.shape != k.shape:
        raise ValueError(f"rotary_triton: q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if q.shape[-1] % 2:
        raise ValueError(f"rotary_triton: head_dim {q.shape[-1]} must be even")
    if positions.shape != q.shape[:-2]:
        raise ValueError(f"rotary_triton: positions {tuple(positions.shape)} != q's token shape {tuple(q.shape[:-2])}")
    if inv_freq.shape[-1] != q.shape[-1] // 2 or (inv_freq.dim() > 1 and inv_freq.shape[:-1] != q.shape[:-2]):
        raise ValueError(
            f"rotary_triton: inv_freq {tuple(inv_freq.shape)} must be (D/2,) or (*positions.shape, D/2) "
            f"with D={q.shape[-1]}"
        )
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"rotary_triton: tensors on {q.device} need CUDA, or TRITON_INTERPRET=1 in the environment before "
            "triton is imported (use rope_impl='torch' on CPU)"
        )
    return RotaryQK.apply(q, k, positions, inv_freq)


def rope_triton(q, k, ctx):
    """ROPE_IMPLS entry "triton": rope_fn(q, k, ctx) -> (q, k) using ctx.positions and ctx.inv_freq."""
    inv = ctx.inv_freq
    if inv.dim() > 1:  # per-token view (may be an expanded broadcast of per-sequence values)
        inv = inv.expand(*ctx.positions.shape, inv.shape[-1])
    return rotary_triton(q, k, ctx.positions, inv)
