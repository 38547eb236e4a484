"""From a data URI to training batches: records, tokens, a train/validation split, packed windows.

``load_records`` reads ``builtin`` / ``builtin:N`` (the synthetic corpus), an Open Exoplanet Catalogue
XML file, a text file or a JSONL file. ``split_records`` splits the records (not the tokens) into train
and validation; ``build_token_splits`` encodes each split's records as BOS + text + EOS.
``PackedLoader`` cuts a token stream into fixed windows and visits them in a seeded order per epoch;
its ``state_dict`` is the sampling position a checkpoint saves, so a resumed run sees exactly the
batches of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from astrobio.data.corpus import builtin_records
from astrobio.data.oec import oec_records
from astrobio.data.text import jsonl_records, text_records
from astrobio.data.tokenizer import concat_documents

BUILTIN_RECORDS = 20000
_READERS = {
    ".xml": oec_records,
    ".txt": text_records,
    ".md": text_records,
    ".jsonl": jsonl_records,
    ".ndjson": jsonl_records,
}
_URI_HELP = "'builtin', 'builtin:N', or a .txt, .jsonl or Open Exoplanet Catalogue .xml file (optionally .gz)"


def load_records(uri: str, seed: int = 0) -> list[str]:
    """The text records named by ``uri``; ``seed`` only changes the built-in corpus."""
    if uri == "builtin" or uri.startswith("builtin:"):
        return builtin_records(_builtin_count(uri), seed)
    path = Path(uri)
    name = path.name.lower()
    suffix = Path(name[: -len(".gz")]).suffix if name.endswith(".gz") else path.suffix.lower()
    if not path.exists():
        raise FileNotFoundError(f"data file {uri} does not exist; --data takes {_URI_HELP}")
    if not path.is_file():
        raise ValueError(f"data path {uri} is not a file; --data takes {_URI_HELP}")
    if suffix not in _READERS:
        found = suffix or "(no extension)"
        raise ValueError(f"data file {uri} has an unsupported format {found!r}; --data takes {_URI_HELP}")
    return _READERS[suffix](path)


def _builtin_count(uri: str) -> int:
    if uri == "builtin":
        return BUILTIN_RECORDS
    count = uri.partition(":")[2]
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"data URI {uri!r}: 'builtin:N' needs a positive whole number of records N, got {count!r}")
    return int(count)


def split_records(records: Sequence[str], val_fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, validation) records: a seeded choice of ``round(len(records) * val_fraction)`` records
    (at least one when ``val_fraction`` > 0) is held out; both keep the records' original order.
    The held-out records are those ``build_token_splits`` validates on (an evaluation probes them)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    count = len(records)
    held_out = max(1, round(count * val_fraction)) if val_fraction > 0 else 0
    if count - held_out < 1:
        raise ValueError(
            f"{count} record(s) cannot be split into train and validation; use more records or val_fraction=0"
        )
    is_val = np.zeros(count, dtype=bool)
    is_val[np.random.default_rng(_check_seed(seed)).permutation(count)[:held_out]] = True
    return [r for r, v in zip(records, is_val) if not v], [r for r, v in zip(records, is_val) if v]


def build_token_splits(
    records: Sequence[str], tokenizer, val_fraction: float = 0.05, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) int64 token streams of ``split_records``, each record as BOS + text + EOS."""
    train, val = split_records(records, val_fraction, seed)
    return _encode(train, tokenizer), _encode(val, tokenizer)


def _encode(texts: Sequence[str], tokenizer) -> torch.Tensor:
    encode_records = getattr(tokenizer, "encode_records", None)  # the vectorised path of our tokenizers
    if encode_records is not None:
        return torch.from_numpy(encode_records(texts))
    documents = [np.asarray(tokenizer.encode(text), dtype=np.int64) for text in texts]
    return torch.from_numpy(concat_documents(documents, tokenizer.bos_id, tokenizer.eos_id))


def _check_seed(seed: int) -> int:
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


class PackedLoader:
    """Fixed windows of ``seq_len + 1`` tokens (consecutive windows share one token), ``micro_batch_size``
    windows a batch; an epoch visits ``batches_per_epoch`` batches in a permutation seeded by
    (seed, epoch) and drops the windows left over. ``epoch`` counts completed epochs and ``position``
    the batches served in the current one.

    A stream too short for one batch gives ``batches_per_epoch == 0`` (callers check it to report their
    own configuration error) and ``next`` raises a ValueError saying why.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, micro_batch_size: int, seed: int, shuffle: bool = True):
        if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype.is_complex:
            raise ValueError(f"tokens must be a 1-D integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be positive, got {seq_len} and {micro_batch_size}")
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = _check_seed(seed)
        self.shuffle = shuffle
        self.num_tokens = tokens.numel()
        self.num_windows = max(0, (self.num_tokens - 1) // seq_len)
        self._tokens = tokens.to(torch.int64)
        self.fingerprint = _fingerprint(self._tokens)
        self.batches_per_epoch = self.num_windows // micro_batch_size
        self.epoch = 0
        self.position = 0
        self._order: tuple[int, torch.Tensor] | None = None

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_windows == 0:
            raise ValueError(
                f"the token stream ({self.num_tokens} tokens) is shorter than one window of seq_len + 1 = "
                f"{self.seq_len + 1} tokens; use more data or a smaller seq_len"
            )
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the token stream ({self.num_tokens} tokens) holds {self.num_windows} window(s) of "
                f"{self.seq_len + 1} tokens, fewer than one micro-batch of {self.micro_batch_size}; "
                "use more data or a smaller seq_len / micro_batch_size"
            )
        start = self.position * self.micro_batch_size
        windows = self._tokens.unfold(0, self.seq_len + 1, self.seq_len)  # a view: window w starts at w * seq_len
        chunk = windows[self._epoch_order()[start : start + self.micro_batch_size]]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
                self._order = (self.epoch, torch.from_numpy(order))
            else:
                self._order = (self.epoch, torch.arange(self.num_windows))
        return self._order[1]

    def state_dict(self) -> dict:
        """Plain ints and bools (JSON-serialisable): the position and what it is a position in."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "num_tokens": self.num_tokens,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; refuses a state saved for other data or another batch shape."""
        for key in ("seed", "shuffle", "seq_len", "micro_batch_size", "num_tokens", "fingerprint"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"data loader state was saved with {key}={state.get(key)!r} but this loader has "
                    f"{key}={getattr(self, key)!r}; resume with the same data, seed, seq_len and micro-batch size"
                )
        epoch, position = state.get("epoch"), state.get("position")
        valid_epoch = isinstance(epoch, int) and epoch >= 0
        if not (valid_epoch and isinstance(position, int) and 0 <= position < max(1, self.batches_per_epoch)):
            raise ValueError(f"data loader state has an invalid epoch/position {epoch!r}/{position!r}")
        self.epoch, self.position = epoch, position


def _fingerprint(tokens: torch.Tensor, samples: int = 4096) -> str:
    """A short hash of evenly spaced tokens: tells a resumed run that its data changed, in microseconds."""
    step = max(1, tokens.numel() // samples)
    return hashlib.sha256(tokens[::step].contiguous().numpy().tobytes()).hexdigest()[:16]
