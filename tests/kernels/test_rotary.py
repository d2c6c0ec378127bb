"""Fused Triton rotary vs the pure-torch reference.

On CPU the kernel runs under the Triton interpreter, which reads TRITON_INTERPRET when triton is first imported,
so the parity checks run in a subprocess started with TRITON_INTERPRET=1 (sizes kept small: the interpreter is
slow). The CUDA checks skip cleanly without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ropebert.kernels import rotary_reference, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

INTERPRETED = textwrap.dedent(
    """
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    from ropebert.kernels import rotary_reference, rotary_triton
    from ropebert.model import ROPE_IMPLS, RopeBertConfig, RopeBertModel

    torch.manual_seed(0)
    res = {"ROPE_IMPLS": sorted(ROPE_IMPLS)}
    H, D = 3, 16
    inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    inv = inv.float()

    def case(name, lead, positions, inv_freq, dtype=torch.float32):
        # q and k as strided views of one qkv projection, like the model produces them
        qkv = torch.randn(*lead, 3, H, D).to(dtype).requires_grad_(True)
        q, k, _ = qkv.unbind(-3)
        a = rotary_triton(q, k, positions, inv_freq)
        ref = rotary_reference(q, k, positions, inv_freq)
        gq, gk = torch.randn_like(a[0]), torch.randn_like(a[1])
        ga = torch.autograd.grad((a[0].float() * gq).sum() + (a[1].float() * gk).sum(), qkv)[0]
        gr = torch.autograd.grad((ref[0].float() * gq).sum() + (ref[1].float() * gk).sum(), qkv)[0]
        res[name] = {
            "fwd": max((x.float() - y.float()).abs().max().item() for x, y in zip(a, ref)),
            "bwd": (ga.float() - gr.float()).abs().max().item(),
            "shape_ok": a[0].shape == q.shape and a[0].dtype == dtype,
        }

    # packed (T, H, D): positions restart per sequence, with PoSE-style offsets
    seqlens = [5, 9, 3]
    pos = torch.cat([torch.arange(n) + off for n, off in zip(seqlens, [0, 700, 31000])])
    case("packed_int", (sum(seqlens),), pos, inv)
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

    # inside the model: rope_impl triton vs torch, forward and backward, padded and packed backends
    cfg = dict(vocab_size=50, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               rope_scaling={"type": "dynamic_ntk", "factor": 2.0})
    ids = torch.randint(1, 50, (2, 20)); mask = torch.ones_like(ids); mask[1, 13:] = 0
    for backend in ("sdpa", "sdpa_packed"):
        outs, grads = {}, {}
        for impl in ("torch", "triton"):
            torch.manual_seed(1)
            m = RopeBertModel(RopeBertConfig(rope_impl=impl, attn_backend=backend, **cfg))
            e = m.embed(ids, mask)
            (e * torch.arange(e.numel()).view_as(e)).sum().backward()  # a non-symmetric loss
            outs[impl] = e.detach()
            grads[impl] = m.encoder.layer[0].attention.self.query.weight.grad.clone()
        res["model_" + backend] = {
            "fwd": (outs["torch"] - outs["triton"]).abs().max().item(),
            "bwd": (grads["torch"] - grads["triton"]).abs().max().item(),
        }
    json.dump(res, open(sys.argv[1], "w"))
    """
)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    d = tmp_path_factory.mktemp("triton_interp")
    script, out = d / "run.py", d / "out.json"
    script.write_text(INTERPRETED)
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


def test_triton_registered_as_rope_impl(interpreted):
    assert interpreted["ROPE_IMPLS"] == ["torch", "triton"]


@pytest.mark.parametrize(
    "case", ["packed_int", "packed_gp", "packed_rp", "packed_pi", "padded_int", "padded_per_seq_inv_freq"]
)
def test_fp32_forward_backward_parity(interpreted, case):
    r = interpreted[case]
    assert r["shape_ok"]
    assert r["fwd"] <= 1e-5 and r["bwd"] <= 1e-5, r


def test_fp16_parity(interpreted):
    r = interpreted["packed_fp16"]
    assert r["shape_ok"] and r["fwd"] <= 2e-3 and r["bwd"] <= 2e-3, r


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_packed"])
def test_model_triton_matches_torch(interpreted, backend):
    r = interpreted["model_" + backend]
    assert r["fwd"] <= 1e-5 and r["bwd"] <= 1e-4, r


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs under the interpreter")
    from ropebert.kernels import rotary_triton

    q = torch.randn(4, 2, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rotary_triton(q, q, torch.arange(4), torch.ones(4))


def test_shape_errors():
    from ropebert.kernels import rotary_triton

    q = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="positions"):
        rotary_triton(q, q, torch.arange(5), torch.ones(4))
    with pytest.raises(ValueError, match="inv_freq"):
        rotary_triton(q, q, torch.arange(4), torch.ones(3))


# ---- CUDA ------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_cuda_low_precision_error_within_2x_reference(dtype, layout):
    """The kernel's error vs an fp64 rotation is at most 2x the torch reference's own error in that dtype."""
    from ropebert.kernels import rotary_triton

    torch.manual_seed(0)
    H, D = 12, 64
    lead = (4096,) if layout == "packed" else (4, 1024)
    q64, k64 = torch.randn(*lead, H, D, dtype=torch.float64, device="cuda"), torch.randn(*lead, H, D, dtype=torch.float64, device="cuda")
    pos = torch.randint(0, 32768, lead, device="cuda").to(torch.float32) / 1.5
    inv = (1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64, device="cuda") / D)).float()
    exact = rotary_reference(q64, k64, pos.double(), inv.double())
    q, k = q64.to(dtype).requires_grad_(True), k64.to(dtype).requires_grad_(True)
    got = rotary_triton(q, k, pos, inv)
    ref = rotary_reference(q, k, pos, inv)
    for g, r, e in zip(got, ref, exact):
        err_kernel = (g.double() - e).abs().max().item()
        err_ref = (r.double() - e).abs().max().item()
        assert err_kernel <= 2 * err_ref + 1e-6, (err_kernel, err_ref)
    gq, gk = torch.randn_like(got[0]), torch.randn_like(got[1])
    dk = torch.autograd.grad((got[0] * gq).sum() + (got[1] * gk).sum(), (q, k))
    dr = torch.autograd.grad((ref[0] * gq).sum() + (ref[1] * gk).sum(), (q, k))
    de = torch.autograd.grad(
        (rotary_reference(q.double(), k.double(), pos.double(), inv.double())[0] * gq.double()).sum()
        + (rotary_reference(q.double(), k.double(), pos.double(), inv.double())[1] * gk.double()).sum(),
        (q, k),
    )
    for a, b, e in zip(dk, dr, de):
        assert (a.double() - e.double()).abs().max() <= 2 * (b.double() - e.double()).abs().max() + 1e-6
