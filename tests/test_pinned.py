"""astrobio.optim.pinned: host buffers carved from power-of-two blocks (no per-buffer rounding)."""

from __future__ import annotations

import random

import pytest
import torch

from astrobio.optim.pinned import ALIGN, PinnedArena, pow2_ceil, pow2_floor


def bucket_like_sizes(seed: int = 0) -> list[tuple[int, torch.dtype]]:
    """Requests shaped like an offload engine's: per bucket a master, an accumulator and sometimes an
    upload buffer, buckets of ~1-3 MiB of parameters with an odd large one (an embedding)."""
    rng = random.Random(seed)
    sizes = []
    for bucket in range(120):
        numel = rng.randrange(300_000, 1_500_000) if bucket != 7 else 5_000_000
        sizes += [(numel, torch.float32), (numel, torch.bfloat16)]
        if bucket % 3 == 0:
            sizes.append((numel, torch.bfloat16))
    return sizes


def test_powers_of_two():
    assert [pow2_floor(n) for n in (1, 2, 3, 1000, 1024, 1025)] == [1, 2, 2, 512, 1024, 1024]
    assert [pow2_ceil(n) for n in (1, 2, 3, 1000, 1024, 1025)] == [1, 2, 4, 1024, 1024, 2048]


def test_buffers_are_aligned_disjoint_and_hold_their_own_data():
    sizes = bucket_like_sizes()
    expected = sum(n * torch.empty((), dtype=d).element_size() for n, d in sizes)
    arena = PinnedArena(expected, block_bytes=16 << 20, pin=False)
    buffers = [arena.empty(n, d) for n, d in sizes]
    spans = []
    for (numel, dtype), buf in zip(sizes, buffers):
        assert buf.numel() == numel and buf.dtype == dtype and buf.is_contiguous()
        assert buf.data_ptr() % ALIGN == 0
        spans.append((buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()))
    spans.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    for i, buf in enumerate(buffers):
        buf.fill_(i)
    assert all(torch.all(buf == i) for i, buf in enumerate(buffers))
    for block in arena.blocks:
        assert block.numel() == pow2_ceil(block.numel())  # the allocator has nothing to round


def test_reserved_bytes_stay_close_to_what_is_handed_out():
    """Rounding every buffer up to a power of two (what the pinned caching allocator does) costs these
    sizes ~40% more; the arena's blocks cost at most a few percent."""
    sizes = bucket_like_sizes(seed=1)
    nbytes = [n * torch.empty((), dtype=d).element_size() for n, d in sizes]
    arena = PinnedArena(sum(nbytes), block_bytes=64 << 20, pin=False)
    for numel, dtype in sizes:
        arena.empty(numel, dtype)
    assert arena.handed_out == sum(nbytes)
    assert arena.reserved <= 1.05 * sum(nbytes), (arena.reserved, sum(nbytes))
    assert sum(pow2_ceil(b) for b in nbytes) > 1.2 * sum(nbytes)  # what the test guards against


def test_a_request_larger_than_a_block_gets_its_own_and_zeros_are_zero():
    arena = PinnedArena(0, block_bytes=1 << 20, pin=False)
    big = arena.zeros(3 << 20, torch.uint8)
    assert big.numel() == 3 << 20 and torch.all(big == 0)
    assert arena.blocks[-1].numel() == 4 << 20
    small = arena.empty(1000, torch.float32)  # fits in the big block's tail
    assert len(arena.blocks) == 1 and small.data_ptr() >= big.data_ptr() + big.numel()
    assert arena.empty(0, torch.float32).numel() == 0


def test_block_bytes_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        PinnedArena(block_bytes=3 << 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_slices_of_pinned_blocks_are_pinned_and_copy_asynchronously():
    arena = PinnedArena(8 << 20, block_bytes=4 << 20)
    host = [arena.empty(n, torch.float32) for n in (1000, 300_000, 777)]
    for i, h in enumerate(host):
        assert h.is_pinned()
        h.copy_(torch.arange(h.numel(), dtype=torch.float32) + i)
    device = [h.to("cuda", non_blocking=True) for h in host]
    back = [arena.empty(h.numel(), torch.float32) for h in host]
    for b, d in zip(back, device):
        b.copy_(d, non_blocking=True)
    torch.cuda.synchronize()
    assert all(torch.equal(b, h) for b, h in zip(back, host))
