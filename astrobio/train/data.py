"""The trainer's data: the tokenizer, the training loader and the fixed validation micro-batches.

``--data`` is a source URI (``astrobio.data.sources``: ``builtin[:N]``, a local file, ``http(s)://...``);
only ``redact_uri(data)`` is ever written or shown. With ``--modalities text`` the records are packed
into sequences (``PackedLoader``; a micro-batch is ``(inputs, targets)``); with a prefix modality
(``catalogue``, ``graph``) each example is one sequence with its catalogue row and molecule graph
(``MultimodalLoader``; a micro-batch is a ``MultimodalBatch``). Both loaders save their position.

With data parallel every rank holds the same loader, and ``ReplicaShard`` gives its replica its share:
an optimizer step takes replicas x accumulation micro-batches of the one global sequence, and replica
``r`` trains on micro-batches ``r, r + K, r + 2K, ...`` of them. The position is the global one, so a
checkpoint resumes exactly with another replica count as long as the global batch is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from astrobio.data.sources import redact_uri
from astrobio.train.config import ConfigError, TrainConfig, micro_batches_per_step

VAL_FRACTION = 0.05  # as astrobio.data.build_token_splits


@dataclass
class DataBundle:
    tokenizer: object
    train_loader: object  # astrobio.data.PackedLoader or astrobio.data.multimodal.MultimodalLoader
    val_batches: list     # (inputs, targets) tuples or MultimodalBatch
    train_size: int       # tokens (packed) or examples (multimodal)
    val_size: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


class ReplicaShard:
    """Replica ``replica`` of ``replicas``' view of a training loader: each ``next`` draws one micro-batch
    for every replica from the global sequence and keeps this replica's. ``state_dict`` is the global
    loader's (the same on every replica)."""

    def __init__(self, loader, replica: int, replicas: int):
        if not 0 <= replica < replicas:
            raise ValueError(f"replica {replica} is not one of 0..{replicas - 1}")
        self.loader, self.replica, self.replicas = loader, replica, replicas

    def __iter__(self) -> ReplicaShard:
        return self

    def __next__(self):
        drawn = [next(self.loader) for _ in range(self.replicas)]
        return drawn[self.replica]

    @property
    def batches_per_epoch(self) -> int:
        """The global loader's micro-batches per epoch (every replica's together)."""
        return self.loader.batches_per_epoch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def build_data(config: TrainConfig) -> DataBundle:
    """Tokenizer, the shuffled training loader, and the fixed validation micro-batches."""
    from astrobio.data import load_tokenizer
    from astrobio.model.encoders import check_modalities
    try:
        tokenizer = load_tokenizer(config.tokenizer)
        if check_modalities(config.modalities):
            return build_multimodal_data(config, tokenizer)
        return build_packed_data(config, tokenizer)
    except (OSError, ValueError, ImportError, RuntimeError) as error:
        raise ConfigError(redact_uri(str(error)) if "://" in str(error) else str(error)) from None


def take(loader, count: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(count)]


def eval_count(config: TrainConfig, available: int) -> int:
    return min(available, config.eval_batches) if config.eval_batches else available


def build_packed_data(config: TrainConfig, tokenizer) -> DataBundle:
    from astrobio.data import PackedLoader, build_token_splits
    from astrobio.data.sources import open_source
    records = open_source(config.data).records(config.seed)
    train_ids, val_ids = build_token_splits(records, tokenizer, VAL_FRACTION, seed=config.seed)
    data = redact_uri(config.data)
    loader = PackedLoader(train_ids, config.seq_len, config.micro_batch_size, seed=config.seed)
    if loader.batches_per_epoch < micro_batches_per_step(config):
        raise ConfigError(f"the training split of {data!r} ({len(train_ids)} tokens) holds "
                          f"{loader.batches_per_epoch} micro-batches of {config.micro_batch_size} x "
                          f"{config.seq_len} tokens, fewer than one step's {micro_batches_per_step(config)}; "
                          f"use more data or a smaller --seq-len / --batch-size")
    val_windows = (len(val_ids) - 1) // config.seq_len
    if val_windows < 1:
        raise ConfigError(f"the validation split of {data!r} ({len(val_ids)} tokens) is shorter than "
                          f"one sequence of {config.seq_len + 1} tokens; use more data or a smaller --seq-len")
    # a small validation split is evaluated in smaller batches rather than refused
    val_loader = PackedLoader(val_ids, config.seq_len, min(config.micro_batch_size, val_windows),
                              seed=config.seed, shuffle=False)
    val_batches = take(val_loader, eval_count(config, val_loader.batches_per_epoch))
    return DataBundle(tokenizer, loader, val_batches, len(train_ids), len(val_ids))


def build_multimodal_data(config: TrainConfig, tokenizer) -> DataBundle:
    from astrobio.data.loader import split_records
    from astrobio.data.multimodal import MultimodalLoader, load_examples
    modalities = tuple(m.strip() for m in config.modalities.split(","))
    examples = load_examples(config.data, seed=config.seed)
    train, val = split_records(examples, VAL_FRACTION, seed=config.seed)
    loader = MultimodalLoader(train, tokenizer, config.seq_len, config.micro_batch_size, config.seed, modalities)
    if loader.batches_per_epoch < micro_batches_per_step(config):
        raise ConfigError(f"the training split of {redact_uri(config.data)!r} ({len(train)} examples) holds "
                          f"{loader.batches_per_epoch} micro-batches of {config.micro_batch_size}, fewer than one "
                          f"step's {micro_batches_per_step(config)}; use more data or a smaller --batch-size")
    val_loader = MultimodalLoader(val, tokenizer, config.seq_len, min(config.micro_batch_size, len(val)),
                                  config.seed, modalities, shuffle=False)
    val_batches = take(val_loader, eval_count(config, val_loader.batches_per_epoch))
    return DataBundle(tokenizer, loader, val_batches, len(train), len(val))
