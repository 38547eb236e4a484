"""Model presets. ``vocab_size`` None means: take the tokenizer's (the byte tokenizer by default)."""

from __future__ import annotations

from dataclasses import replace

from astrobio.model.transformer import ModelConfig

PRESETS: dict[str, dict] = {
    # trains on two CPU cores in minutes
    "tiny": dict(vocab_size=None, d_model=128, n_layers=4, n_heads=4, ffn_hidden=352, max_seq_len=512),
    # ~100M parameters
    "small": dict(vocab_size=None, d_model=768, n_layers=14, n_heads=12, ffn_hidden=2048, max_seq_len=1024),
    # 13.14B: 56 layers, d_model 4352 (34 heads of 128), SwiGLU 11776, vocab 32768, untied embeddings (docs/MEMORY.md)
    "13b": dict(vocab_size=32768, d_model=4352, n_layers=56, n_heads=34, ffn_hidden=11776, max_seq_len=4096),
}


def get_config(name: str, vocab_size: int | None = None, **overrides) -> ModelConfig:
    """The preset's config; ``vocab_size`` fills a preset that leaves it to the tokenizer."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    if fields["vocab_size"] is None:
        fields["vocab_size"] = vocab_size if vocab_size is not None else 259
    fields.update(overrides)
    return ModelConfig(**fields)


def with_vocab(config: ModelConfig, vocab_size: int) -> ModelConfig:
    return replace(config, vocab_size=vocab_size)
