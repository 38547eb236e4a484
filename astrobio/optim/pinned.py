"""Pinned host buffers without the caching allocator's rounding.

torch's page-locked host allocator rounds every allocation up to the next power of two (so that a freed
block fits the next request of its size class). The offload engine's buffers are allocated once and never
freed, and their sizes (a bucket's masters, accumulators, upload copy) are whatever the model's
parameters add up to: rounded one by one they cost up to twice what they hold, and pinned pages are
always resident. A 13B run on one H200 measured 100.6 GiB of host RSS against 76.8 GiB planned, which
this rounding can explain (to be measured again with the arena, docs/BENCHMARKS.md).

``PinnedArena`` asks the allocator only for blocks whose size is a power of two (nothing to round) and
hands out aligned slices of them, first fit. A new block is as large as what is still expected
(``expected_bytes``), rounded *down* to a power of two and capped at ``block_bytes``, or the request's own
size rounded up when that is larger; so what the arena reserves beyond what it hands out is a few block
tails. Slices of a pinned block are pinned: non-blocking copies from and to them stay asynchronous.
"""

from __future__ import annotations

import torch

ALIGN = 512  # bytes; every slice starts at a multiple (vector loads, DMA)
BLOCK_BYTES = 1 << 30


def pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def pow2_ceil(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


class PinnedArena:
    """Host buffers carved from power-of-two blocks; see the module docstring. ``pin=False`` gives plain
    host blocks (the CPU-only path, and tests)."""

    def __init__(self, expected_bytes: int = 0, block_bytes: int = BLOCK_BYTES, pin: bool = True):
        if block_bytes != pow2_ceil(block_bytes):
            raise ValueError(f"block_bytes must be a power of two, got {block_bytes}")
        self.block_bytes, self.pin = block_bytes, pin
        self.expected = expected_bytes
        self.blocks: list[torch.Tensor] = []
        self.used: list[int] = []  # bytes handed out of each block, up to its last slice's end
        self.handed_out = 0

    @property
    def reserved(self) -> int:
        """Bytes of the blocks allocated so far."""
        return sum(block.numel() for block in self.blocks)

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised 1-D host tensor of ``numel`` elements of ``dtype``, in one of the blocks."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        for i in range(len(self.blocks)):
            start = self._aligned(i, self.used[i])
            if start + nbytes <= self.blocks[i].numel():
                return self._slice(i, start, nbytes, dtype)
        self._new_block(nbytes if self.pin else nbytes + ALIGN)  # pinned blocks start on a page
        i = len(self.blocks) - 1
        return self._slice(i, self._aligned(i, 0), nbytes, dtype)

    def zeros(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return self.empty(numel, dtype).zero_()

    def _new_block(self, nbytes: int) -> None:
        still_expected = max(0, self.expected - self.reserved)
        size = max(pow2_ceil(nbytes), pow2_floor(min(self.block_bytes, still_expected)))
        self.blocks.append(torch.empty(size, dtype=torch.uint8, pin_memory=self.pin))
        self.used.append(0)

    def _aligned(self, i: int, offset: int) -> int:
        """The first offset from ``offset`` on whose address in block ``i`` is a multiple of ALIGN (pinned
        blocks start on a page; plain host ones may not)."""
        return offset + (-(self.blocks[i].data_ptr() + offset) % ALIGN)

    def _slice(self, i: int, start: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        self.used[i] = start + nbytes
        self.handed_out += nbytes
        return self.blocks[i][start:start + nbytes].view(dtype)
