"""Triton kernels and their launchers (installed as ``cplfast.kernels``): no nn.Module, no training logic."""
