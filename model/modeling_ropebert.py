# Copyright ropebert contributors. Apache-2.0.
"""RoPE BERT encoder (E5-RoPE recipe, LongEmbed): BERT with the absolute position table removed and rotary
embeddings applied to q and k in every layer.

    embeddings:  word + token_type -> LayerNorm -> dropout                 (no position table)
                 (+ config.leading_positions K > 0: an absolute vector for each sequence's first K tokens only)
    each layer:  x -> q, k, v projections; rotary(q), rotary(k) (rotate-half pairing)
                 attn = softmax(q k^T / sqrt(d) + padding mask) v
                 x = LayerNorm(x + dropout(dense(attn)))                   (post-LN)
                 x = LayerNorm(x + dropout(dense(gelu_erf(dense(x)))))
    embedding:   masked mean pooling over the last hidden state + L2 normalisation (no pooler)
    MoE layers (config.moe; 0-based layer i with i % every_n_layers == 1): the FFN of the last line is replaced
                 by a sparse mixture of E such FFNs, top-k routed per token (see "Mixture of experts" below)

This file is the single source of truth for the model: `ropebert export` copies it verbatim (with
configuration_ropebert.py) into the exported Hugging Face directory. It therefore imports only the
standard library, torch and transformers. Optional GPU backends (flash-attn, xformers) and the fused Triton
rotary kernel live in other modules of the ropebert package and plug into the registries below.

Shapes: B batch, L padded length, T packed tokens (sum of lengths), H heads, D head_dim, C hidden size.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput

from .configuration_ropebert import AUTO, RopeBertConfig

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Rotary embeddings (rotate-half pairing: dim i is paired with dim i + D/2, NOT interleaved)
# ----------------------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """inv_freq = 1 / theta^(arange(0, D, 2) / D), fp64, shape (D/2,).

    fp64 because the angles position * inv_freq are formed in fp64 (rope_cos_sin): an fp32 inv_freq alone is off
    by up to 6e-8 relative, i.e. 2e-3 rad at position 32,768."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return (1.0 / (float(theta) ** exponent)).to(device=device)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for arbitrary (integer or fractional) positions, fp32, shape (*positions.shape, D).

    inv_freq: (D/2,) or per token (*positions.shape, D/2). The angles (and cos/sin) are computed in fp64 and
    rounded to fp32 at the end: fp32 angles lose ~1e-3 at 32k positions, fp64 ones stay at fp32 rounding (~6e-8)
    of the exact cos/sin. The tables are (..., D/2) per forward, shared by all layers: cheap."""
    freqs = positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)  # (..., D/2)
    cos, sin = freqs.cos().to(torch.float32), freqs.sin().to(torch.float32)
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)  # (..., D)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., H, D) rotated in fp32 by cos/sin (..., 1, D); returns x's dtype."""
    xf = x.to(torch.float32)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def rope_torch(q: torch.Tensor, k: torch.Tensor, ctx: "AttentionContext") -> tuple[torch.Tensor, torch.Tensor]:
    """Reference rotary implementation: cos/sin computed once per forward (cached on ctx) and shared by layers."""
    cos, sin = ctx.cos_sin()
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


# name -> fn(q, k, ctx) -> (q, k). ropebert.kernels registers "triton" here when Triton is importable.
ROPE_IMPLS: dict[str, Callable] = {"torch": rope_torch}


def register_rope_impl(name: str, fn: Callable) -> None:
    ROPE_IMPLS[name] = fn


# ----------------------------------------------------------------------------------------------------------
# Attention backends: a small registry of functions keyed by name
# ----------------------------------------------------------------------------------------------------------


@dataclass
class AttentionContext:
    """Everything attention needs besides q, k, v; built once per forward and shared by all layers.

    Padded layout (backend.packed False): q/k/v are (B, L, H, D), `attention_mask` (B, L) bool.
    Packed layout (backend.packed True): q/k/v are (T, H, D), `cu_seqlens` (B+1,) int32 and `max_seqlen`.
    `positions` are rotary positions, (B, L) or (T,), integer or fractional (fp64); `inv_freq` is fp64.
    """

    packed: bool
    positions: torch.Tensor
    inv_freq: torch.Tensor
    seqlens: torch.Tensor  # (B,) int32 number of real tokens per sequence
    scale: float
    dropout_p: float
    attention_mask: Optional[torch.Tensor] = None  # (B, L) bool, padded layout only
    has_padding: bool = False
    cu_seqlens: Optional[torch.Tensor] = None  # (B+1,) int32, packed layout only
    max_seqlen: int = 0
    rope_fn: Callable = rope_torch
    # long-context inference (see "Long context" below); None / 0 when unused
    q_scale: Optional[torch.Tensor] = None  # (B, 1, 1, 1) padded or (T, 1, 1) packed: attn_scale_base factor
    self_extend: Optional[tuple[int, int]] = None  # (group_size, window) when some sequence is long
    original_length: int = 0  # sequences not longer than this use plain attention under SelfExtend
    moe_stats: list = field(default_factory=list)  # filled by the MoE layers: (4,) each, see RopeBertMoE
    _cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin broadcastable against q: (B, L, 1, D) padded or (T, 1, D) packed.

        `inv_freq` is (D/2,) shared by all tokens, or (*positions.shape, D/2) per token (dynamic NTK)."""
        if self._cos_sin is None:
            cos, sin = rope_cos_sin(self.positions, self.inv_freq)
            self._cos_sin = (cos.unsqueeze(-2), sin.unsqueeze(-2))
        return self._cos_sin


def eager_attention(q, k, v, ctx: AttentionContext):
    """Reference: explicit softmax(q k^T * scale + mask) v in fp32. (B, L, H, D) -> (B, L, H, D)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * ctx.scale  # (B, H, L, L)
    if ctx.attention_mask is not None:
        scores = scores.masked_fill(~ctx.attention_mask[:, None, None, :], torch.finfo(torch.float32).min)
    probs = scores.softmax(dim=-1)
    if ctx.dropout_p > 0:
        probs = F.dropout(probs, p=ctx.dropout_p)
    out = torch.matmul(probs.to(v.dtype), v)  # (B, H, L, D)
    return out.transpose(1, 2)


