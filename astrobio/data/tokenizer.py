"""Tokenizers: a byte-level tokenizer (the default) and a local Hugging Face ``tokenizer.json``.

Both expose one interface: ``encode(text) -> list[int]`` (no special tokens), ``decode(ids) -> str``
(special tokens dropped), and the attributes ``bos_id``, ``eos_id``, ``pad_id``, ``vocab_size``, ``name``.
A tokenizer file is data: it is parsed as JSON by ``tokenizers``, never executed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus three specials: BOS=256, EOS=257, PAD=258 (vocab_size 259)."""

    name = "byte"
    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_records(self, texts: Sequence[str]) -> np.ndarray:
        """BOS + text + EOS for each text, concatenated (int64); a vectorised ``encode``."""
        encoded = [text.encode("utf-8") for text in texts]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        return pack_documents(np.frombuffer(b"".join(encoded), dtype=np.uint8), lengths, self.bos_id, self.eos_id)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the byte tokenizer's vocabulary 0..{self.vocab_size - 1}")
        # invalid UTF-8 (a sequence cut mid-character, say) becomes U+FFFD rather than an error
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def concat_documents(documents: Sequence[np.ndarray], bos_id: int, eos_id: int) -> np.ndarray:
    """BOS + document + EOS for each document's token ids, concatenated (int64)."""
    lengths = np.fromiter(map(len, documents), dtype=np.int64, count=len(documents))
    body = np.concatenate(documents) if documents else np.empty(0, dtype=np.int64)
    return pack_documents(body, lengths, bos_id, eos_id)


def pack_documents(body: np.ndarray, lengths: np.ndarray, bos_id: int, eos_id: int) -> np.ndarray:
    """``body`` (the documents' ids back to back, ``lengths`` each) with BOS before and EOS after each."""
    ends = np.cumsum(lengths + 2)
    starts = ends - (lengths + 2)
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int64)
    is_text = np.ones(out.shape[0], dtype=bool)
    is_text[starts] = is_text[ends - 1] = False
    out[starts], out[ends - 1] = bos_id, eos_id
    out[is_text] = body
    return out


# Names Hugging Face tokenizers commonly give their special tokens, most usual first.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]", "<|startoftext|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]", "<|eot_id|>")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` behind the ``ByteTokenizer`` interface.

    BOS falls back to EOS and PAD to EOS when the file defines no such token (GPT-2 style files
    define only ``<|endoftext|>``); a file without any end-of-text token is refused.
    """

    def __init__(self, tokenizer, path: Path):
        self._tok = tokenizer
        self.path = path
        self.name = f"hf:{path}"
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find(_EOS_NAMES)
        if self.eos_id is None:
            raise ValueError(
                f"tokenizer file {path} defines no end-of-text token; "
                f"add one of {', '.join(_EOS_NAMES)} to its vocabulary"
            )
        bos = self._find(_BOS_NAMES)
        pad = self._find(_PAD_NAMES)
        self.bos_id = self.eos_id if bos is None else bos
        self.pad_id = self.eos_id if pad is None else pad

    def _find(self, names: tuple[str, ...]) -> int | None:
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_records(self, texts: Sequence[str]) -> np.ndarray:
        """BOS + text + EOS for each text, concatenated (int64)."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return concat_documents([np.asarray(e.ids, dtype=np.int64) for e in encodings], self.bos_id, self.eos_id)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path: str | Path | None = None) -> ByteTokenizer | HFTokenizer:
    """The byte tokenizer for ``None``; otherwise a local ``tokenizer.json`` (or a folder holding one)."""
    if path is None:
        return ByteTokenizer()
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer file {file} does not exist; give the path of a Hugging Face tokenizer.json")
    try:
        from tokenizers import Tokenizer
    except ImportError as err:
        raise ImportError(
            f"reading the tokenizer file {file} needs the 'tokenizers' package: pip install tokenizers"
        ) from err
    text = file.read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"tokenizer file {file} is not valid JSON ({err}); expected a Hugging Face tokenizer.json"
        ) from None
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception for a schema it does not accept
        raise ValueError(f"tokenizer file {file} is not a Hugging Face tokenizer.json: {err}") from None
    return HFTokenizer(tokenizer, file)
