"""ropebert.model: the RoPE BERT encoder (E5-RoPE), its config, attention-backend registry and HF export."""

from .configuration_ropebert import RopeBertConfig
from .modeling_ropebert import (
    ATTENTION_BACKENDS,
    ROPE_IMPLS,
    AttentionContext,
    RopeBertModel,
    SELF_EXTEND_IMPLS,
    apply_rotary,
    get_attention_backend,
    mean_pool,
    register_attention_backend,
    register_rope_impl,
    rope_cos_sin,
    rope_inv_freq,
    rotate_half,
)
from .optional_backends import register_optional_backends

register_optional_backends()


def _register_kernels() -> None:
    # the fused Triton rotary registers itself as rope_impl "triton" when Triton is importable
    try:
        from ropebert.kernels import register_kernels
    except ImportError:  # ropebert.kernels missing from a partial install: the torch rotary still works
        return
    register_kernels()


_register_kernels()

__all__ = [
    "ATTENTION_BACKENDS",
    "ROPE_IMPLS",
    "AttentionContext",
    "RopeBertConfig",
    "RopeBertModel",
    "SELF_EXTEND_IMPLS",
    "apply_rotary",
    "get_attention_backend",
    "mean_pool",
    "register_attention_backend",
    "register_rope_impl",
    "rope_cos_sin",
    "rope_inv_freq",
    "rotate_half",
]