def sdpa_attention(q, k, v, ctx: AttentionContext):
    """torch scaled_dot_product_attention on the padded batch with a boolean key mask."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    mask = ctx.attention_mask[:, None, None, :] if ctx.has_padding else None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=ctx.dropout_p, scale=ctx.scale)
    return out.transpose(1, 2)


def sdpa_packed_attention(q, k, v, ctx: AttentionContext):
    """Packed tokens, one SDPA call per sequence. Runs anywhere; the CPU reference for the varlen path."""
    lens = ctx.seqlens.tolist()
    outs = []
    for qs, ks, vs in zip(q.split(lens), k.split(lens), v.split(lens)):  # each (n, H, D)
        if qs.shape[0] == 0:
            continue
        o = F.scaled_dot_product_attention(  # 4-D (1, H, n, D) so CPU/GPU fused kernels apply
            qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None],
            dropout_p=ctx.dropout_p, scale=ctx.scale,
        )
        outs.append(o[0].transpose(0, 1))  # (n, H, D)
    return torch.cat(outs, dim=0) if outs else torch.empty_like(q)  # (T, H, D)


def varlen_attention(q, k, v, ctx: AttentionContext):
    """torch.nn.attention.varlen.varlen_attn (torch >= 2.10, CUDA, fp16/bf16) on packed tokens."""
    from torch.nn.attention.varlen import varlen_attn

    cu = ctx.cu_seqlens
    return varlen_attn(q, k, v, cu, cu, ctx.max_seqlen, ctx.max_seqlen, scale=ctx.scale)


def _has_torch_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class AttentionBackend:
    """A registered attention implementation.

    fn(q, k, v, ctx) -> out, with rotary already applied to q and k.
    packed: True if it consumes packed (T, H, D) tokens with cu_seqlens (the model then unpads once per
        forward, before the embeddings, and re-pads once at the end).
    supports_dropout: whether it implements attention-probability dropout (training with p > 0).
    is_available(device, dtype): whether it can run here.
    """

    name: str
    fn: Callable
    packed: bool
    supports_dropout: bool = True
    is_available: Callable[[torch.device, torch.dtype], bool] = lambda device, dtype: True


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {}

# order in which "auto" tries backends
AUTO_PREFERENCE: list[str] = ["varlen", "flash_attn", "xformers", "sdpa"]


def register_attention_backend(
    name: str,
    fn: Callable,
    *,
    packed: bool,
    supports_dropout: bool = True,
    is_available: Callable[[torch.device, torch.dtype], bool] = lambda device, dtype: True,
) -> None:
    ATTENTION_BACKENDS[name] = AttentionBackend(name, fn, packed, supports_dropout, is_available)


register_attention_backend("eager", eager_attention, packed=False)
register_attention_backend("sdpa", sdpa_attention, packed=False)
register_attention_backend("sdpa_packed", sdpa_packed_attention, packed=True)
register_attention_backend(
    "varlen",
    varlen_attention,
    packed=True,
    supports_dropout=False,
    is_available=lambda device, dtype: device.type == "cuda"
    and dtype in (torch.float16, torch.bfloat16)
    and _has_torch_varlen(),
)


def get_attention_backend(name: str) -> AttentionBackend:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"Unknown attention backend {name!r}; available: {sorted(ATTENTION_BACKENDS)} or 'auto' "
            "(flash_attn / xformers register themselves when `ropebert.model` is imported and they are installed)"
        )
    return ATTENTION_BACKENDS[name]


# on CPU, "auto" unpads (sdpa_packed) when at least this fraction of the padded batch is padding: the linear
# layers then run on real tokens only, which outweighs the per-sequence attention calls
CPU_PACKED_MIN_PADDING = 0.2


def resolve_attention_backend(
    name: str, device: torch.device, dtype: torch.dtype, needs_dropout: bool, padding_fraction: float = 0.0
) -> AttentionBackend:
    """Pick the backend for one forward. 'auto' takes the first available of AUTO_PREFERENCE (CUDA), and on
    CPU sdpa_packed for batches with much padding, else sdpa."""
    if name != "auto":
        backend = get_attention_backend(name)
        if not backend.is_available(device, dtype):
            raise RuntimeError(f"Attention backend {name!r} cannot run on device={device} dtype={dtype}")
        if needs_dropout and not backend.supports_dropout:
            raise RuntimeError(
                f"Attention backend {name!r} has no attention dropout; set attention_probs_dropout_prob=0 "
                "for training with it, or choose 'sdpa' / 'auto'"
            )
        return backend
    if device.type == "cpu":
        return ATTENTION_BACKENDS["sdpa_packed" if padding_fraction >= CPU_PACKED_MIN_PADDING else "sdpa"]
    for cand in AUTO_PREFERENCE:
        backend = ATTENTION_BACKENDS.get(cand)
        if backend is None or (needs_dropout and not backend.supports_dropout):
            continue
        if backend.is_available(device, dtype):
            return backend
    return ATTENTION_BACKENDS["sdpa"]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, backend: AttentionBackend):
    """Rotary on q and k, then the backend. The seam where long-context attention variants plug in:
    SelfExtend replaces the backend (eager backend -> the three-map reference, any other -> fused partials)."""
    if ctx.self_extend is not None:
        if ctx.dropout_p > 0:
            raise RuntimeError(
                "self_extend is an inference method and has no attention dropout; call model.eval() or set "
                "attention_probs_dropout_prob=0"
            )
        impl = "eager" if backend.name == "eager" else "fused"
        return SELF_EXTEND_IMPLS[impl](q, k, v, ctx)
    q, k = ctx.rope_fn(q, k, ctx)
    if ctx.q_scale is not None:
        q = q * ctx.q_scale.to(q.dtype)
    return backend.fn(q, k, v, ctx)


# ----------------------------------------------------------------------------------------------------------
# Long context (inference beyond the trained length; all driven by config keys read at forward time)
#
#   rope_theta / rope_scaling  NTK-aware theta, dynamic NTK (theta from each sequence's length), PI (p / s)
#   position_mode              gp: p // s, rp: p mod original length
#                              (PI / GP factor "auto": s = ceil(n / original length) per sequence, LongEmbed's
#                              rule; sequences within the original length keep their positions)
#   attn_scale_base            q *= max(1, ln n / ln base) per sequence
#   self_extend                LongEmbed's bidirectional SelfExtend: for a sequence longer than the original
#                              length, the score of (i, j) uses
#                                |i - j| <  w : q at p_i,               k at p_j               (window map)
#                                i - j  >= w : q at p_i // g + w - w//g, k at p_j // g         (lower map)
#                                j - i  >= w : q at p_i // g,           k at p_j // g + w - w//g (upper map)
#                              self_extend_eager materialises the three score maps (the reference);
#                              self_extend_flex computes the three as masked partial attentions with
#                              FlexAttention (block-sparse, compiled on GPU: never L x L there) and merges
#                              them by their log-sum-exp; self_extend_chunked (CPU) runs the three-map
#                              formula one block of queries at a time (memory chunk x L).
# ----------------------------------------------------------------------------------------------------------


def auto_scale_factors(seqlens: torch.Tensor, original_length: int) -> torch.Tensor:
    """LongEmbed's per-input factor ceil(n / L0) for each sequence's non-padding length n; 1 for n <= L0. (B,) long."""
    n = seqlens.to(torch.long)
    return ((n + original_length - 1) // original_length).clamp(min=1)


def long_context_positions(position_ids: torch.Tensor, config: RopeBertConfig,
                           seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Apply position_mode (gp / rp) and PI to rotary positions. (B, L) -> (B, L), long or fp64.

    A factor "auto" (position_scale, rope_scaling.factor) is ceil(n / original length) per sequence (seqlens
    (B,) needed), so sequences within the trained length keep their positions exactly."""
    p = position_ids

    def factor(value):  # a number, or (B, 1) long per sequence for "auto"
        if value != AUTO:
            return value
        if seqlens is None:
            raise ValueError('long_context_positions: a factor "auto" needs the sequence lengths')
        return auto_scale_factors(seqlens, config.original_length).to(p.device)[:, None]

    if config.position_mode == "gp":
        s = factor(config.position_scale)
        if isinstance(s, torch.Tensor) or float(s).is_integer():
            p = p // (s if isinstance(s, torch.Tensor) else int(s))
        else:
            p = torch.floor(p.to(torch.float64) / s)
    elif config.position_mode == "rp":
        p = p % config.original_length
    rs = config.rope_scaling
    if rs is not None and rs["type"] == "pi":
        f = factor(rs["factor"])
        p = p.to(torch.float64) / (f.to(torch.float64) if isinstance(f, torch.Tensor) else float(f))
    return p


def long_context_inv_freq(head_dim: int, config: RopeBertConfig, seqlens: torch.Tensor) -> torch.Tensor:
    """inv_freq (D/2,), or per sequence (B, D/2) under dynamic NTK when some sequence exceeds the original
    length: theta_n = theta * (f * n / orig - (f - 1)) ** (D / (D - 2)) for n > orig, else theta."""
    device = seqlens.device
    rs, orig = config.rope_scaling, config.original_length
    if rs is None or rs["type"] != "dynamic_ntk" or int(seqlens.max()) <= orig:
        return rope_inv_freq(head_dim, config.rope_theta, device)
    f = float(rs["factor"])
    n = seqlens.to(torch.float64).clamp(min=orig)  # (B,) sequences within the original length keep theta
    theta = config.rope_theta * (f * n / orig - (f - 1)).clamp(min=1.0) ** (head_dim / (head_dim - 2))  # (B,)
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim  # (D/2,)
    return 1.0 / theta[:, None] ** exponent[None, :]  # (B, D/2) fp64


def attn_scale_factors(seqlens: torch.Tensor, base: Optional[float]) -> Optional[torch.Tensor]:
    """max(1, ln n / ln base) per sequence (B,) fp32, or None when disabled or no sequence is longer than base."""
    if base is None or int(seqlens.max()) <= base:
        return None
    n = seqlens.to(torch.float32).clamp(min=1.0)
    return (n.log() / math.log(base)).clamp(min=1.0)


def _with_positions(ctx: AttentionContext, positions: torch.Tensor) -> AttentionContext:
    return dataclasses.replace(ctx, positions=positions, _cos_sin=None)


