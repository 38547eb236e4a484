"""Multimodal training data: each example is a text with, optionally, a catalogue row and molecules.

``load_examples(uri, seed)`` reads the same URIs as ``--data`` (``astrobio.data.sources``):

- ``builtin`` / ``builtin:N``: one example per planet of N synthetic systems (the built-in corpus's
  generator): the system's record with that planet alone, its catalogue row, and a synthetic atmosphere
  (``synthetic_atmosphere``) written as a last ``atmosphere:`` line and given as molecules;
- an Open Exoplanet Catalogue file: one example per planet (its system's record with that planet alone,
  from ``astrobio.data.oec``) and its catalogue row; no molecules (the catalogue has none);
- a CSV/TSV/JSONL table: one example per row; the text is the row's ``text`` field (else the row as
  ``column: value`` lines), the catalogue row is its ``catalogue`` object (else the row itself), the
  molecules its ``molecules`` field (a list, or names/SMILES separated by commas, semicolons or spaces);
- a text file: text only.

``collate`` turns examples into a :class:`MultimodalBatch` (one sequence per example: BOS + text + EOS,
cut or padded to ``seq_len + 1``; padding is -100 in the targets); :class:`MultimodalLoader` serves
batches in a seeded order and saves its position like ``PackedLoader``.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from astrobio.data.catalogue import catalogue_features, oec_planets, oec_row, synthetic_row
from astrobio.data.corpus import format_record, generate_system
from astrobio.data.molecules import molecule_graph
from astrobio.data.oec import Body, parse_oec, system_record
from astrobio.data.sources import open_source
from astrobio.data.sources.registry import row_text

IGNORE_INDEX = -100
DEFAULT_SYSTEMS = 2000


@dataclass(frozen=True)
class MultimodalExample:
    text: str
    catalogue: Mapping | None = None  # a planet row: catalogue.py's keys or the archive's column names
    molecules: tuple[str, ...] = ()   # names from the molecule table, or SMILES


@dataclass
class MultimodalBatch:
    """Token ids and targets ``[B, T]`` with the modalities of the same B examples (None: not loaded)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    catalogue_values: torch.Tensor | None = None  # [B, NUM_FEATURES] float32
    catalogue_mask: torch.Tensor | None = None    # [B, NUM_FEATURES] bool
    graphs: object | None = None                  # torch_geometric Batch of B graphs (empty where none)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> MultimodalBatch:
        def move(x):
            return None if x is None else x.to(device)

        return MultimodalBatch(self.tokens.to(device), self.targets.to(device), move(self.catalogue_values),
                               move(self.catalogue_mask), move(self.graphs))

    def prefix_inputs(self) -> dict:
        """The keyword arguments of ``MultimodalPrefix.forward``."""
        return {"batch_size": self.batch_size, "catalogue_values": self.catalogue_values,
                "catalogue_mask": self.catalogue_mask, "graphs": self.graphs}


# --- examples ----------------------------------------------------------------------------------------


def synthetic_atmosphere(planet: dict, rng: random.Random) -> tuple[str, ...]:
    """A plausible atmosphere for a synthetic planet (corpus fields ``type``, ``teq``, ``hz``): hydrogen
    giants with methane, ammonia and water when cool, CO and water when hot; rocky planets with N2 and
    CO2, water below boiling, and in the habitable zone, half the time, an O2-O3-CH4 biosphere with one
    candidate biosignature gas; otherwise, a third of the time, volcanic sulfur."""
    cool = planet.get("teq", 300.0) < 1000.0
    if planet.get("type") in ("jovian", "neptunian"):
        return ("H2", "CH4", "NH3", "H2O") if cool else ("H2", "CO", "H2O")
    gases = ["N2", "CO2"] + (["H2O"] if planet.get("teq", 300.0) < 373.0 else [])
    if planet.get("hz") == "yes" and rng.random() < 0.5:
        gases += ["O2", "O3", "CH4", rng.choice(("N2O", "DMS", "CH3Cl", "PH3"))]
    elif rng.random() < 1 / 3:
        gases += ["SO2", "H2S"]
    return tuple(gases)


def builtin_examples(systems: int = DEFAULT_SYSTEMS, seed: int = 0) -> list[MultimodalExample]:
    rng = random.Random(seed)
    atmosphere_rng = random.Random(seed + 1)
    examples = []
    for _ in range(systems):
        system = generate_system(rng)
        for planet in system["planets"]:
            gases = synthetic_atmosphere(planet, atmosphere_rng)
            text = format_record({**system, "planets": [planet]}) + "\natmosphere: " + ", ".join(gases)
            examples.append(MultimodalExample(text, synthetic_row(system, planet), gases))
    return examples


def only_planet(body: Body, planet: Body) -> Body:
    """A copy of the tree without the planets other than ``planet``."""
    children = [only_planet(c, planet) for c in body.children if c.kind != "planet" or c is planet]
    return replace(body, children=children)


