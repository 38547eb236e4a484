"""Model presets, and the optimizer settings each trains with by default. ``vocab_size`` None means:
take the tokenizer's (the byte tokenizer by default)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from astrobio.model.transformer import ModelConfig

PRESETS: dict[str, dict] = {
    # trains on two CPU cores in minutes
    "tiny": dict(vocab_size=None, d_model=128, n_layers=4, n_heads=4, ffn_hidden=352, max_seq_len=512),
    # ~100M parameters
    "small": dict(vocab_size=None, d_model=768, n_layers=14, n_heads=12, ffn_hidden=2048, max_seq_len=1024),
    # 13.14B: 56 layers, d_model 4352 (34 heads of 128), SwiGLU 11776, vocab 32768, untied embeddings (docs/MEMORY.md)
    "13b": dict(vocab_size=32768, d_model=4352, n_layers=56, n_heads=34, ffn_hidden=11776, max_seq_len=4096),
}


@dataclass(frozen=True)
class TrainingDefaults:
    """A preset's default peak and final learning rates, warm-up steps and AdamW betas (the trainer's
    ``--lr``, ``--min-lr``, ``--warmup-steps``, ``--beta1``/``--beta2`` when not given; with ``--lr`` given,
    ``--min-lr`` defaults to a tenth of it)."""

    lr: float
    min_lr: float
    warmup_steps: int
    betas: tuple[float, float]


TRAINING_DEFAULTS: dict[str, TrainingDefaults] = {
    # the default job: a few hundred steps of a 1M-parameter model tolerate a large step
    "tiny": TrainingDefaults(lr=3e-3, min_lr=3e-4, warmup_steps=10, betas=(0.9, 0.95)),
    # the settings docs/EVALUATION.md's small run trained with
    "small": TrainingDefaults(lr=1e-3, min_lr=1e-4, warmup_steps=20, betas=(0.9, 0.95)),
    # 3e-3 diverged at 13B within 4 steps (loss 11.4 -> 29.3); 1e-4 is the usual order for this size
    "13b": TrainingDefaults(lr=1e-4, min_lr=1e-5, warmup_steps=20, betas=(0.9, 0.95)),
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
