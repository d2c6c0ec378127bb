"""ropebert.kernels: fused kernels (Triton) with pure-torch references beside them.

Importing this package never requires Triton. When Triton is importable, the fused rotary is registered into
the model's ROPE_IMPLS as "triton" (config rope_impl="triton", or "auto" on CUDA).
"""

from .rotary import RotaryQK, rope_triton, rotary_reference, rotary_triton, triton_available


def register_kernels() -> list[str]:
    """Register the kernels that can run here into ropebert.model's registries; returns their names."""
    from ropebert.model.modeling_ropebert import register_rope_impl

    names = []
    if triton_available():
        register_rope_impl("triton", rope_triton)
        names.append("triton")
    return names


__all__ = ["RotaryQK", "register_kernels", "rope_triton", "rotary_reference", "rotary_triton", "triton_available"]
