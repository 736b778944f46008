"""Triton backend of uce_fast: tile layout (``tiles``), Monte-Carlo statistics (``mc_kernels``),
the U-CE kernels (``kernels``) and their ``torch.library`` ops (``ops``).

Importing this package imports nothing of Triton. ``uce_fast`` calls :func:`register` when it is
imported, where Triton is installed and can run (CUDA, or ``TRITON_INTERPRET=1``), so that the ops
exist before any call, and in particular before any ``torch.compile`` trace, reaches them.
"""

from __future__ import annotations

import types


def register() -> types.ModuleType:
    """Defines the Triton ops (``uce_fast::triton_*``, once per process) and returns the module
    holding them and their Python wrappers (``uce_fast.triton.ops``). Compiles nothing: Triton's
    JIT compiles each kernel variant at its first launch."""
    from uce_fast.triton import ops

    return ops
