"""Long-context presets (LongEmbed Table 6) applied through RopeBertConfig keys / encode options."""

from __future__ import annotations

import pytest
import torch

from ropebert.model.long_context import apply_long_context_method, long_context, method_preset, supported_config_keys
from tests.conftest import tiny_config


def test_method_presets_follow_longembed_table6():
    cfg = tiny_config(max_position_embeddings=512, rope_theta=10000.0)
    assert method_preset("ntk", 512, cfg) == ({}, {})  # <= original length: unchanged
    assert method_preset("selfextend", 256, cfg) == ({}, {})
    assert [method_preset("ntk", n, cfg)[0]["rope_theta"] for n in (1024, 2048, 4096)] == [30000, 50000, 100000]
    assert [method_preset("ntk", n, cfg)[0]["rope_theta"] for n in (8192, 16384, 32768)] == [200000, 400000, 800000]
    se = [method_preset("selfextend", n, cfg)[0]["self_extend"] for n in (1024, 2048, 4096, 8192, 32768)]
    assert [(s["group_size"], s["window"]) for s in se] == [(3, 256), (5, 128), (9, 64), (17, 32), (65, 8)]
    for n, s in zip((1024, 2048, 4096, 8192, 32768), se):  # SelfExtend's rule: w + (L - w) / g <= 512
        assert s["window"] + (n - s["window"]) / s["group_size"] <= 512
    assert method_preset("pi", 2048, cfg)[0] == {"rope_scaling": {"type": "pi", "factor": 4.0}}
    assert method_preset("gp", 4096, cfg)[0] == {"position_mode": "gp", "position_scale": 8.0}
    assert method_preset("rp", 1024, cfg)[0] == {"position_mode": "rp", "original_max_position_embeddings": 512}
    assert method_preset("pcw", 1024, cfg) == ({}, {"pcw": True})
    with pytest.raises(ValueError, match="unknown long-context method"):
        method_preset("yarn", 1024, cfg)


def test_ntk_applies_through_rope_theta_and_is_restored(tiny_model):
    tiny_model.config.max_position_embeddings = 16
    ids = torch.randint(1, 101, (1, 40))
    with torch.no_grad():
        base = tiny_model.embed(ids, torch.ones_like(ids))
        with long_context(tiny_model, "ntk", 64) as kw:  # s = 4 -> theta * 5
            assert kw == {} and tiny_model.config.rope_theta == 50000.0
            ntk = tiny_model.embed(ids, torch.ones_like(ids))
        assert tiny_model.config.rope_theta == 10000.0
        again = tiny_model.embed(ids, torch.ones_like(ids))
    assert not torch.allclose(base, ntk)  # the config key is read at forward time
    torch.testing.assert_close(base, again)


@pytest.mark.parametrize("method,key", [("selfextend", "self_extend"), ("pi", "rope_scaling"), ("gp", "position_mode"),
                                        ("rp", "position_mode")])
def test_config_key_methods(tiny_model, method, key):
    """Runs for real once the long-context keys land in RopeBertConfig; until then a clear error."""
    tiny_model.config.max_position_embeddings = 16
    if key not in supported_config_keys(tiny_model.config):
        with pytest.raises(RuntimeError, match=f"needs RopeBertConfig key.*{key}"):
            apply_long_context_method(tiny_model, method, 64)
        pytest.skip(f"RopeBertConfig has no {key!r} yet (long-context keys of the kernels issue)")
    ids = torch.randint(1, 101, (1, 48))
    with torch.no_grad():
        base = tiny_model.embed(ids, torch.ones_like(ids))
        with long_context(tiny_model, method, 64):
            ext = tiny_model.embed(ids, torch.ones_like(ids))
        again = tiny_model.embed(ids, torch.ones_like(ids))
    assert not torch.allclose(base, ext)
    torch.testing.assert_close(base, again)


def test_pcw_needs_encode_option(tiny_model):
    import inspect

    if "pcw" not in inspect.signature(tiny_model.encode).parameters:
        with pytest.raises(RuntimeError, match=r"needs model.encode\(\.\.\., pcw=True\)"):
            apply_long_context_method(tiny_model, "pcw", 1024)
    else:
        assert apply_long_context_method(tiny_model, "pcw", 1024) == {"pcw": True}