def _self_extend_rotations(q, k, ctx: AttentionContext):
    """The three rotary variants of q and k SelfExtend needs (each pair from one rope_fn call):
    (q_p, k_p) at p, (q_g, k_g) at p // g, (q_gs, k_gs) at p // g + w - w // g. q is also attn-scaled."""
    g, w = ctx.self_extend
    pos = ctx.positions
    grouped = pos // g if not pos.is_floating_point() else torch.floor(pos / g)
    shifted = grouped + (w - w // g)
    out = []
    for p in (pos, grouped, shifted):
        qr, kr = ctx.rope_fn(q, k, _with_positions(ctx, p))
        if ctx.q_scale is not None:
            qr = qr * ctx.q_scale.to(qr.dtype)
        out.append((qr, kr))
    return out


def _self_extend_layout(q, ctx: AttentionContext):
    """Per-token document id and "long" flag in a (B', L') layout shared by the padded and packed paths.

    Padded: B' = B, doc[b, i] = b for real tokens and -1 for padding. Packed: B' = 1, doc = sequence index.
    long[b, i]: the token's sequence is longer than the original length (SelfExtend applies to it).
    """
    long_seq = ctx.seqlens > ctx.original_length  # (B,)
    if ctx.packed:
        B = ctx.seqlens.shape[0]
        doc = torch.repeat_interleave(torch.arange(B, device=q.device), ctx.seqlens.long())[None]  # (1, T)
        return doc, long_seq[doc]
    B, L = ctx.attention_mask.shape
    doc = torch.arange(B, device=q.device)[:, None].expand(B, L)
    doc = torch.where(ctx.attention_mask, doc, torch.full_like(doc, -1))  # (B, L)
    return doc, long_seq[:, None].expand(B, L) & ctx.attention_mask


def _to_bhld(x: torch.Tensor, packed: bool) -> torch.Tensor:
    """(B, L, H, D) or packed (T, H, D) -> (B', H, L', D)."""
    return (x[None] if packed else x).transpose(1, 2)


def _from_bhld(x: torch.Tensor, packed: bool) -> torch.Tensor:
    x = x.transpose(1, 2)  # (B', L', H, D)
    return x[0] if packed else x


def self_extend_eager(q, k, v, ctx: AttentionContext):
    """Reference SelfExtend: materialises the window, lower and upper score maps (B', H, L', L') in fp32,
    picks one per (i, j) and takes one softmax. Sequences not longer than the original use the window map
    everywhere (= plain attention)."""
    g, w = ctx.self_extend
    (qp, kp), (qg, kg), (qs, ks) = _self_extend_rotations(q, k, ctx)
    doc, long_tok = _self_extend_layout(q, ctx)  # (B', L')
    qp, kp, qg, kg, qs, ks, vv = (_to_bhld(t, ctx.packed).float() for t in (qp, kp, qg, kg, qs, ks, v))
    s_win = qp @ kp.transpose(-1, -2)  # (B', H, L', L')
    s_low = qs @ kg.transpose(-1, -2)  # q at p//g + w - w//g, k at p//g
    s_up = qg @ ks.transpose(-1, -2)  # q at p//g, k at p//g + w - w//g
    idx = torch.arange(doc.shape[1], device=q.device)
    d = idx[:, None] - idx[None, :]  # (L', L') i - j
    lng = long_tok[:, None, :, None]  # (B', 1, L', 1)
    scores = torch.where(lng & (d >= w), s_low, torch.where(lng & (-d >= w), s_up, s_win)) * ctx.scale
    same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, None, :] >= 0)  # (B', L', L')
    scores = scores.masked_fill(~same[:, None], float("-inf"))
    probs = torch.nan_to_num(scores.softmax(dim=-1))  # fully masked (padding) rows -> 0
    out = (probs @ vv).to(v.dtype)  # (B', H, L', D)
    return _from_bhld(out, ctx.packed)


def self_extend_chunked(q, k, v, ctx: AttentionContext, chunk: int = 512):
    """The three-map formula of self_extend_eager, one block of `chunk` queries [s0, s1) at a time: scores are
    (B', H, chunk, L'), never L x L. Each map is only computed on the keys it can cover: lower keys
    [0, s1 - w), upper keys [s0 + w, L'), window keys (s0 - w, s1 + w) (all keys when the block holds a token of
    a sequence within the original length, which uses the window map everywhere). The CPU path: compiled
    FlexAttention has no log-sum-exp output on CPU."""
    g, w = ctx.self_extend
    (qp, kp), (qg, kg), (qs, ks) = _self_extend_rotations(q, k, ctx)
    doc, long_tok = _self_extend_layout(q, ctx)  # (B', L')
    qp, kp, qg, kg, qs, ks, vv = (_to_bhld(t, ctx.packed) for t in (qp, kp, qg, kg, qs, ks, v))
    kp_t, kg_t, ks_t = (t.float().transpose(-1, -2) for t in (kp, kg, ks))  # (B', H, D, L')
    vf = vv.float()
    Bp, H, Lp, _ = vv.shape
    idx = torch.arange(Lp, device=q.device)
    out = torch.empty(vv.shape, dtype=torch.float32, device=q.device)  # (B', H, L', D)
    for s0 in range(0, Lp, chunk):
        s1 = min(s0 + chunk, Lp)
        lng = long_tok[:, None, s0:s1, None]  # (B', 1, c, 1)
        all_long = bool((long_tok[:, s0:s1] | (doc[:, s0:s1] < 0)).all())
        wl, wr = (max(0, s0 - w + 1), min(Lp, s1 + w - 1)) if all_long else (0, Lp)
        a, b = max(0, s1 - w), min(Lp, s0 + w)  # lower-map keys [0, a), upper-map keys [b, L')
        scores = torch.full((Bp, H, s1 - s0, Lp), float("-inf"), dtype=torch.float32, device=q.device)
        if a > 0:
            d = idx[s0:s1, None] - idx[None, :a]  # (c, a) i - j
            scores[..., :a] = torch.where(lng & (d >= w), qs[:, :, s0:s1].float() @ kg_t[..., :a], scores[..., :a])
        if b < Lp:
            d = idx[s0:s1, None] - idx[None, b:]
            scores[..., b:] = torch.where(lng & (-d >= w), qg[:, :, s0:s1].float() @ ks_t[..., b:], scores[..., b:])
        d = idx[s0:s1, None] - idx[None, wl:wr]
        win = ~lng | (d.abs() < w)  # disjoint from the two conditions above for long rows
        scores[..., wl:wr] = torch.where(win, qp[:, :, s0:s1].float() @ kp_t[..., wl:wr], scores[..., wl:wr])
        same = (doc[:, s0:s1, None] == doc[:, None, :]) & (doc[:, None, :] >= 0)  # (B', c, L')
        scores = (scores * ctx.scale).masked_fill(~same[:, None], float("-inf"))
        out[:, :, s0:s1] = torch.nan_to_num(scores.softmax(dim=-1)) @ vf
    return _from_bhld(out.to(v.dtype), ctx.packed)


