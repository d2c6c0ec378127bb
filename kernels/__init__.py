"""ropebert.kernels: fused kernels (Triton) with pure-torch references beside them.

A leaf package: it imports torch (and Triton, lazily, when available), never the model. Importing it never
requires Triton; the model side (ropebert.model) registers `rope_triton` as rope_impl "triton" when
`triton_available()`.
"""

from .rotary import RotaryQK, rope_triton, rotary_reference, rotary_triton, triton_available

__all__ = ["RotaryQK", "rope_triton", "rotary_reference", "rotary_triton", "triton_available"]
