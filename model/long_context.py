# Copyright ropebert contributors. Apache-2.0.
"""Long-context presets: the context-extension methods of LongEmbed (Table 6) as RopeBertConfig keys and
encode options, for evaluation (`ropebert eval passkey|needle`) and the MTEB wrapper.

Methods (`--method`), applied only through RopeBertConfig keys / the encode option of the long-context
contract, for a target length L and the trained length L0 (original_max_position_embeddings, else
max_position_embeddings), s = L / L0 rounded up to a power of two; L <= L0 leaves the model unchanged:
    none        no change (the whole document is fed; RoPE extrapolates)
    ntk         rope_theta = theta0 * f(s), f = 3, 5, 10 for s = 2, 4, 8 (LongEmbed Table 6: 30k/50k/100k from
                10k at 1k/2k/4k); beyond 4k (our extrapolation) f doubles per doubling: 20, 40, 80 for 8k/16k/32k
    selfextend  self_extend = {group_size: s + 1, window: L0 / s}: (3,256) (5,128) (9,64) at 1k/2k/4k as in
                Table 6, i.e. window + (L - window) / group <= L0; extrapolated: (17,32) (33,16) (65,8)
    pi          rope_scaling = {"type": "pi", "factor": "auto"}: each input's own factor ceil(n / L0) (LongEmbed's
                rule; 1 for n <= L0, so short queries keep their positions; = s for an input of the target length)
    gp          position_mode = "gp", position_scale = "auto" (likewise)
    rp          position_mode = "rp", original_max_position_embeddings = L0
    pcw         model.encode(..., pcw=True) (parallel context windows: [CLS] prefix chunk [SEP] <= L0 tokens)
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math

from ropebert.errors import InputError, UserError

METHODS = ("none", "ntk", "selfextend", "pi", "gp", "rp", "pcw")
LONG_CONTEXT_KEYS = ("rope_theta", "rope_scaling", "position_mode", "position_scale",
                     "original_max_position_embeddings", "self_extend", "attn_scale_base")
NTK_THETA_FACTOR = {2: 3.0, 4: 5.0, 8: 10.0}  # Table 6 (theta 30k/50k/100k from 10k); beyond: x2 per doubling


def extension_factor(target_len: int, orig_len: int) -> int:
    """s = target / original rounded up to a power of two (1 when target <= original)."""
    if target_len <= orig_len:
        return 1
    return 2 ** math.ceil(math.log2(target_len / orig_len))


def ntk_factor(s: int) -> float:
    if s <= 1:
        return 1.0
    if s in NTK_THETA_FACTOR:
        return NTK_THETA_FACTOR[s]
    return NTK_THETA_FACTOR[8] * (s // 8)  # extrapolation: doubles with every doubling of the length


def selfextend_preset(s: int, orig_len: int) -> dict:
    """(group, window) = (s + 1, orig / s): Table 6's (3,256) (5,128) (9,64) at s = 2, 4, 8 for orig 512."""
    return {"group_size": s + 1, "window": max(1, orig_len // s)}


def method_preset(method: str, target_len: int, config) -> tuple[dict, dict]:
    """(config key updates, encode kwargs) of `method` at `target_len` for a model trained at its original length."""
    if method not in METHODS:
        raise InputError(f"unknown long-context method {method!r}; choose from {', '.join(METHODS)}")
    L0 = config.original_length
    s = extension_factor(target_len, L0)
    if method == "none" or s == 1:
        return {}, {}
    if method == "ntk":
        return {"rope_theta": float(config.rope_theta) * ntk_factor(s)}, {}
    if method == "selfextend":
        return {"self_extend": selfextend_preset(s, L0), "original_max_position_embeddings": L0}, {}
    if method == "pi":  # the factor of each input from its own length: inputs <= L0 keep their positions
        return {"rope_scaling": {"type": "pi", "factor": "auto"}}, {}
    if method == "gp":
        return {"position_mode": "gp", "position_scale": "auto"}, {}
    if method == "rp":
        return {"position_mode": "rp", "original_max_position_embeddings": L0}, {}
    return {}, {"pcw": True}  # pcw


def supported_config_keys(config) -> set[str]:
    """Keys the model's config class declares (an undeclared key would be silently ignored by the model)."""
    return set(inspect.signature(type(config).__init__).parameters) - {"self", "kwargs"}


def encode_supports(model, option: str) -> bool:
    return option in inspect.signature(model.encode).parameters


def check_method_supported(model, method: str, target_len: int) -> tuple[dict, dict]:
    """method_preset(...) after checking that this model version has every key / encode option it needs
    (RuntimeError naming them otherwise)."""
    updates, encode_kwargs = method_preset(method, target_len, model.config)
    missing = sorted(k for k in updates if k not in supported_config_keys(model.config))
    if missing:
        raise UserError(
            f"method {method!r} needs RopeBertConfig key(s) {missing}, which this ropebert version does not "
            "implement yet (long-context config keys of the kernels issue)"
        )
    for opt in encode_kwargs:
        if not encode_supports(model, opt):
            raise UserError(f"method {method!r} needs model.encode(..., {opt}=True), which this ropebert "
                               "version does not implement yet")
    return updates, encode_kwargs


def apply_long_context_method(model, method: str, target_len: int) -> dict:
    """Set the config keys of `method` for `target_len` on `model` (in place) and return the extra encode
    kwargs. Raises RuntimeError when this model version lacks a needed key / encode option."""
    updates, encode_kwargs = check_method_supported(model, method, target_len)
    for k, v in updates.items():
        setattr(model.config, k, copy.deepcopy(v))
    if hasattr(model.config, "validate_ropebert"):
        model.config.validate_ropebert()
    return encode_kwargs


@contextlib.contextmanager
def long_context(model, method: str, target_len: int):
    """apply_long_context_method for the duration of a block, restoring the config afterwards."""
    saved = {k: copy.deepcopy(getattr(model.config, k)) for k in LONG_CONTEXT_KEYS if hasattr(model.config, k)}
    absent = [k for k in LONG_CONTEXT_KEYS if not hasattr(model.config, k)]
    try:
        yield apply_long_context_method(model, method, target_len)
    finally:
        for k, v in saved.items():
            setattr(model.config, k, v)
        for k in absent:
            if hasattr(model.config, k):
                delattr(model.config, k)