def _flash_cpu():
    """aten's CPU flash attention returning (out, logsumexp), or None where this torch lacks it."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _band_attention(flash, q, k, v, w: int, scale: float, chunk: int = 256):
    """Attention restricted to |i - j| < w, (H, n, D) fp32 -> (out (H, n, D), lse (H, n)); blocks of `chunk`
    queries see only their keys (s0 - w, s1 + w), through the CPU flash op with the band as its mask."""
    H, n, D = q.shape
    out, lse = torch.empty_like(q), torch.empty(H, n, dtype=q.dtype, device=q.device)
    idx = torch.arange(n, device=q.device)
    for s0 in range(0, n, chunk):
        s1 = min(s0 + chunk, n)
        a, b = max(0, s0 - w + 1), min(n, s1 + w - 1)
        band = (idx[s0:s1, None] - idx[None, a:b]).abs() < w  # (c, nk): every row keeps j = i
        bias = torch.zeros(band.shape, dtype=q.dtype, device=q.device).masked_fill_(~band, float("-inf"))
        o, l = flash(q[None, :, s0:s1], k[None, :, a:b], v[None, :, a:b], 0.0, False, attn_mask=bias, scale=scale)
        out[:, s0:s1], lse[:, s0:s1] = o[0], l[0]
    return out, lse


def self_extend_split(q, k, v, ctx: AttentionContext):
    """SelfExtend as three partial attentions merged by log-sum-exp (as self_extend_flex), each one dense and
    fused on the CPU: per sequence of n tokens,
      window  |i - j| < w, q and k at p            a band, `chunk` queries at a time
      lower   j <= i - w, q at p//g + w - w//g, k at p//g: causal attention of queries [w, n) on keys [0, n - w)
      upper   j >= i + w, q at p//g, k at p//g + w - w//g: the same on both reversed (causal again)
    with aten's CPU flash attention, which skips the masked half of a causal map and returns the log-sum-exp.
    Sequences within the original length take plain attention. Falls back to the query-chunked formula where
    this torch lacks the CPU flash op, or when a padded row's real tokens are not contiguous."""
    flash = _flash_cpu()
    mask = ctx.attention_mask
    if flash is None or q.device.type != "cpu":
        return self_extend_chunked(q, k, v, ctx)
    if not ctx.packed:
        # each row's real tokens must be one run [first, first + n) (right or left padding) to be sliced out
        first = mask.float().argmax(dim=-1)  # (B,) first real token
        pos = torch.arange(mask.shape[-1], device=mask.device)  # (L,)
        run = (pos >= first[:, None]) & (pos < (first + ctx.seqlens.to(first.dtype))[:, None])  # (B, L)
        if not bool((run == mask.bool()).all()):
            return self_extend_chunked(q, k, v, ctx)
    g, w = ctx.self_extend
    rots = _self_extend_rotations(q, k, ctx)  # (q_p, k_p), (q_g, k_g), (q_gs, k_gs)
    out = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    if ctx.packed:
        starts = ctx.cu_seqlens[:-1].tolist()
    else:
        starts = first.tolist()
    for b, (s0, n) in enumerate(zip(starts, ctx.seqlens.tolist())):
        if n == 0:
            continue

        def seq(x):  # (H, n, D) fp32 of sequence b
            x = x[s0 : s0 + n] if ctx.packed else x[b, s0 : s0 + n]
            return x.transpose(0, 1).float()

        (qp, kp), (qg, kg), (qs, ks) = ((seq(a), seq(c)) for a, c in rots)
        vv = seq(v)
        if n <= ctx.original_length:  # plain attention
            o = flash(qp[None], kp[None], vv[None], 0.0, False, scale=ctx.scale)[0][0]
        else:
            parts = [_band_attention(flash, qp, kp, vv, w, ctx.scale)]
            m = n - w
            if m > 0:
                neg = torch.full((qp.shape[0], w), float("-inf"), dtype=torch.float32, device=v.device)
                pad = torch.zeros(qp.shape[0], w, vv.shape[-1], dtype=torch.float32, device=v.device)
                o_lo, l_lo = flash(qs[None, :, w:], kg[None, :, :m], vv[None, :, :m], 0.0, True, scale=ctx.scale)
                parts.append((torch.cat([pad, o_lo[0]], 1), torch.cat([neg, l_lo[0].float()], 1)))
                r = lambda x: x.flip(1)  # noqa: E731  reverse the token order
                o_up, l_up = flash(r(qg[:, :m])[None], r(ks[:, w:])[None], r(vv[:, w:])[None], 0.0, True,
                                   scale=ctx.scale)
                parts.append((torch.cat([r(o_up[0]), pad], 1), torch.cat([l_up[0].float().flip(1), neg], 1)))
            lse = torch.stack([l for _, l in parts]).logsumexp(dim=0)  # (H, n): every row has its own key
            o = sum(torch.exp(l - lse)[..., None] * oo for oo, l in parts)
        o = o.transpose(0, 1)  # (n, H, D)
        if ctx.packed:
            out[s0 : s0 + n] = o
        else:
            out[b, s0 : s0 + n] = o
    return out.to(v.dtype)


def _flex():
    """flex_attention, compiled on first GPU use (fused, block-sparse); None on torch < 2.5."""
    try:
        from torch.nn.attention import flex_attention as fa
    except Exception:
        return None
    return fa


_COMPILED_FLEX: dict = {}
# device types on which FlexAttention (and its block masks) is compiled into fused kernels; elsewhere it runs
# its unfused path, which materialises the scores. (torch 2.13 cannot compile it on CPU with the lse output.)
FLEX_COMPILE_DEVICES: set = {"cuda"}


def _flex_call(q, k, v, block_mask, scale):
    """flex_attention returning (out, lse); compiled on FLEX_COMPILE_DEVICES, eager elsewhere (unfused math)."""
    fa = _flex()
    fn = fa.flex_attention
    if q.device.type in FLEX_COMPILE_DEVICES:
        if "fn" not in _COMPILED_FLEX:
            _COMPILED_FLEX["fn"] = torch.compile(fa.flex_attention, dynamic=True)
        fn = _COMPILED_FLEX["fn"]
    if hasattr(fa, "AuxRequest"):
        out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, return_aux=fa.AuxRequest(lse=True))
        return out, aux.lse
    return fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)


def self_extend_flex(q, k, v, ctx: AttentionContext):
    """SelfExtend as three masked partial attentions (window / lower / upper) merged by log-sum-exp:

        out = sum_m exp(lse_m - lse) out_m,  lse = logsumexp_m lse_m

    Each partial is a FlexAttention call with a block mask, so blocks outside its map are skipped; on GPU the
    compiled kernel never forms an L x L matrix. Falls back to the chunked formula when FlexAttention is
    missing (torch < 2.5)."""
    fa = _flex()
    if fa is None:
        return self_extend_chunked(q, k, v, ctx)
    g, w = ctx.self_extend
    (qp, kp), (qg, kg), (qs, ks) = _self_extend_rotations(q, k, ctx)
    doc, long_tok = _self_extend_layout(q, ctx)  # (B', L')
    Bp, Lp = doc.shape

    def same(b, qi, ki):
        return (doc[b, qi] == doc[b, ki]) & (doc[b, ki] >= 0)

    def window_map(b, h, qi, ki):
        return same(b, qi, ki) & (((qi - ki).abs() < w) | ~long_tok[b, qi])

    def lower_map(b, h, qi, ki):
        return same(b, qi, ki) & long_tok[b, qi] & (qi - ki >= w)

    def upper_map(b, h, qi, ki):
        return same(b, qi, ki) & long_tok[b, qi] & (ki - qi >= w)

    vv = _to_bhld(v, ctx.packed)
    outs, lses = [], []
    for mask_mod, qq, kk in ((window_map, qp, kp), (lower_map, qs, kg), (upper_map, qg, ks)):
        compiled = q.device.type in FLEX_COMPILE_DEVICES
        bm = fa.create_block_mask(mask_mod, Bp, None, Lp, Lp, device=q.device, _compile=compiled)
        o, lse = _flex_call(_to_bhld(qq, ctx.packed), _to_bhld(kk, ctx.packed), vv, bm, ctx.scale)
        outs.append(o)  # (B', H, L', D)
        lses.append(lse.float())  # (B', H, L')
    lse = torch.stack(lses).logsumexp(dim=0)  # (B', H, L')
    lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # rows with no key (padding) -> out 0
    out = sum(torch.exp(l - lse)[..., None] * o.float() for l, o in zip(lses, outs))
    return _from_bhld(out.to(v.dtype), ctx.packed)


def self_extend_fused(q, k, v, ctx: AttentionContext):
    """SelfExtend for every backend but "eager": compiled FlexAttention partials where FlexAttention compiles
    (GPU), else three dense partials per sequence through the CPU flash kernel (self_extend_split), else the
    query-chunked formula."""
    if q.device.type in FLEX_COMPILE_DEVICES and _flex() is not None:
        return self_extend_flex(q, k, v, ctx)
    return self_extend_split(q, k, v, ctx)


# "eager" = reference (used with attn_backend="eager"), "fused" = what every other backend uses
SELF_EXTEND_IMPLS: dict[str, Callable] = {
    "eager": self_extend_eager,
    "fused": self_extend_fused,
    "flex": self_extend_flex,
    "chunked": self_extend_chunked,
    "split": self_extend_split,
}


# ----------------------------------------------------------------------------------------------------------
# Modules (names follow BERT so BERT / E5-RoPE checkpoints load without renaming)
# ----------------------------------------------------------------------------------------------------------


