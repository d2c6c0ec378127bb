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
from pathlib import Path

import pytest
import torch

from ropebert.kernels import rotary_reference, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

INTERPRETED = Path(__file__).with_name("interpreted_rotary.py")


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    d = tmp_path_factory.mktemp("triton_interp")
    script, out = INTERPRETED, d / "out.json"
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())


def test_triton_registered_as_rope_impl(interpreted):
    assert interpreted["ROPE_IMPLS"] == ["torch", "triton"]


@pytest.mark.parametrize(
    "case",
    [
        "packed_int", "packed_pose_skips", "packed_gp", "packed_rp", "packed_pi", "padded_int",
        "padded_per_seq_inv_freq", "packed_head_dim_24",
    ],
)
def test_fp32_forward_backward_parity(interpreted, case):
    r = interpreted[case]
    assert r["shape_ok"]
    assert r["fwd"] <= 1e-5 and r["bwd"] <= 1e-5, r
    assert r["fwd_kernel_vs_fp64"] <= 1e-5 and r["bwd_kernel_vs_fp64"] <= 1e-5, r


def test_kernel_angles_within_1e5_of_fp64_to_32k_positions(interpreted):
    """cos/sin the kernel rotates by (q = (1, 0) pairs) against fp64 cos/sin of the exact angles, positions up to
    32,767 (integer, and PI fractions p / 3), theta 1e4 / 1e5 / 1e6, head_dim 64; the torch reference too."""
    for kind, r in interpreted["angles_32k"].items():
        assert r["kernel"] <= 1e-5 and r["reference"] <= 1e-5, (kind, r)
    assert interpreted["angles_32k"]["integer"]["max_position"] == 32767


def test_fp16_error_within_2x_reference(interpreted):
    """fp16 (the interpreter rounds to nearest like the GPU): kernel error vs fp64 <= 2x the torch reference's."""
    r = interpreted["packed_fp16"]
    assert r["shape_ok"], r
    assert r["fwd_kernel_vs_fp64"] <= 2 * r["fwd_ref_vs_fp64"] + 1e-6, r
    assert r["bwd_kernel_vs_fp64"] <= 2 * r["bwd_ref_vs_fp64"] + 1e-6, r
    assert r["fwd_ulp_excess"] <= 1e-6 and r["bwd_ulp_excess"] <= 1e-6, r


@pytest.mark.parametrize("case", ["packed_bf16", "padded_pi_bf16"])
def test_bf16_within_one_ulp(interpreted, case):
    """bf16 forward and backward within one bf16 ulp of the fp64 rotation of the same inputs. (The interpreter
    truncates fp32 -> bf16 where the GPU rounds to nearest, so the 2x-reference criterion is the CUDA test's.)"""
    r = interpreted[case]
    assert r["shape_ok"], r
    assert r["fwd_ulp_excess"] <= 1e-6 and r["bwd_ulp_excess"] <= 1e-6, r


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_packed", "self_extend"])
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


def test_rope_impl_resolution_on_cpu():
    """rope_impl: 'auto' is the torch rotary on CPU; 'triton' on CPU without the interpreter is a clear error;
    an unknown name is a config error."""
    from ropebert.model import RopeBertConfig, RopeBertModel
    from ropebert.model.modeling_ropebert import ROPE_IMPLS, rope_torch
    from tests.conftest import tiny_config

    assert "triton" in ROPE_IMPLS  # registered when triton is importable
    assert RopeBertModel(tiny_config(rope_impl="auto"))._rope_fn(torch.device("cpu")) is rope_torch
    assert RopeBertModel(tiny_config(rope_impl="torch"))._rope_fn(torch.device("cpu")) is rope_torch
    m = RopeBertModel(tiny_config(rope_impl="triton"))
    assert m._rope_fn(torch.device("cpu")) is ROPE_IMPLS["triton"]
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            m(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="rope_impl"):
        RopeBertConfig(rope_impl="fused")


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
