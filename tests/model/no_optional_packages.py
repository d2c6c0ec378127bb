"""Run by test_modeling.py in a fresh process: with triton, flash-attn and xformers made unimportable, ropebert.model
and ropebert.kernels import, the model runs, and asking for the missing pieces is a clear error. Prints "ok"."""

import sys

for name in ("triton", "flash_attn", "xformers"):
    sys.modules[name] = None  # import raises ImportError; importlib.util.find_spec returns None
import torch

import ropebert.kernels  # noqa: F401  (must import without the optional packages)
from ropebert.model import ATTENTION_BACKENDS, ROPE_IMPLS, RopeBertConfig, RopeBertModel

assert sorted(ROPE_IMPLS) == ["torch"], ROPE_IMPLS
assert not {"flash_attn", "xformers"} & set(ATTENTION_BACKENDS), sorted(ATTENTION_BACKENDS)
cfg = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
ids = torch.randint(1, 50, (2, 7))
for impl in ("auto", "torch"):
    out = RopeBertModel(RopeBertConfig(rope_impl=impl, **cfg)).eval()(ids).last_hidden_state
    assert torch.isfinite(out).all()
try:
    RopeBertModel(RopeBertConfig(rope_impl="triton", **cfg))(ids)
except RuntimeError as e:
    assert "rope_impl='triton' is not available here" in str(e), e
else:
    raise AssertionError("rope_impl=triton without triton ran")
try:
    RopeBertModel(RopeBertConfig(attn_backend="flash_attn", **cfg))
except ValueError as e:
    assert "Unknown attention backend 'flash_attn'" in str(e), e
else:
    raise AssertionError("attn_backend=flash_attn without flash_attn was accepted")
print("ok")
