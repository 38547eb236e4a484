"""Triton kernels, installed as astrobio.kernels (never as a top-level `kernels` module).

adamw8bit: the 8-bit AdamW step as the op ``astrobio::adamw8bit_step_triton`` (imported on demand by
astrobio.ops for the backend "triton", so that importing astrobio never imports triton).
"""
