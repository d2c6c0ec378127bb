"""ropebert.kernels: fused kernels (Triton) with pure-torch references beside them.

A leaf package: it imports torch (and Triton, lazily, when available), never the model. Importing it never
requires Triton; the model side (ropebert.model) registers `rope_triton` as rope_impl "triton" when
`triton_available()`.
"""

def _distribution_installed(name: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


if __name__ == "kernels" and _distribution_installed("kernels"):  # pragma: no cover - depends on the environment
    # This directory was imported as the top-level module `kernels`: the checkout's root is on sys.path (`python -m
    # ropebert` run from it) and something imported the distribution of that name (Hugging Face `kernels`, which
    # transformers >= 5.25 requires and imports). Hand that import the distribution, never this package (which is
    # ropebert.kernels only). Without that distribution the import goes on as before (transformers probes the name).
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    del sys.modules["kernels"]
    try:
        sys.modules["kernels"] = importlib.import_module("kernels")
    finally:
        sys.path[:] = _saved
else:
    from .rotary import RotaryQK, rope_triton, rotary_reference, rotary_triton, triton_available

__all__ = ["RotaryQK", "rope_triton", "rotary_reference", "rotary_triton", "triton_available"]
