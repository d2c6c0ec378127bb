"""Run by test_rotary.py under TRITON_INTERPRET=1 (set before triton is imported): the Triton rotary kernel
against the torch reference and fp64, forward and backward; writes the errors as JSON to argv[1]."""

import json
import os
import sys

assert os.environ["TRITON_INTERPRET"] == "1"
import torch

from ropebert.kernels import rotary_reference, rotary_triton
from ropebert.model import ROPE_IMPLS, RopeBertConfig, RopeBertModel

torch.manual_seed(0)
res = {"ROPE_IMPLS": sorted(ROPE_IMPLS)}
H, D = 3, 16
inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
inv = inv.float()


def case(name, lead, positions, inv_freq, dtype=torch.float32, d=D):
    # q and k as strided views of one qkv projection, like the model produces them
    inv_freq = inv_freq if d == D else (1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)).float()
    qkv = torch.randn(*lead, 3, H, d).to(dtype).requires_grad_(True)
    q, k, _ = qkv.unbind(-3)
    a = rotary_triton(q, k, positions, inv_freq)
    ref = rotary_reference(q, k, positions, inv_freq)
    gq, gk = torch.randn_like(a[0]), torch.randn_like(a[1])  # incoming gradients, in the input dtype
    ga = torch.autograd.grad((a[0], a[1]), qkv, (gq, gk))[0]
    gr = torch.autograd.grad((ref[0], ref[1]), qkv, (gq, gk))[0]
    # fp64 rotation of the same (rounded) inputs and incoming gradients: the exact answer
    qkv64 = qkv.detach().double().requires_grad_(True)
    ex = rotary_reference(qkv64[..., 0, :, :], qkv64[..., 1, :, :], positions.double(), inv_freq.double())
    ge = torch.autograd.grad(ex, qkv64, (gq.double(), gk.double()))[0]

    def err(x, y):
        return (x.double() - y.double()).abs().max().item()

    def ulp_excess(x, e):  # how far |x - e| exceeds one ulp of the dtype (relative 2^-mantissa_bits) at e,
        # with 2^-20 relative slack for the fp32 arithmetic before the final rounding
        eps = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
        return ((x.double() - e).abs() - (eps + 2.0**-20) * e.abs()).max().item()

    res[name] = {
        "fwd": max(err(x, y) for x, y in zip(a, ref)),
        "bwd": err(ga, gr),
        "fwd_kernel_vs_fp64": max(err(x, e) for x, e in zip(a, ex)),
        "fwd_ref_vs_fp64": max(err(x, e) for x, e in zip(ref, ex)),
        "bwd_kernel_vs_fp64": err(ga, ge),
        "bwd_ref_vs_fp64": err(gr, ge),
        "fwd_ulp_excess": max(ulp_excess(x, e) for x, e in zip(a, ex)),
        "bwd_ulp_excess": ulp_excess(ga, ge),
        "shape_ok": a[0].shape == q.shape and a[0].dtype == dtype and ga.dtype == dtype,
    }


