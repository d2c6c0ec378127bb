"""ropebert.kernels: fused kernels (Triton) with pure-torch references beside them.

A leaf package: it imports torch (and Triton, lazily, when available), never the model. Importing it never
requires Triton; the model side (ropebert.model) registers `rope_triton` as rope_impl "triton" when
`triton_available()`.
"""

if __name__ == "kernels":  # pragma: no cover - depends on the environment
    # This directory was imported as the top-level module `kernels`: the checkout's root is on sys.path (`python -m
    # ropebert` run from it) and something imported the distribution of that name (Hugging Face `kernels`, which
    # transformers >= 5.25 requires and imports). Hand that import the distribution, never this package (which is
    # ropebert.kernels only).
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    del sys.modules["kernels"]
    try:
        sys.modules["kernels"] = importlib.import_module("kernels")
    except ImportError as e:
        raise ImportError(f"`import kernels` found the ropebert checkout's kernels/ directory ({_root} is on sys.path) "
                          "and no installed distribution named kernels; run from outside the checkout or install "
                          "the `kernels` package") from e
    finally:
        sys.path[:] = _saved
else:
    from .rotary import RotaryQK, rope_triton, rotary_reference, rotary_triton, triton_available

__all__ = ["RotaryQK", "rope_triton", "rotary_reference", "rotary_triton", "triton_available"]