class RopeBertEmbeddings(nn.Module):
    def __init__(self, config: RopeBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        # config.leading_positions K > 0: an absolute vector for the first K tokens of each sequence only
        k = int(getattr(config, "leading_positions", 0) or 0)
        self.leading_position_embeddings = nn.Embedding(k, config.hidden_size) if k else None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                token_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids / token_type_ids (B, L) or (T,); token_index: the same shape, each token's index in its
        sequence (0..n-1 over real tokens; needed with leading_positions)."""
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (..., C)
        table = self.leading_position_embeddings
        if table is not None:
            if token_index is None:
                raise ValueError("RopeBertEmbeddings: leading_positions needs each token's index in its sequence")
            k = table.num_embeddings
            lead = token_index < k  # (...,) tokens that get an absolute vector
            x = x + table(token_index.clamp(0, k - 1)) * lead.unsqueeze(-1).to(x.dtype)  # (..., C)
        return self.dropout(self.LayerNorm(x))


class RopeBertSelfAttention(nn.Module):
    def __init__(self, config: RopeBertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, backend: AttentionBackend) -> torch.Tensor:
        lead = x.shape[:-1]  # (B, L) or (T,)
        # one GEMM for q, k and v while the weights keep their BERT names
        w = torch.cat((self.query.weight, self.key.weight, self.value.weight), dim=0)  # (3C, C)
        b = torch.cat((self.query.bias, self.key.bias, self.value.bias), dim=0)
        qkv = F.linear(x, w, b).view(*lead, 3, self.num_heads, self.head_dim)  # (..., 3, H, D)
        q, k, v = qkv.unbind(dim=-3)  # each (..., H, D)
        out = attend(q, k, v, ctx, backend)  # (..., H, D)
        return out.reshape(*lead, self.num_heads * self.head_dim)


class RopeBertSelfOutput(nn.Module):
    def __init__(self, config: RopeBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class RopeBertAttention(nn.Module):
    def __init__(self, config: RopeBertConfig):
        super().__init__()
        self.self = RopeBertSelfAttention(config)
        self.output = RopeBertSelfOutput(config)

    def forward(self, x, ctx, backend):
        return self.output(self.self(x, ctx, backend), x)


class RopeBertIntermediate(nn.Module):
    def __init__(self, config: RopeBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]  # "gelu" = exact erf GELU

    def forward(self, x):
        return self.act(self.dense(x))


class RopeBertOutput(nn.Module):
    def __init__(self, config: RopeBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class RopeBertLayer(nn.Module):
    def __init__(self, config: RopeBertConfig):
        super().__init__()
        self.attention = RopeBertAttention(config)
        self.intermediate = RopeBertIntermediate(config)
        self.output = RopeBertOutput(config)

    def forward(self, x, ctx, backend):
        x = self.attention(x, ctx, backend)
        return self.output(self.intermediate(x), x)


# ----------------------------------------------------------------------------------------------------------
# Mixture of experts (Nomic Embed v2): in an MoE layer the FFN is replaced by E experts, each a BERT FFN
# (intermediate dense -> exact GELU -> output dense), and a bias-free router:
#
#   p = softmax(x W_r^T)                          (T, E)   router probabilities, fp32
#   w, e = top_k(p)                               (T, k)   token choice; w /= w.sum() when normalize_weights
#   y_t = sum_j w_tj * FFN_{e_tj}(x_t)            (T, C)   replaces dense(gelu(dense(x))) in the post-LN block
#
# Dropless: every token reaches its k experts, no capacity. Only real tokens are routed (padded batches are
# unpadded inside the layer). Dispatch "sorted": the T*k (token, expert) slots are sorted by expert so each
# expert runs one GEMM pair on a contiguous slice, and the weighted outputs are scattered back; "grouped": the
# same slices, each projection of all experts as one grouped GEMM (torch._grouped_mm; the default where it runs:
# CPU, and bf16 on sm90+ CUDA); "dense" (the reference for tests): every expert on every token, combined with the
# routing weights (0 for unchosen experts).
# Load balancing (Switch Transformer): aux = E * sum_e f_e * P_e per layer, f_e the fraction of the T*k slots
# routed to e, P_e the mean router probability of e; 1 when perfectly balanced, E when all go to one expert.
# ----------------------------------------------------------------------------------------------------------


class RopeBertExperts(nn.Module):
    """E BERT FFNs with stacked weights: intermediate (E, I, C) + (E, I), output (E, C, I) + (E, C)."""

    def __init__(self, config: RopeBertConfig):
        super().__init__()
        E, C, inner = int(config.moe["num_experts"]), config.hidden_size, config.intermediate_size
        self.num_experts = E
        self.intermediate_weight = nn.Parameter(torch.empty(E, inner, C))
        self.intermediate_bias = nn.Parameter(torch.zeros(E, inner))
        self.output_weight = nn.Parameter(torch.empty(E, C, inner))
        self.output_bias = nn.Parameter(torch.zeros(E, C))
        self.act = ACT2FN[config.hidden_act]  # "gelu" = exact erf GELU, as the dense FFN
        # initialised by RopeBertPreTrainedModel._init_weights (normal(initializer_range) weights, zero biases)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """FFN of expert e on x (n, C) -> (n, C)."""
        h = self.act(F.linear(x, self.intermediate_weight[e], self.intermediate_bias[e]))  # (n, I)
        return F.linear(h, self.output_weight[e], self.output_bias[e])  # (n, C)


def _sort_slots(index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The T*k (token, expert) slots of index (T, k) sorted by expert (stable): (order (T*k,) of the flat slots,
    token (T*k,) of each sorted slot, slots per expert (E,))."""
    flat = index.reshape(-1)  # (T*k,) expert of each slot
    order = flat.argsort(stable=True)  # slots grouped by expert
    return order, order // index.shape[1], torch.bincount(flat, minlength=num_experts)


def moe_dispatch_sorted(experts: RopeBertExperts, x: torch.Tensor, weights: torch.Tensor,
                        index: torch.Tensor) -> torch.Tensor:
    """Dropless sparse dispatch. x (T, C), weights / index (T, k) -> (T, C).

    The T*k slots are sorted by expert (stable), each expert runs on its contiguous slice of the gathered tokens,
    and the outputs, scaled by their routing weight, are summed back into their tokens."""
    order, token, counts = _sort_slots(index, experts.num_experts)
    xs = x[token]  # (T*k, C)
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            outs.append(experts.expert(e, xs[start : start + n]))  # (n, C)
        start += n
    ys = torch.cat(outs, dim=0) if outs else xs.new_zeros(0, x.shape[-1])  # (T*k, C)
    ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
    return torch.zeros_like(x).index_add_(0, token, ys)  # (T, C)


def moe_dispatch_dense(experts: RopeBertExperts, x: torch.Tensor, weights: torch.Tensor,
                       index: torch.Tensor) -> torch.Tensor:
    """Reference: every expert on every token, masked by the routing weights. x (T, C), weights / index (T, k)."""
    combine = torch.zeros(x.shape[0], experts.num_experts, dtype=weights.dtype, device=x.device)
    combine.scatter_(1, index, weights)  # (T, E), zero for experts a token did not choose
    ys = torch.stack([experts.expert(e, x) for e in range(experts.num_experts)], dim=1)  # (T, E, C)
    return (ys * combine[..., None].to(ys.dtype)).sum(dim=1)  # (T, C)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's where it is on, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, offs: torch.Tensor,
                    expert: torch.Tensor) -> torch.Tensor:
    """One grouped GEMM: rows offs[e-1]:offs[e] of x (N, in) times weight[e]^T (E, out, in) plus bias[e] (E, out).
    expert (N,) is each row's expert (for the bias). Empty experts are empty groups."""
    y = torch._grouped_mm(x, weight.transpose(-2, -1), offs=offs)  # (N, out)
    if y.requires_grad:  # its backward needs a contiguous incoming gradient (a sum's expanded one is not)
        y.register_hook(lambda g: g.contiguous())
    return y + bias[expert]


def moe_dispatch_grouped(experts: RopeBertExperts, x: torch.Tensor, weights: torch.Tensor,
                         index: torch.Tensor) -> torch.Tensor:
    """As "sorted", but each projection of all experts is ONE grouped GEMM (torch._grouped_mm over the experts'
    slices of the sorted slots) instead of a Python loop of E GEMMs. x (T, C), weights / index (T, k) -> (T, C)."""
    if index.shape[0] == 0:  # no token: zero, attached to the routing weights' graph as "sorted" is
        return torch.zeros_like(x) + (weights.sum() * 0).to(x.dtype)
    order, token, counts = _sort_slots(index, experts.num_experts)
    expert = index.reshape(-1)[order]  # (T*k,) expert of each sorted slot
    offs = counts.cumsum(0).to(torch.int32)  # (E,) slice ends
    dtype = _compute_dtype(x)
    xs = x[token].to(dtype)  # (T*k, C)
    h = experts.act(_grouped_linear(xs, experts.intermediate_weight.to(dtype), experts.intermediate_bias.to(dtype),
                                    offs, expert))  # (T*k, I)
    ys = _grouped_linear(h, experts.output_weight.to(dtype), experts.output_bias.to(dtype), offs, expert)  # (T*k, C)
    ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
    return torch.zeros(x.shape, dtype=ys.dtype, device=x.device).index_add_(0, token, ys).to(x.dtype)  # (T, C)


