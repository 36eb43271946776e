"""Autograd functions and ``torch.library`` custom ops over the Triton kernels in :mod:`cplfast.kernels`.

One module per fused op; each exposes a function with the op's name taking already-validated
arguments (see :mod:`cplfast.functional`).
"""
