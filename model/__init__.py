"""ropebert.model: the RoPE BERT encoder (E5-RoPE), its config, backend registries, loading, long-context
presets and the Hugging Face export.

Importing it registers the optional backends that can run here: flash-attn / xformers attention when those
packages are installed (optional_backends.py), and the fused Triton rotary of ropebert.kernels as rope_impl
"triton" when Triton is importable.
"""

from ropebert.kernels import rope_triton, triton_available

from .configuration_ropebert import RopeBertConfig
from .load import from_bert, load_source
from .modeling_ropebert import (
    ATTENTION_BACKENDS,
    ROPE_IMPLS,
    SELF_EXTEND_IMPLS,
    AttentionContext,
    RopeBertModel,
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


def register_kernels() -> list[str]:
    """Register ropebert.kernels' fused ops that can run here into the model's registries; returns their names."""
    names = []
    if triton_available():
        register_rope_impl("triton", rope_triton)
        names.append("triton")
    return names


register_optional_backends()
register_kernels()
__all__ = [
    "ATTENTION_BACKENDS",
    "ROPE_IMPLS",
    "AttentionContext",
    "RopeBertConfig",
    "RopeBertModel",
    "SELF_EXTEND_IMPLS",
    "apply_rotary",
    "from_bert",
    "get_attention_backend",
    "load_source",
    "mean_pool",
    "register_attention_backend",
    "register_kernels",
    "register_optional_backends",
    "register_rope_impl",
    "rope_cos_sin",
    "rope_inv_freq",
    "rotate_half",
]