_GROUPED_MM_RUNS: dict = {}  # (device type, dtype) -> whether a probe of torch._grouped_mm ran forward + backward


@torch.compiler.disable  # a Python-level probe and cache: run eagerly, never traced
def grouped_mm_available(x: torch.Tensor) -> bool:
    """Whether "grouped" can run on x: torch has _grouped_mm, on CUDA the input is bf16 on sm90+ (its CUDA kernel's
    constraint), and a tiny forward + backward of it ran once on this device type and dtype (older builds lack
    kernels for some of them)."""
    if not hasattr(torch, "_grouped_mm") or x.device.type not in ("cpu", "cuda"):
        return False
    dev, dtype = x.device.type, _compute_dtype(x)
    if dev == "cuda" and (dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0)):
        return False
    key = (dev, dtype)
    if key not in _GROUPED_MM_RUNS:
        try:
            with torch.enable_grad(), torch.autocast(dev, enabled=False):
                a = torch.ones(32, 16, dtype=dtype, device=x.device, requires_grad=True)
                b = torch.ones(2, 16, 16, dtype=dtype, device=x.device, requires_grad=True)
                offs = torch.tensor([16, 32], dtype=torch.int32, device=x.device)
                torch._grouped_mm(a, b, offs=offs).backward(torch.ones(32, 16, dtype=dtype, device=x.device))
            _GROUPED_MM_RUNS[key] = True
        except (RuntimeError, NotImplementedError):
            _GROUPED_MM_RUNS[key] = False
    return _GROUPED_MM_RUNS[key]


# name -> fn(experts, x (T, C), weights (T, k), index (T, k)) -> (T, C); RopeBertMoE.impl picks one ("auto":
# "grouped" where grouped_mm_available, else "sorted")
MOE_IMPLS: dict[str, Callable] = {"sorted": moe_dispatch_sorted, "grouped": moe_dispatch_grouped,
                                  "dense": moe_dispatch_dense}


def set_moe_impl(model: nn.Module, name: str) -> None:
    """Use dispatch `name` (a MOE_IMPLS key) in every MoE layer of `model`."""
    if name not in MOE_IMPLS and name != "auto":
        raise ValueError(f"unknown MoE dispatch {name!r}; available: {sorted(MOE_IMPLS) + ['auto']}")
    for m in model.modules():
        if isinstance(m, RopeBertMoE):
            m.impl = name


