"""Triton kernels, installed as astrobio.kernels (never as a top-level `kernels` module)."""
