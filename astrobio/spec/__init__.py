"""Specifications the kernels implement, below the ops layer: plain PyTorch, importing nothing of astrobio.

``astrobio.spec.adamw8bit``: the 8-bit AdamW step every backend (C++, CUDA, Triton) reproduces bit for bit.
"""