# packed (T, H, D): positions restart per sequence, with PoSE-style offsets
seqlens = [5, 9, 3]
pos = torch.cat([torch.arange(n) + off for n, off in zip(seqlens, [0, 700, 31000])])
case("packed_int", (sum(seqlens),), pos, inv)
# PoSE-style skips inside sequences: each sequence's positions jump forward part-way
skips = [50, 3000, 7]
pose = torch.cat([torch.cat([torch.arange(2), torch.arange(2, n) + s]) for n, s in zip(seqlens, skips)])
case("packed_pose_skips", (sum(seqlens),), pose, inv)
case("packed_gp", (sum(seqlens),), pos // 4, inv)
case("packed_rp", (sum(seqlens),), pos % 512, inv)
case("packed_pi", (sum(seqlens),), pos.float() / 3.0, inv)
# padded (B, L, H, D) with per-sequence inv_freq (dynamic NTK) as a broadcast view
B, L = 2, 7
ppos = torch.arange(L)[None].expand(B, L) * 5
per_seq = torch.stack([inv, inv * 0.5])  # (B, D/2)
case("padded_int", (B, L), ppos, inv)
case("padded_per_seq_inv_freq", (B, L), ppos.float() + 0.25, per_seq[:, None, :].expand(B, L, -1))
case("packed_fp16", (sum(seqlens),), pos, inv, torch.float16)
case("packed_bf16", (sum(seqlens),), pos, inv, torch.bfloat16)
case("padded_pi_bf16", (B, L), ppos.float() / 2.5, inv, torch.bfloat16)
case("packed_head_dim_24", (sum(seqlens),), pos, None, d=24)  # D/2 = 12: masked lanes in the kernel

# angle precision at long range: q = (1, 0) pairs, so the rotated q is (cos, sin) of each angle; three thetas in one
# launch through a per-token inv_freq; positions up to 32,767, integer and PI-fractional (p / 3, fp64)
Dl = 64
pos_long = torch.cat([torch.arange(0, 32768, 41), torch.arange(32768 - 24, 32768)])
angles = {}
for frac in (False, True):
    pp, ii, exact_c, exact_s = [], [], [], []
    for theta in (1e4, 1e5, 1e6):
        inv64 = 1.0 / theta ** (torch.arange(0, Dl, 2, dtype=torch.float64) / Dl)
        p64 = pos_long.double() / 3.0 if frac else pos_long
        a = p64.double()[:, None] * inv64
        pp.append(p64), ii.append(inv64.expand(len(pos_long), -1)), exact_c.append(a.cos()), exact_s.append(a.sin())
    pp, ii = torch.cat(pp), torch.cat(ii)
    qk = torch.cat([torch.ones(len(pp), 1, Dl // 2), torch.zeros(len(pp), 1, Dl // 2)], -1)
    out = rotary_triton(qk, qk.clone(), pp, ii)[0][:, 0]  # (N, D): cos | sin
    ref = rotary_reference(qk, qk.clone(), pp, ii)[0][:, 0]
    want = torch.cat([torch.cat(exact_c), torch.cat(exact_s)], -1)
    angles["pi_fraction" if frac else "integer"] = {
        "kernel": (out.double() - want).abs().max().item(),
        "reference": (ref.double() - want).abs().max().item(),
        "max_position": float(pp.max()),
    }
res["angles_32k"] = angles

# inside the model: rope_impl triton vs torch, forward and backward, padded and packed backends
cfg = dict(
    vocab_size=50,
    hidden_size=24,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    rope_scaling={"type": "dynamic_ntk", "factor": 2.0},
)
ids = torch.randint(1, 50, (2, 20))
mask = torch.ones_like(ids)
mask[1, 13:] = 0
# the model's rotary calls, also under SelfExtend (three rotations per layer: p, p // g, p // g + w - w // g)
variants = {"sdpa": {}, "sdpa_packed": {}, "self_extend": {"self_extend": {"group_size": 3, "window": 4}}}
for backend, extra in variants.items():
    outs, grads = {}, {}
    for impl in ("torch", "triton"):
        torch.manual_seed(1)
        be = "sdpa" if backend == "self_extend" else backend
        m = RopeBertModel(RopeBertConfig(rope_impl=impl, attn_backend=be, **cfg, **extra))
        e = m.embed(ids, mask)
        (e * torch.arange(e.numel()).view_as(e)).sum().backward()  # a non-symmetric loss
        outs[impl] = e.detach()
        grads[impl] = m.encoder.layer[0].attention.self.query.weight.grad.clone()
    res["model_" + backend] = {
        "fwd": (outs["torch"] - outs["triton"]).abs().max().item(),
        "bwd": (grads["torch"] - grads["triton"]).abs().max().item(),
    }
json.dump(res, open(sys.argv[1], "w"))
