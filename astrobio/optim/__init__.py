"""Optimizers: the 8-bit AdamW specification (reference), AdamW8bit, and the CPU offload engine."""
