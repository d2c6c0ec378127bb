"""bench/train_step.py's dense comparison model for the MoE: the FFN widened to the MoE's active parameters
computes what its source computes at step 0, and has exactly the active encoder-layer parameters up to the router."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", REPO / "bench" / "train_step.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "bench"))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return mod


def test_widened_dense_model_matches_its_source_and_the_moe_active_parameters(tmp_path, minilm_dir):
    from transformers import AutoTokenizer, BertConfig, BertModel

    bench = _bench()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64)
    src_dir = tmp_path / "src"
    BertModel(cfg, add_pooling_layer=False).save_pretrained(src_dir)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(src_dir)
    moe_layers = tiny_config(num_hidden_layers=6, moe={"num_experts": 8}).moe_layers  # Nomic's layout: 1, 3, 5
    wide_dir, inner = bench.widen_ffn_dir(str(src_dir), str(tmp_path), seed=1, moe_layers=len(moe_layers), top_k=2)
    assert inner == 48 * (6 + 3 * 1) // 6 == 72  # layers 1, 3, 5 run top-2: 1.5x the FFN per token
    src = BertModel.from_pretrained(src_dir, add_pooling_layer=False).eval()
    wide = BertModel.from_pretrained(wide_dir, add_pooling_layer=False).eval()
    ids = torch.randint(1000, 2000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(wide(ids).last_hidden_state, src(ids).last_hidden_state, atol=1e-5, rtol=0)
    w = wide.encoder.layer[0].intermediate.dense.weight
    assert w.shape == (72, 32) and w[48:].abs().sum() > 0  # the new units are live (they learn), output weight 0
    assert wide.encoder.layer[0].output.dense.weight[:, 48:].abs().sum() == 0
    # encoder-layer parameters: the MoE's active ones (a second expert in layers 1, 3, 5: 48 units of 32 + 1 in
    # and 32 out, plus its 32 output biases), up to those biases and the routers
    dense_layer = sum(p.numel() for n, p in src.named_parameters() if n.startswith("encoder.layer."))
    wide_layer = sum(p.numel() for n, p in wide.named_parameters() if n.startswith("encoder.layer."))
    assert wide_layer - dense_layer == 6 * 24 * (32 + 1 + 32) == 3 * (48 * (32 + 1 + 32) + 32) - 3 * 32