class RopeBertMoE(nn.Module):
    """Router (bias-free, E x C) + experts. forward(x (..., C), mask) -> (y (..., C), stats (4,)).

    stats: [load-balancing loss (with graph), min and max share of slots per expert, mean router entropy]."""

    def __init__(self, config: RopeBertConfig):
        super().__init__()
        m = config.moe
        self.num_experts, self.top_k = int(m["num_experts"]), int(m["top_k"])
        self.normalize_weights = bool(m["normalize_weights"])
        self.router = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = RopeBertExperts(config)
        self.impl = "auto"

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, C) -> fp32 probabilities (T, E), top-k weights (T, k), expert indices (T, k)."""
        logits = F.linear(x.float(), self.router.weight.float())  # (T, E)
        probs = logits.softmax(dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)  # (T, k)
        if self.normalize_weights:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, index

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        flat = x.reshape(-1, x.shape[-1]) if mask is None else x[mask]  # (T, C) real tokens only
        probs, weights, index = self.route(flat)
        impl = self.impl
        if impl == "auto":
            impl = "grouped" if grouped_mm_available(flat) else "sorted"
            if impl == "grouped" and torch.compiler.is_compiling() and _compute_dtype(flat) != torch.bfloat16:
                impl = "sorted"  # torch.compile's shape function of _grouped_mm takes bf16 only
        y = MOE_IMPLS[impl](self.experts, flat, weights, index)  # (T, C)
        if mask is not None:
            out = x.new_zeros(x.shape)  # (B, L, C); padding positions get no FFN output
            out[mask] = y
            y = out
        else:
            y = y.view(x.shape)
        T, E = probs.shape
        if T:
            share = torch.bincount(index.reshape(-1), minlength=E).to(torch.float32) / (T * self.top_k)  # f_e (E,)
            aux = E * (share * probs.mean(dim=0)).sum()
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1).mean()
            stats = torch.stack((aux, share.min(), share.max(), entropy.detach()))
        else:
            stats = probs.new_zeros(4) + probs.sum()  # no token: zero, still attached to the graph
        return y, stats


class RopeBertMoEOutput(nn.Module):
    """The post-LN block of an MoE layer: LayerNorm(x + dropout(moe(x))) (BERT's output.LayerNorm name kept)."""

    def __init__(self, config: RopeBertConfig):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(residual + self.dropout(h))


class RopeBertMoELayer(nn.Module):
    """Attention as in RopeBertLayer, then the MoE FFN. Weights: attention.*, moe.router.weight (E, C),
    moe.experts.{intermediate,output}_{weight,bias}, output.LayerNorm.*. Returns (x, stats (4,))."""

    def __init__(self, config: RopeBertConfig):
        super().__init__()
        self.attention = RopeBertAttention(config)
        self.moe = RopeBertMoE(config)
        self.output = RopeBertMoEOutput(config)

    def forward(self, x, ctx, backend):
        x = self.attention(x, ctx, backend)
        mask = ctx.attention_mask if (not ctx.packed and ctx.has_padding) else None
        y, stats = self.moe(x, mask)
        return self.output(y, x), stats


class RopeBertEncoder(nn.Module):
    def __init__(self, config: RopeBertConfig):
        super().__init__()
        self.layer = nn.ModuleList([RopeBertMoELayer(config) if config.is_moe_layer(i) else RopeBertLayer(config)
                                    for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, x, ctx, backend, output_hidden_states: bool = False):
        """Returns (x, all_hidden); the MoE layers' stats (4,) each are appended to ctx.moe_stats."""
        all_hidden = [x] if output_hidden_states else None
        for layer in self.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, ctx, backend, use_reentrant=False)
            else:
                x = layer(x, ctx, backend)
            if isinstance(x, tuple):  # an MoE layer
                x, stats = x
                ctx.moe_stats.append(stats)
            if all_hidden is not None:
                all_hidden.append(x)
        return x, all_hidden


# ----------------------------------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------------------------------


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Masked mean over tokens, then L2 normalisation. (B, L, C), (B, L) -> (B, C), in fp32."""
    m = attention_mask.to(torch.float32).unsqueeze(-1)  # (B, L, 1)
    summed = (last_hidden_state.to(torch.float32) * m).sum(dim=1)
    emb = summed / m.sum(dim=1).clamp(min=1e-9)
    return F.normalize(emb, p=2, dim=-1) if normalize else emb


def packed_mean_pool(hidden: torch.Tensor, seqlens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Mean over each sequence of packed tokens. (T, C), (B,) -> (B, C), fp32."""
    B = seqlens.shape[0]
    seq_index = torch.repeat_interleave(torch.arange(B, device=hidden.device), seqlens.long())  # (T,)
    summed = torch.zeros(B, hidden.shape[-1], device=hidden.device, dtype=torch.float32)
    summed.index_add_(0, seq_index, hidden.to(torch.float32))
    emb = summed / seqlens.to(torch.float32).clamp(min=1e-9).unsqueeze(-1)
    return F.normalize(emb, p=2, dim=-1) if normalize else emb


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------

_HF_ATTN_IMPLEMENTATION_TO_BACKEND = {
    "eager": "eager",
    "sdpa": "sdpa",
    "flash_attention_2": "flash_attn",
    "flash_attention_3": "flash_attn",
}

# config attribute (never serialised, see RopeBertConfig.to_dict) recording the attn_implementation transformers
# set on the config when a model was last built from it
_AUTOSET_ATTN_KEY = "_ropebert_autoset_attn"


def _backend_for_attn_implementation(impl: str) -> str:
    if impl not in _HF_ATTN_IMPLEMENTATION_TO_BACKEND:
        raise ValueError(
            f"attn_implementation={impl!r} is not supported by RopeBertModel; use one of "
            f"{sorted(_HF_ATTN_IMPLEMENTATION_TO_BACKEND)} or set config.attn_backend"
        )
    return _HF_ATTN_IMPLEMENTATION_TO_BACKEND[impl]


@dataclass
class RopeBertModelOutput(BaseModelOutput):
    """BaseModelOutput plus, for an MoE model, `aux_loss` (scalar: mean load-balancing loss of the MoE layers times
    aux_loss_coef, with graph) and `moe_stats` ((n_moe_layers, 4): per MoE layer [aux, min share of token slots
    per expert, max share, mean router entropy], detached). Both None for a dense model."""

    aux_loss: Optional[torch.FloatTensor] = None
    moe_stats: Optional[torch.FloatTensor] = None


class RopeBertPreTrainedModel(PreTrainedModel):
    config_class = RopeBertConfig
    base_model_prefix = "e5rope"  # released E5-RoPE checkpoints may store weights under `e5rope.`
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["RopeBertLayer", "RopeBertMoELayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RopeBertExperts):  # stacked expert weights: as nn.Linear layers would be
            std = self.config.initializer_range
            nn.init.normal_(module.intermediate_weight, mean=0.0, std=std)
            nn.init.normal_(module.output_weight, mean=0.0, std=std)
            nn.init.zeros_(module.intermediate_bias)
            nn.init.zeros_(module.output_bias)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        # activation checkpointing per layer (non-reentrant, RNG state preserved so dropout masks replay)
        for module in self.modules():
            if isinstance(module, RopeBertEncoder):
                module.gradient_checkpointing = enable


class RopeBertModel(RopeBertPreTrainedModel):
    """RoPE BERT encoder. forward() returns `last_hidden_state` (B, L, C); embed() / encode() give pooled,
    L2-normalised embeddings."""

    def __init__(self, config: RopeBertConfig):
        # transformers puts a requested `attn_implementation` on the config before __init__ (from_pretrained(...,
        # attn_implementation=...)); an explicit request wins over config.attn_backend. A config that already went
        # through a model's __init__ instead carries transformers' own automatic choice ("sdpa"), recorded below:
        # that is no request, so building a second model from the same config keeps its attn_backend.
        requested = getattr(config, "_attn_implementation_internal", None)
        if requested is not None and requested == config.__dict__.get(_AUTOSET_ATTN_KEY):
            requested = None
        super().__init__(config)
        config.validate_ropebert()
        if requested is not None:
            config.attn_backend = _backend_for_attn_implementation(requested)
        config.__dict__[_AUTOSET_ATTN_KEY] = getattr(config, "_attn_implementation_internal", None)
        if config.attn_backend != "auto":
            get_attention_backend(config.attn_backend)  # clear error on an unknown name
        self.embeddings = RopeBertEmbeddings(config)
        self.encoder = RopeBertEncoder(config)
        self._tokenizer = None
        self.post_init()

    # -- configuration helpers ------------------------------------------------------------------------------

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def set_attn_backend(self, name: str) -> None:
        if name != "auto":
            get_attention_backend(name)
        self.config.attn_backend = name

    def set_attn_implementation(self, attn_implementation, **kwargs) -> None:
        """transformers' runtime switch (model.set_attn_implementation("eager" | "sdpa" | ...)), mapped onto
        attn_backend like from_pretrained(..., attn_implementation=...)."""
        impl = attn_implementation.get("", None) if isinstance(attn_implementation, dict) else attn_implementation
        if impl is None:
            return
        self.set_attn_backend(_backend_for_attn_implementation(impl))
        if impl in ("eager", "sdpa"):
            self.config._attn_implementation_internal = impl
            self.config.__dict__[_AUTOSET_ATTN_KEY] = impl

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    def _rope_fn(self, device: torch.device) -> Callable:
        impl = self.config.rope_impl
        if impl == "auto":
            return ROPE_IMPLS["triton"] if (device.type == "cuda" and "triton" in ROPE_IMPLS) else rope_torch
        if impl not in ROPE_IMPLS:
            raise RuntimeError(
                f"rope_impl={impl!r} is not available here (registered: {sorted(ROPE_IMPLS)}); "
                "import ropebert.kernels with Triton installed, or use rope_impl='torch'/'auto'"
            )
        return ROPE_IMPLS[impl]

    def _compute_dtype(self, device: torch.device) -> torch.dtype:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.embeddings.word_embeddings.weight.dtype

    # -- forward --------------------------------------------------------------------------------------------

    def _run(self, input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states: bool):
        """Shared body of forward() and embed(): returns (hidden, all_hidden, ctx, unpad_index)."""
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, length) tensor, got {None if input_ids is None else tuple(input_ids.shape)}")
        B, L = input_ids.shape
        device = input_ids.device
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            # 0..n-1 over the real tokens of each sequence (also right for left-padded batches)
            position_ids = (mask.long().cumsum(dim=-1) - 1).clamp_(min=0)  # (B, L)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(B, -1)
        seqlens = mask.sum(dim=-1, dtype=torch.int32)  # (B,)
        cfg = self.config
        cfg._validate_long_context()  # config keys may have been edited since construction
        dropout_p = cfg.attention_probs_dropout_prob if self.training else 0.0
        padding_fraction = 0.0
        if device.type == "cpu" and cfg.attn_backend == "auto":
            padding_fraction = 1.0 - float(seqlens.sum()) / max(1, B * L)
        backend = resolve_attention_backend(
            cfg.attn_backend, device, self._compute_dtype(device), dropout_p > 0, padding_fraction
        )
        token_index = position_ids  # (B, L) before any remap: what the leading position table is indexed by
        position_ids = long_context_positions(position_ids, cfg, seqlens)  # (B, L) gp / rp / PI remaps
        inv_freq = long_context_inv_freq(self.head_dim, cfg, seqlens)  # (D/2,) or (B, D/2) dynamic NTK
        q_scale = attn_scale_factors(seqlens, cfg.attn_scale_base)  # None or (B,)
        max_len = int(seqlens.max()) if B else 0
        se = cfg.self_extend
        common = dict(
            seqlens=seqlens,
            scale=1.0 / math.sqrt(self.head_dim),
            dropout_p=dropout_p,
            rope_fn=self._rope_fn(device),
            self_extend=(int(se["group_size"]), int(se["window"])) if se and max_len > cfg.original_length else None,
            original_length=cfg.original_length,
        )
        unpad_index = None
        if backend.packed:
            # unpad once per forward: every layer then works on the (T, C) real tokens only
            unpad_index = mask.flatten().nonzero(as_tuple=False).flatten()  # (T,)
            input_ids = input_ids.flatten()[unpad_index]
            token_type_ids = token_type_ids.flatten()[unpad_index]
            positions = position_ids.flatten()[unpad_index]
            token_index = token_index.flatten()[unpad_index]  # (T,)
            cu_seqlens = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
            if inv_freq.dim() == 2:  # per sequence -> per token (T, D/2)
                inv_freq = inv_freq.repeat_interleave(seqlens.long(), dim=0)
            if q_scale is not None:
                q_scale = q_scale.repeat_interleave(seqlens.long())[:, None, None]  # (T, 1, 1)
            ctx = AttentionContext(
                packed=True, positions=positions, cu_seqlens=cu_seqlens, max_seqlen=max_len,
                inv_freq=inv_freq, q_scale=q_scale, **common,
            )
        else:
            if inv_freq.dim() == 2:  # per sequence -> per token (B, L, D/2), a broadcast view
                inv_freq = inv_freq[:, None, :].expand(B, L, -1)
            if q_scale is not None:
                q_scale = q_scale[:, None, None, None]  # (B, 1, 1, 1)
            ctx = AttentionContext(
                packed=False, positions=position_ids, attention_mask=mask, has_padding=not bool(mask.all()),
                inv_freq=inv_freq, q_scale=q_scale, **common,
            )
        x = self.embeddings(input_ids, token_type_ids, token_index.long())  # (B, L, C) or (T, C)
        x, all_hidden = self.encoder(x, ctx, backend, output_hidden_states)
        return x, all_hidden, ctx, unpad_index, (B, L)

    def _moe_outputs(self, ctx: AttentionContext) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(aux_loss, moe_stats) of one forward: the load-balancing loss averaged over the MoE layers times
        aux_loss_coef (scalar, with graph), and per MoE layer [aux, min share, max share, router entropy]
        (n_moe_layers, 4), detached. (None, None) for a dense model."""
        if not ctx.moe_stats:
            return None, None
        stats = torch.stack(ctx.moe_stats)  # (n_moe_layers, 4)
        aux = stats[:, 0].mean() * float(self.config.moe["aux_loss_coef"])
        return aux, stats.detach()

    @staticmethod
    def _repad(x: torch.Tensor, unpad_index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        B, L = shape
        out = x.new_zeros(B * L, x.shape[-1])
        out[unpad_index] = x
        return out.view(B, L, -1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        if output_attentions:
            raise ValueError("RopeBertModel does not return attention probabilities (fused backends never form them)")
        x, all_hidden, ctx, unpad_index, shape = self._run(
            input_ids, attention_mask, token_type_ids, position_ids, bool(output_hidden_states)
        )
        if unpad_index is not None:
            x = self._repad(x, unpad_index, shape)
            if all_hidden is not None:
                all_hidden = [self._repad(h, unpad_index, shape) for h in all_hidden]
        aux_loss, moe_stats = self._moe_outputs(ctx)
        out = RopeBertModelOutput(last_hidden_state=x, hidden_states=tuple(all_hidden) if all_hidden is not None else None,
                                  aux_loss=aux_loss, moe_stats=moe_stats)
        return out if return_dict is not False else out.to_tuple()

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        normalize: bool = True,
        output_moe: bool = False,
    ):
        """Pooled embeddings (B, E) fp32: masked mean, cut to the first E = config.output_dim channels (the
        Matryoshka embedding_dim; all hidden_size channels when unset), + L2 norm. Pools packed tokens directly,
        no re-pad. output_moe: return (embeddings, aux_loss, moe_stats) instead (see forward's output; None,
        None for a dense model)."""
        x, _, ctx, unpad_index, _ = self._run(input_ids, attention_mask, token_type_ids, position_ids, False)
        if output_moe:
            emb = self._pool(x, ctx, unpad_index, input_ids, attention_mask, normalize)
            return (emb, *self._moe_outputs(ctx))
        return self._pool(x, ctx, unpad_index, input_ids, attention_mask, normalize)

    def _pool(self, x, ctx, unpad_index, input_ids, attention_mask, normalize: bool) -> torch.Tensor:
        if unpad_index is not None:
            emb = packed_mean_pool(x, ctx.seqlens, normalize=False)  # (B, C)
        else:
            mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            emb = mean_pool(x, mask, normalize=False)  # (B, C)
        dim = self.config.output_dim
        if dim != emb.shape[-1]:
            emb = emb[:, :dim]  # (B, E)
        return F.normalize(emb, p=2, dim=-1) if normalize else emb

    # -- text convenience -----------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            src = getattr(self, "name_or_path", None) or getattr(self.config, "_name_or_path", None)
            if not src or not os.path.isdir(str(src)):
                raise ValueError(
                    "RopeBertModel.encode needs a tokenizer: pass tokenizer=..., set model.tokenizer, or load the "
                    "model from a directory that holds tokenizer files"
                )
            from transformers import AutoTokenizer

            # passing our config keeps AutoTokenizer from re-resolving (and asking to trust) the model code
            self._tokenizer = AutoTokenizer.from_pretrained(str(src), config=self.config)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok):
        self._tokenizer = tok

    def tokenize(self, texts: Sequence[str], tokenizer=None, prefix: str = "", max_length: Optional[int] = None):
        """Token id lists (with special tokens), truncated to max_length (default max_position_embeddings).

        Returns (ids_list, n_truncated). Truncation keeps the final special token ([SEP]).
        """
        tok = tokenizer if tokenizer is not None else self.tokenizer
        if max_length is None:
            max_length = int(self.config.max_position_embeddings)
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        enc = tok([prefix + t for t in texts], add_special_tokens=True, truncation=False, verbose=False)
        sep = getattr(tok, "sep_token_id", None)
        ids_list, n_trunc = [], 0
        for ids in enc["input_ids"]:
            if len(ids) > max_length:
                n_trunc += 1
                ids = ids[: max_length - 1] + [ids[-1]] if (sep is not None and ids[-1] == sep) else ids[:max_length]
            ids_list.append(ids)
        return ids_list, n_trunc

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str] | str,
        tokenizer=None,
        *,
        prefix: str = "",
        batch_size: int = 32,
        max_length: Optional[int] = None,
        max_tokens: Optional[int] = None,
        normalize: bool = True,
        device=None,
        show_progress_bar: bool = False,
        pcw: bool = False,
    ) -> torch.Tensor:
        """Embed texts: tokenise (with `prefix`, e.g. "query: " / "passage: "), batch by length, mean-pool,
        L2-normalise. Returns (N, C) fp32 on CPU in input order.

        pcw: parallel context windows (no truncation): each text is tokenised without special tokens and cut
            into chunks that fit the trained length with everything included: original_length - 2 - (prefix
            tokens) body tokens (506 for a 512 model and "passage: "; the last chunk is the final such tokens,
            overlapping the previous one); every chunk is encoded as [CLS] prefix chunk [SEP] (at most
            original_length tokens), the unnormalised chunk embeddings of a text are averaged, then
            L2-normalised.

        max_length: truncation length in tokens (default config.max_position_embeddings); the number of
            truncated texts is logged once per call. Pass a larger value for long-context use.
        max_tokens: optional token budget per batch (batch_size * padded_length <= max_tokens), bounding
            memory for long inputs.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if len(texts) == 0:
            raise ValueError("encode() got an empty list of texts")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode() texts[{i}] is {type(t).__name__}, expected str")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if pcw:
            ids_list, owner = self._pcw_chunks(texts, tokenizer, prefix)
            chunk_emb = self._encode_ids(ids_list, batch_size, max_tokens, False, device, show_progress_bar)
            summed = torch.zeros(len(texts), chunk_emb.shape[-1], dtype=torch.float32)
            summed.index_add_(0, owner, chunk_emb)
            emb = summed / torch.bincount(owner, minlength=len(texts)).to(torch.float32)[:, None]
            return F.normalize(emb, p=2, dim=-1) if normalize else emb
        ml = int(self.config.max_position_embeddings) if max_length is None else int(max_length)
        ids_list, n_trunc = self.tokenize(texts, tokenizer, prefix, ml)
        if n_trunc:
            logger.warning(
                "encode: truncated %d of %d texts to max_length=%d tokens (pass max_length=... to change)",
                n_trunc, len(texts), ml,
            )
        return self._encode_ids(ids_list, batch_size, max_tokens, normalize, device, show_progress_bar)

    def _pcw_chunks(self, texts: Sequence[str], tokenizer, prefix: str):
        """PCW chunk id lists ([CLS] prefix chunk [SEP], each at most original_length tokens) and, per chunk, the
        index of its text (LongTensor)."""
        tok = tokenizer if tokenizer is not None else self.tokenizer
        cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
        if cls_id is None or sep_id is None:
            raise ValueError("pcw needs a tokenizer with [CLS] and [SEP] tokens")
        pre = tok([prefix], add_special_tokens=False, verbose=False)["input_ids"][0] if prefix else []
        chunk = self.config.original_length - 2 - len(pre)  # [CLS] + prefix + chunk + [SEP] <= original length
        if chunk < 1:
            raise ValueError(f"pcw needs original length > 2 + {len(pre)} prefix tokens, got {self.config.original_length}")
        bodies = tok(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        ids_list, owner = [], []
        for i, body in enumerate(bodies):
            n = len(body)
            starts = list(range(0, n - chunk, chunk)) + [max(0, n - chunk)]  # last chunk: the final `chunk` tokens
            for s0 in starts:
                ids_list.append([cls_id] + pre + body[s0 : s0 + chunk] + [sep_id])
                owner.append(i)
        return ids_list, torch.tensor(owner, dtype=torch.long)

    def _encode_ids(self, ids_list, batch_size, max_tokens, normalize, device, show_progress_bar) -> torch.Tensor:
        """Embed token id lists batched by length: (N, C) fp32 on CPU in input order."""
        device = torch.device(device) if device is not None else next(self.parameters()).device
        was_training = self.training
        self.eval()
        order = sorted(range(len(ids_list)), key=lambda i: -len(ids_list[i]))
        batches, cur = [], []
        for i in order:
            longest = len(ids_list[cur[0]]) if cur else len(ids_list[i])
            if cur and (len(cur) >= batch_size or (max_tokens and (len(cur) + 1) * longest > max_tokens)):
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        pad_id = self.config.pad_token_id or 0
        out = torch.empty(len(ids_list), self.config.output_dim, dtype=torch.float32)
        it = batches
        if show_progress_bar:
            from tqdm.auto import tqdm

            it = tqdm(batches, desc="encode", unit="batch")
        try:
            for idx in it:
                n = max(len(ids_list[i]) for i in idx)
                input_ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), n), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids = ids_list[i]
                    input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    mask[r, : len(ids)] = 1
                emb = self.embed(input_ids.to(device), mask.to(device), normalize=normalize)
                out[torch.tensor(idx)] = emb.float().cpu()
        finally:
            self.train(was_training)
        return out