def oec_examples(data: bytes) -> list[MultimodalExample]:
    return [MultimodalExample(system_record(only_planet(system, planet)), oec_row(system, planet, star))
            for system, planet, star in oec_planets(parse_oec(data))]


def molecule_list(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(m for m in re.split(r"[,;\s]+", value) if m)
    return tuple(str(m) for m in value)


def row_example(row: Mapping) -> MultimodalExample:
    rest = {k: v for k, v in row.items() if k not in ("text", "catalogue", "molecules")}
    text = row["text"] if isinstance(row.get("text"), str) else row_text(rest)
    catalogue = row["catalogue"] if isinstance(row.get("catalogue"), Mapping) else rest
    return MultimodalExample(text, catalogue, molecule_list(row.get("molecules")))


def load_examples(uri: str, seed: int = 0) -> list[MultimodalExample]:
    """The multimodal examples of a data URI (see the module docstring)."""
    source = open_source(uri)
    if source.format == "builtin":
        count = source.name.partition(":")[2].partition("#")[0]
        if count and (not count.isdigit() or int(count) < 1):
            raise ValueError(f"data URI {uri!r}: 'builtin:N' needs a positive number of systems N, got {count!r}")
        return builtin_examples(int(count) if count else DEFAULT_SYSTEMS, seed)
    if source.format == "oec":
        return oec_examples(source.fetch())
    if source.format in ("csv", "tsv", "jsonl"):
        return [row_example(row) for row in source.rows()]
    return [MultimodalExample(text) for text in source.records(seed)]


# --- batches -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def cached_graph(molecules: tuple[str, ...]):
    return molecule_graph(molecules)


def collate(examples: Sequence[MultimodalExample], tokenizer, seq_len: int,
            modalities: Sequence[str] = ("text", "catalogue", "graph")) -> MultimodalBatch:
    """A batch of ``len(examples)`` sequences of ``seq_len`` tokens and the requested modalities."""
    if not examples:
        raise ValueError("collate needs at least one example")
    tokens = torch.full((len(examples), seq_len), tokenizer.pad_id, dtype=torch.int64)
    targets = torch.full((len(examples), seq_len), IGNORE_INDEX, dtype=torch.int64)
    for row, example in enumerate(examples):
        ids = [tokenizer.bos_id] + tokenizer.encode(example.text) + [tokenizer.eos_id]
        ids = torch.tensor(ids[:seq_len + 1], dtype=torch.int64)
        tokens[row, :len(ids) - 1] = ids[:-1]
        targets[row, :len(ids) - 1] = ids[1:]
    batch = MultimodalBatch(tokens, targets)
    if "catalogue" in modalities:
        batch.catalogue_values, batch.catalogue_mask = catalogue_features(e.catalogue for e in examples)
    if "graph" in modalities:
        from torch_geometric.data import Batch

        batch.graphs = Batch.from_data_list([cached_graph(tuple(e.molecules)) for e in examples])
    return batch


class MultimodalLoader:
    """``micro_batch_size`` examples a batch in a permutation seeded by (seed, epoch); the examples
    left over at the end of an epoch are dropped. ``state_dict`` is the position, as PackedLoader's."""

    def __init__(self, examples: Sequence[MultimodalExample], tokenizer, seq_len: int, micro_batch_size: int,
                 seed: int, modalities: Sequence[str] = ("text", "catalogue", "graph"), shuffle: bool = True):
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be positive, got {seq_len} and {micro_batch_size}")
        if len(examples) < micro_batch_size:
            raise ValueError(f"{len(examples)} example(s) are fewer than one micro-batch of {micro_batch_size}; "
                             "use more data or a smaller micro-batch size")
        self.examples, self.tokenizer, self.modalities = list(examples), tokenizer, tuple(modalities)
        self.seq_len, self.micro_batch_size, self.seed, self.shuffle = seq_len, micro_batch_size, seed, shuffle
        self.num_examples = len(self.examples)
        self.batches_per_epoch = self.num_examples // micro_batch_size
        self.epoch = 0
        self.position = 0

    def __iter__(self) -> MultimodalLoader:
        return self

    def __next__(self) -> MultimodalBatch:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples)
        else:
            order = np.arange(self.num_examples)
        start = self.position * self.micro_batch_size
        chosen = [self.examples[i] for i in order[start:start + self.micro_batch_size]]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return collate(chosen, self.tokenizer, self.seq_len, self.modalities)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
                "seq_len": self.seq_len, "micro_batch_size": self.micro_batch_size,
                "num_examples": self.num_examples, "modalities": list(self.modalities)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "shuffle", "seq_len", "micro_batch_size", "num_examples"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"multimodal loader state was saved with {key}={state.get(key)!r} but this loader "
                                 f"has {key}={getattr(self, key)!r}; resume with the same data, seed and batch shape")
        epoch, position = state.get("epoch"), state.get("position")
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(position, int)
                and 0 <= position < self.batches_per_epoch):
            raise ValueError(f"multimodal loader state has an invalid epoch/position {epoch!r}/{position!r}")
        self.epoch, self.position = epoch, position
