"""The offload engine's two accumulation locations, the meta-device build and streamed checkpoints on a
CUDA device (skipped without one): side streams, events and pinned buffers are only real there."""

from __future__ import annotations

import pytest
import torch

from astrobio.model import build_model, get_config
from astrobio.model.materialize import build_model_on
from astrobio.optim import OffloadEngine
from astrobio.train.checkpoint import read_tensors, write_tensors
from test_offload import WideCheap

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


def train(location, accum_dtype, steps=4, micro=8):
    torch.manual_seed(0)
    model = WideCheap(width=1 << 18).cuda().bfloat16()
    engine = OffloadEngine(model.parameters(), **HYPER, accum_dtype=accum_dtype, master_weights="bf16-sr",
                           bucket_bytes=1 << 18, module=model, grad_accum_location=location)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        engine.begin_step(micro)
        for _ in range(micro):
            x, y = torch.randn(4, 16, generator=g).cuda(), torch.randn(4, 1, generator=g).cuda()
            loss = torch.nn.functional.mse_loss(model(x.bfloat16()).float(), y)
            loss.backward()
            losses.append(loss.item())
        engine.end_step()
    engine.synchronize()
    state = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for i, s in engine.state_dict()["state"].items()}
    engine.close()
    return losses, [p.detach().clone() for p in model.parameters()], state


@pytest.mark.parametrize("accum_dtype", ["fp32", "bf16"])
def test_device_and_host_accumulation_agree_bit_for_bit_on_cuda(accum_dtype):
    host, device = train("host", accum_dtype), train("device", accum_dtype)
    assert host[0] == device[0]
    assert all(torch.equal(a, b) for a, b in zip(host[1], device[1]))
    for i, entry in host[2].items():
        for key, value in entry.items():
            other = device[2][i][key]
            assert other == value if key == "step" else torch.equal(other, value), f"{key} of parameter {i}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_materialised_on_cuda_equals_the_cpu_build_moved(dtype):
    config = get_config("tiny", vocab_size=259)
    a = build_model_on(config, seed=3, device="cuda", dtype=dtype)
    b = build_model(config, seed=3, device="cuda", dtype=dtype)
    assert all(p.is_cuda and torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_device_tensors_are_written_in_chunks(tmp_path, monkeypatch):
    import astrobio.train.checkpoint as checkpoint
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 1 << 12)
    tensors = {"w": torch.randn(1000, 37, device="cuda").bfloat16(), "v": torch.arange(5000, device="cuda")}
    write_tensors(tmp_path / "t.safetensors", tensors)
    loaded = read_tensors(tmp_path / "t.safetensors")
    assert all(torch.equal(loaded[k], v.cpu()) for k, v in tensors.items())
