"""Sparse mixture-of-experts layers: config validation, Nomic's layout, sorted dispatch == dense reference
(forward and backward), the Switch load-balancing loss and routing stats, and clear load errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ropebert.errors import InputError
from ropebert.model import RopeBertModel
from ropebert.model.load import load_source
from ropebert.model.modeling_ropebert import (
    RopeBertExperts,
    RopeBertMoELayer,
    grouped_mm_available,
    moe_dispatch_dense,
    moe_dispatch_grouped,
    moe_dispatch_sorted,
    set_moe_impl,
)
from tests.conftest import padded_batch, tiny_config

MOE = {"num_experts": 4, "top_k": 2}


def moe_model(seed=0, layers=4, **moe):
    torch.manual_seed(seed)
    return RopeBertModel(tiny_config(num_hidden_layers=layers, moe={**MOE, **moe})).eval()


@pytest.mark.parametrize("moe, msg", [
    ({"num_experts": 2, "top_k": 3}, "top_k=3 exceeds num_experts=2"),
    ({"num_experts": 0, "top_k": 1}, "num_experts must be an int >= 1"),
    ({"every_n_layers": 0}, "every_n_layers must be an int >= 1"),
    ({"experts": 4}, "keys"),
    ({"aux_loss_coef": -1.0}, "aux_loss_coef"),
])
def test_config_refuses_bad_moe(moe, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_config(num_hidden_layers=4, moe=moe)


def test_layout_defaults_and_weight_names():
    cfg = tiny_config(num_hidden_layers=6, moe={"num_experts": 8})
    assert cfg.moe == {"num_experts": 8, "top_k": 2, "every_n_layers": 2, "normalize_weights": False,
                       "aux_loss_coef": 1.0}
    assert cfg.moe_layers == [1, 3, 5]
    assert tiny_config(num_hidden_layers=6, moe={"every_n_layers": 3}).moe_layers == [1, 4]
    assert tiny_config(num_hidden_layers=3, moe={"every_n_layers": 1}).moe_layers == [0, 1, 2]
    assert tiny_config(num_hidden_layers=6).moe is None and tiny_config().moe_layers == []
    model = RopeBertModel(cfg)
    kinds = [type(layer).__name__ for layer in model.encoder.layer]
    assert kinds == ["RopeBertLayer", "RopeBertMoELayer"] * 3
    names = dict(model.named_parameters())
    assert names["encoder.layer.1.moe.experts.intermediate_weight"].shape == (8, 64, 32)
    assert names["encoder.layer.1.moe.experts.output_weight"].shape == (8, 32, 64)
    assert names["encoder.layer.1.moe.router.weight"].shape == (8, 32)
    assert "encoder.layer.1.moe.router.bias" not in names
    assert "encoder.layer.0.intermediate.dense.weight" in names and "encoder.layer.1.intermediate.dense.weight" not in names
    assert "encoder.layer.1.output.LayerNorm.weight" in names
    # stacked expert weights are initialised like Linear weights (std initializer_range, zero biases)
    w = names["encoder.layer.1.moe.experts.intermediate_weight"]
    assert 0.015 < w.std().item() < 0.025 and names["encoder.layer.1.moe.experts.output_bias"].abs().max() == 0
    # config.json round trip keeps the block
    assert type(cfg).from_dict(cfg.to_dict()).moe == cfg.moe


@pytest.mark.parametrize("impl", ["sorted", "grouped"])
@pytest.mark.parametrize("normalize", [False, True])
def test_sparse_dispatch_equals_dense_reference_forward_and_backward(normalize, impl):
    model = moe_model(normalize_weights=normalize).train()
    ids, mask = padded_batch([7, 12, 3, 9])

    def run(impl):
        set_moe_impl(model, impl)
        model.zero_grad()
        emb, aux, stats = model.embed(ids, mask, output_moe=True)
        (emb.square().sum() + aux).backward()
        return emb.detach(), aux.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters()}

    e1, a1, s1, g1 = run(impl)
    e2, a2, s2, g2 = run("dense")
    torch.testing.assert_close(e1, e2, atol=1e-6, rtol=0)
    torch.testing.assert_close(a1, a2, atol=1e-6, rtol=0)
    torch.testing.assert_close(s1, s2, atol=1e-6, rtol=0)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-6, rtol=1e-5, msg=n)
    assert g1["encoder.layer.1.moe.router.weight"].abs().sum() > 0  # the router learns (aux + weights)
    with pytest.raises(ValueError, match="unknown MoE dispatch"):
        set_moe_impl(model, "megablocks")


def test_grouped_gemm_dispatch_with_empty_experts_equals_the_loop_and_the_reference():
    """One grouped GEMM per projection (torch._grouped_mm) with experts that receive no slot (empty groups, first,
    middle and last), forward and backward, against the per-expert loop and the dense reference."""
    torch.manual_seed(0)
    experts = RopeBertExperts(tiny_config(moe={"num_experts": 5, "top_k": 2}))
    for prm in experts.parameters():
        torch.nn.init.normal_(prm, std=0.5)
    x0 = torch.randn(9, experts.intermediate_weight.shape[-1])
    index = torch.tensor([[1, 3]] * 4 + [[3, 1]] * 3 + [[1, 2], [2, 3]])  # experts 0 and 4 empty
    w0 = torch.rand(9, 2)
    assert grouped_mm_available(x0)  # CPU: every float dtype

    def run(fn):
        experts.zero_grad()
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fn(experts, x, w, index)
        y.sum().backward()  # a sum's gradient is expanded (stride 0): the grouped backward must take it
        return [y.detach(), x.grad, w.grad] + [p.grad.clone() for p in experts.parameters()]

    ref = run(moe_dispatch_dense)
    for fn in (moe_dispatch_sorted, moe_dispatch_grouped):
        for a, b in zip(run(fn), ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ref[3][0].abs().sum() == 0 and ref[3][4].abs().sum() == 0  # empty experts get no gradient
    # no token at all: zeros, still attached to the routing weights' graph
    w_empty = torch.zeros(0, 2, requires_grad=True)
    for fn in (moe_dispatch_sorted, moe_dispatch_grouped):
        y = fn(experts, torch.zeros(0, x0.shape[1]), w_empty, torch.zeros(0, 2, dtype=torch.long))
        assert y.shape == (0, x0.shape[1]) and y.requires_grad
    # bf16 on CPU runs too (the CUDA kernel's dtype)
    y16 = moe_dispatch_grouped(experts, x0.bfloat16(), w0, index)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), ref[0], atol=0.1, rtol=0.05)


def test_padded_and_packed_layouts_route_the_same_real_tokens():
    model = moe_model()
    ids, mask = padded_batch([4, 11, 6])
    out = {}
    for backend in ("sdpa", "sdpa_packed", "eager"):
        model.config.attn_backend = backend
        out[backend] = model.embed(ids, mask, output_moe=True)
    for b in ("sdpa_packed", "eager"):
        torch.testing.assert_close(out[b][0], out["sdpa"][0], atol=2e-6, rtol=0)
        torch.testing.assert_close(out[b][1], out["sdpa"][1], atol=1e-6, rtol=0)
    # padding is never routed: a batch's rows embed as they do alone
    alone = model.embed(ids[1:2, :11], mask[1:2, :11])
    torch.testing.assert_close(out["sdpa"][0][1:2], alone, atol=2e-6, rtol=0)


def test_aux_loss_and_stats_are_the_switch_formula():
    model = moe_model(layers=2, aux_loss_coef=0.5)
    ids, mask = padded_batch([5, 8])
    captured = {}
    layer = model.encoder.layer[1]
    assert isinstance(layer, RopeBertMoELayer)
    layer.moe.register_forward_pre_hook(lambda m, args: captured.update(x=args[0], mask=args[1]))
    model.config.attn_backend = "sdpa"
    out = model(ids, mask)
    x = captured["x"][captured["mask"]]  # (13, C) real tokens
    assert x.shape[0] == 13
    probs = F.softmax(x @ layer.moe.router.weight.T, dim=-1)  # (T, E)
    top = probs.topk(2, dim=-1).indices
    f = torch.bincount(top.flatten(), minlength=4).float() / (13 * 2)
    aux = 4 * (f * probs.mean(0)).sum()
    entropy = -(probs * probs.log()).sum(-1).mean()
    assert out.moe_stats.shape == (1, 4)
    torch.testing.assert_close(out.moe_stats[0], torch.stack([aux, f.min(), f.max(), entropy]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.aux_loss, 0.5 * aux, atol=1e-6, rtol=0)
    assert abs(f.sum().item() - 1.0) < 1e-6
    # the tuple output of a dense model is unchanged: (last_hidden_state,)
    dense = RopeBertModel(tiny_config()).eval()
    assert len(dense(ids, mask, return_dict=False)) == 1 and dense(ids, mask).aux_loss is None


def test_layer_output_is_the_weighted_sum_of_its_top_k_ffns():
    """One token through the MoE block by hand: LayerNorm(x + sum_j w_j FFN_{e_j}(x)), weights renormalised."""
    model = moe_model(layers=2, normalize_weights=True)
    moe = model.encoder.layer[1].moe
    x = torch.randn(3, 32)
    y, _ = moe(x)
    p = F.softmax(x @ moe.router.weight.T, dim=-1)
    w, e = p.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    ex = moe.experts
    for t in range(3):
        ref = sum(w[t, j] * (F.gelu(x[t] @ ex.intermediate_weight[e[t, j]].T + ex.intermediate_bias[e[t, j]])
                             @ ex.output_weight[e[t, j]].T + ex.output_bias[e[t, j]]) for j in range(2))
        torch.testing.assert_close(y[t], ref, atol=1e-6, rtol=0)


def test_gradient_checkpointing_keeps_aux_and_gradients():
    ids, mask = padded_batch([6, 9])
    grads = []
    for ckpt in (False, True):
        model = moe_model().train()
        if ckpt:
            model.gradient_checkpointing_enable()
        emb, aux, _ = model.embed(ids, mask, output_moe=True)
        (emb.sum() + aux).backward()
        grads.append((aux.detach(), model.encoder.layer[3].moe.router.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=0, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-7, rtol=1e-5)


def test_moe_config_over_dense_or_other_expert_count_is_a_clear_load_error(tmp_path):
    torch.manual_seed(0)
    dense_dir, moe_dir = tmp_path / "dense", tmp_path / "moe"
    RopeBertModel(tiny_config(num_hidden_layers=2)).save_pretrained(dense_dir)
    moe_model(layers=2).save_pretrained(moe_dir)
    assert load_source(str(moe_dir)).config.moe["num_experts"] == 4

    def edit(d, fn):
        cfg = json.loads((d / "config.json").read_text())
        fn(cfg)
        (d / "config.json").write_text(json.dumps(cfg))

    edit(dense_dir, lambda c: c.update(moe=MOE))
    with pytest.raises(InputError, match=r"declares moe \(4 experts in layers \[1\]\) but the checkpoint has no expert "
                                         r"weights at all .*ropebert upcycle"):
        load_source(str(dense_dir))
    edit(moe_dir, lambda c: c["moe"].update(num_experts=3))
    with pytest.raises(InputError, match=r"moe.num_experts=3 but the checkpoint's routers have 4 experts"):
        load_source(str(moe_dir))
    edit(moe_dir, lambda c: c.update(moe=None))
    with pytest.raises(InputError, match=r"hold experts .* no `moe` block"):
        load_source(str(moe_dir))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_grouped_gemm_dispatch_agrees_with_the_loop_in_bf16():
    """On CUDA in bf16 the grouped GEMM (where this device runs it) against the per-expert loop, forward and
    backward, under autocast as training runs it; "auto" picks it exactly where grouped_mm_available says so."""
    torch.manual_seed(0)
    model = moe_model(layers=4, num_experts=8).cuda().train()
    ids, mask = padded_batch([40, 7, 64, 33], seed=3)
    ids, mask = ids.cuda(), mask.cuda()
    probe = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
    if not grouped_mm_available(probe):
        pytest.skip(f"torch._grouped_mm does not run bf16 on this device ({torch.cuda.get_device_name()})")

    def run(impl):
        set_moe_impl(model, impl)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            emb, aux, _ = model.embed(ids, mask, output_moe=True)
        (emb.float().square().sum() + aux).backward()
        return emb.float().detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                      if p.grad is not None}

    e1, g1 = run("grouped")
    e2, g2 = run("sorted")
    torch.testing.assert_close(e1, e2, atol=2e-2, rtol=0)
    for n in g2:
        scale = g2[n].abs().max().item() + 1e-6
        assert (g1[n] - g2[n]).abs().max().item() <= 5e-2 * scale, n


def test_auto_dispatch_under_torch_compile_in_fp32():
    """torch.compile's shape function of _grouped_mm takes bf16 only: compiled fp32 code routes through "sorted"
    and equals the eager layer."""
    model = moe_model(layers=2)
    moe = model.encoder.layer[1].moe
    x = torch.randn(2, 5, model.config.hidden_size)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    want, _ = moe(x, mask)
    got, _ = torch.compile(moe, backend="aot_eager")(x, mask)  # traced with fake tensors, as inductor would
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
