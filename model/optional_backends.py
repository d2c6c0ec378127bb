# Copyright ropebert contributors. Apache-2.0.
"""Optional attention backends (flash-attn, xformers), registered into the model's registry.

They are never imported at module top: registration only checks that the package can be found, and the
package is imported inside the backend function on first use. Not part of the exported HF directory.
"""

from __future__ import annotations

import importlib.util

import torch

from .modeling_ropebert import AttentionContext, register_attention_backend


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def flash_attn_attention(q, k, v, ctx: AttentionContext):
    """flash-attn 2/3 varlen kernel on packed (T, H, D) tokens."""
    from flash_attn import flash_attn_varlen_func

    cu = ctx.cu_seqlens
    return flash_attn_varlen_func(
        q, k, v, cu, cu, ctx.max_seqlen, ctx.max_seqlen, dropout_p=ctx.dropout_p, softmax_scale=ctx.scale
    )


def xformers_attention(q, k, v, ctx: AttentionContext):
    """xformers memory-efficient attention with a block-diagonal mask over packed tokens."""
    from xformers.ops import fmha

    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(ctx.seqlens.tolist())
    out = fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, p=ctx.dropout_p, scale=ctx.scale)
    return out[0]


def _cuda_half(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def register_optional_backends() -> list[str]:
    """Register the optional backends whose packages are installed; returns their names."""
    names = []
    if _installed("flash_attn"):
        register_attention_backend("flash_attn", flash_attn_attention, packed=True, is_available=_cuda_half)
        names.append("flash_attn")
    if _installed("xformers"):
        register_attention_backend(
            "xformers", xformers_attention, packed=True, is_available=lambda d, t: d.type == "cuda"
        )
        names.append("xformers")
    return names
