"""Triton backend of uce_fast: kernels (``kernels``) and their ``torch.library`` ops (``ops``).

Nothing here is imported by ``import uce_fast``; ``uce_fast.functional`` imports ``ops`` when the
"triton" backend is chosen, so Triton is only loaded when it is used.
"""
