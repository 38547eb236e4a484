"""Point-to-point traffic of one pipeline stage with its neighbours during one step: activations with
their headers, gradients, and the threads that wait on them. astrobio.parallel.executor drives it, one
schedule action at a time.

How data moves. An activation goes with a header (dims and dtype), so every micro-batch may have its
own shape; a gradient has the shape of the activation it belongs to and needs none. Posting is
non-blocking: a send or receive is queued where the schedule places it, and the computation that needs
the data waits for it. Consecutive communication actions are posted as one batch (``flush``; on NCCL,
``batch_isend_irecv``); on gloo the sends are posted from the send thread (a gloo send to a posted
receive copies its data inside the call). Headers go over gloo (a side group when the data goes over
NCCL). A sent tensor is kept until its send completes, then dropped (``reap_sends``).

Receiving. The header receive of every activation a stage will get is posted when the step starts; on
gloo the thread that waits for the headers posts each payload's receive the moment its header is in
(gloo sends a payload only once its receive is posted), so the transfer overlaps whatever the stage
computes meanwhile. NCCL matches by order: there the payload's receive is posted when its F needs it.
Receives are waited on by background threads (activations and gradients on separate ones, since a
Work waited on blocks those queued after it) from when they are posted; a computation whose data is
already there does not wait on a thread hop. Every wait goes through the rank's ``FaultGuard`` when
it has one, so it stops when another rank fails.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from astrobio.parallel.faults import FaultGuard, Pending, WorkWaiter

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_DIMS = 6
MESSAGES = ("ACT_HEADER", "ACT", "GRAD")  # the kinds of message per micro-batch, each with its own tag
_side_groups: dict = {}


def message_tag(micro_batch: int, kind: str) -> int:
    return micro_batch * len(MESSAGES) + MESSAGES.index(kind)


def side_gloo_group(group):
    """A gloo group over the same ranks, for headers (small CPU tensors) next to NCCL data. Made on first
    use, which every rank of the world must reach together (``dist.new_group`` is collective over the
    world): for groups of some ranks only, ``make_side_gloo_groups`` first."""
    key = id(group)
    if key not in _side_groups:
        ranks = None if group is None else dist.get_process_group_ranks(group)
        _side_groups[key] = dist.new_group(ranks, backend="gloo")
    return _side_groups[key]


def make_side_gloo_groups(own: dist.ProcessGroup, every: list[list[int]]) -> None:
    """The side gloo groups of several disjoint groups at once (e.g. every replica's pipeline): every
    rank creates all of them, in the order of ``every`` (global ranks), and keeps the one of ``own``."""
    mine = set(dist.get_process_group_ranks(own))
    for ranks in every:
        side = dist.new_group(ranks, backend="gloo")
        if set(ranks) == mine:
            _side_groups[id(own)] = side


def make_header(t: torch.Tensor) -> torch.Tensor:
    if t.dim() > MAX_DIMS or t.dtype not in DTYPES:
        raise ValueError(f"cannot send a {t.dim()}-d {t.dtype} activation; the executor sends up to "
                         f"{MAX_DIMS} dims of {DTYPES}")
    dims = list(t.shape) + [0] * (MAX_DIMS - t.dim())
    return torch.tensor([t.dim(), DTYPES.index(t.dtype)] + dims, dtype=torch.int64)


def read_header(header: torch.Tensor) -> tuple[list[int], torch.dtype]:
    values = header.tolist()
    return values[2:2 + values[0]], DTYPES[values[1]]


@dataclass
class Receive:
    """A receive and its buffer. ``pending`` is None while the receive is queued for the next flush, then
    the Work its waiter thread waits on."""

    buffer: torch.Tensor
    pending: Pending | None = None

    def arrived(self) -> bool:
        return self.pending is not None and self.pending.done.is_set()


@dataclass
class HeaderReceive:
    """The header of a micro-batch's activation, received from ``peer`` (global rank)."""

    peer: int
    header: torch.Tensor
    pending: Pending


class StageTransport:
    """One stage's messages for one step; ``close()`` when the step ends."""

    def __init__(self, group: dist.ProcessGroup | None, guard: FaultGuard | None, device: torch.device,
                 stage: int, num_micro_batches: int):
        self.group, self.guard, self.device = group, guard, device
        self.stage, self.num_micro_batches = stage, num_micro_batches
        self.nccl = dist.get_backend(group) == "nccl"
        self.header_group = side_gloo_group(group) if self.nccl else group
        self.batch: list[tuple[dist.P2POp, Receive | None, WorkWaiter | None]] = []  # posted by flush()
        self.posted_headers: dict[int, HeaderReceive] = {}  # from the step's start to the RECV_ACT
        self.headers: dict[int, HeaderReceive] = {}  # from the RECV_ACT to the F
        self.activations: dict[int, Receive] = {}  # gloo: added by the header thread
        self.gradients: dict[int, Receive] = {}
        self.sends: list[tuple[Pending, torch.Tensor]] = []  # the tensor is kept alive until sent
        self.send_waiter = WorkWaiter(f"stage-{stage}-sends")
        self.activation_waiter = WorkWaiter(f"stage-{stage}-activations")
        self.gradient_waiter = WorkWaiter(f"stage-{stage}-gradients")
        self.header_waiter = WorkWaiter(f"stage-{stage}-headers")

    def peer(self, stage: int) -> int:
        """The global rank of ``stage``."""
        return dist.get_global_rank(self.group, stage) if self.group is not None else stage

    def wait(self, work: dist.Work) -> None:
        if self.guard is not None:
            self.guard.wait(work)
        else:
            work.wait()

    def wait_pending(self, pending: Pending) -> None:
        """Waits for a Work already submitted to a WorkWaiter (a send or a receive)."""
        if self.guard is not None:
            self.guard.wait_pending(pending)
        else:
            pending.done.wait()
            pending.result()

    # activations -----------------------------------------------------------------------------------
    def post_activation_headers(self, from_stage: int) -> None:
        """Posts the header receive of every activation of the step (a header is a few bytes)."""
        peer = self.peer(from_stage)
        for mb in range(self.num_micro_batches):
            header = torch.empty(2 + MAX_DIMS, dtype=torch.int64)
            work = dist.irecv(header, peer, self.header_group, message_tag(mb, "ACT_HEADER"))
            then = None if self.nccl else functools.partial(self._post_payload, mb, peer, header)
            self.posted_headers[mb] = HeaderReceive(peer, header, self.header_waiter.submit(work, then))

    def _post_payload(self, mb: int, peer: int, header: torch.Tensor) -> None:
        """Runs on the header thread (gloo): the activation's receive, posted and handed to its waiter."""
        shape, dtype = read_header(header)
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        work = dist.irecv(buffer, peer, self.group, message_tag(mb, "ACT"))
        self.activations[mb] = Receive(buffer, self.activation_waiter.submit(work))

    def expect_activation(self, mb: int, from_stage: int) -> None:
        """RECV_ACT: the activation's header, posted at the step's start, now belongs to its F."""
        if mb not in self.posted_headers:
            raise RuntimeError(f"stage {self.stage} has no activation {mb} to receive from stage {from_stage}; "
                               "the schedule is broken")
        self.headers[mb] = self.posted_headers.pop(mb)

    def activation_ready(self, mb: int) -> bool:
        """Whether activation ``mb`` is in (without waiting); True when none is expected."""
        if mb not in self.headers:
            return True
        if not self.headers[mb].pending.done.is_set():
            return False
        if self.nccl:
            return True  # its payload is posted by receive_activation, right behind the header
        received = self.activations.get(mb)  # absent if posting failed: receive_activation raises the error
        return received is None or received.arrived()

    def receive_activation(self, mb: int) -> torch.Tensor:
        """Waits for activation ``mb`` (on NCCL, first posts its receive)."""
        if mb not in self.headers:
            raise RuntimeError(f"stage {self.stage} runs F{mb} without a RECV_ACT for it; the schedule is broken")
        header = self.headers.pop(mb)
        self.wait_pending(header.pending)  # on gloo, also the payload's receive posted
        if self.nccl:
            shape, dtype = read_header(header.header)
            buffer = torch.empty(shape, dtype=dtype, device=self.device)
            self.activations[mb] = self._queue(dist.irecv, buffer, header.peer, "ACT", mb)
            self.flush()
        received = self.activations.pop(mb)
        self.wait_pending(received.pending)
        return received.buffer

    def send_activation(self, mb: int, activation: torch.Tensor, to_stage: int) -> None:
        """SEND_ACT: the header goes at once, the payload with the next flush."""
        header = make_header(activation)
        work = dist.isend(header, self.peer(to_stage), self.header_group, message_tag(mb, "ACT_HEADER"))
        self.sends.append((self.send_waiter.submit(work), header))
        self._queue(dist.isend, activation, self.peer(to_stage), "ACT", mb)

    # gradients ---------------------------------------------------------------------------------------
    def send_gradient(self, mb: int, grad: torch.Tensor, to_stage: int) -> None:
        self._queue(dist.isend, grad, self.peer(to_stage), "GRAD", mb)

    def expect_gradient(self, mb: int, shape: torch.Size, dtype: torch.dtype, from_stage: int) -> None:
        """RECV_GRAD: queues the receive of the gradient of the activation sent for ``mb``."""
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        self.gradients[mb] = self._queue(dist.irecv, buffer, self.peer(from_stage), "GRAD", mb)

    def gradient_ready(self, mb: int) -> bool:
        """Whether gradient ``mb`` is in (without waiting); True when none is expected."""
        return mb not in self.gradients or self.gradients[mb].arrived()

    def receive_gradient(self, mb: int) -> torch.Tensor:
        received = self.gradients.pop(mb)
        self.wait_pending(received.pending)
        return received.buffer

    # posting and completion ----------------------------------------------------------------------------
    def _queue(self, op, tensor: torch.Tensor, peer: int, kind: str, mb: int) -> Receive | None:
        """Queues a send or receive for the next flush; a receive is returned, to wait on once posted."""
        p2p = dist.P2POp(op, tensor, peer, self.group, message_tag(mb, kind))
        if op is dist.isend:
            self.batch.append((p2p, None, None))
            return None
        receive = Receive(tensor)
        self.batch.append((p2p, receive, self.activation_waiter if kind == "ACT" else self.gradient_waiter))
        return receive

    def flush(self) -> None:
        """Posts the queued sends and receives: on NCCL as one batch (a send and a receive posted one by
        one in opposite orders would deadlock), on gloo the sends from the send thread (a send copies
        its data in the call) and the receives from here."""
        if self.nccl:
            works = dist.batch_isend_irecv([op for op, _, _ in self.batch]) if self.batch else []
            for (op, receive, waiter), work in zip(self.batch, works):
                if receive is None:
                    self.sends.append((self.send_waiter.submit(work), op.tensor))
                else:
                    receive.pending = waiter.submit(work)  # waited on its own thread from now on
        else:
            for op, receive, waiter in self.batch:
                post = functools.partial(op.op, op.tensor, op.peer, op.group, op.tag)
                if receive is None:
                    self.sends.append((self.send_waiter.post(post), op.tensor))
                else:
                    receive.pending = waiter.submit(post())
        self.batch = []

    def reap_sends(self) -> None:
        """Drops sent tensors as their sends complete, freeing sent outputs."""
        still = []
        for pending, tensor in self.sends:
            if pending.done.is_set():
                self.wait_pending(pending)  # raises if the send failed, naming a failed peer
            else:
                still.append((pending, tensor))
        self.sends = still

    def drain(self) -> None:
        """Posts what is queued and waits for every send: the step's traffic is done."""
        self.flush()
        for pending, _ in self.sends:
            self.wait_pending(pending)

    def close(self) -> None:
        for waiter in (self.send_waiter, self.activation_waiter, self.gradient_waiter, self.header_waiter):
            waiter.close()


def p2p_latency(shape: Sequence[int], dtype: torch.dtype = torch.float32, rounds: int = 10, group=None,
                device: torch.device | str = "cpu") -> float:
    """One-way seconds for an activation of ``shape`` with its header, between ranks 0 and 1 of ``group``
    (a collective for those two: both call it; other ranks return 0)."""
    rank = dist.get_rank(group)
    if rank > 1:
        return 0.0
    peer = dist.get_global_rank(group, 1 - rank) if group is not None else 1 - rank
    payload = torch.zeros(shape, dtype=dtype, device=device)
    header = make_header(payload)
    start = time.perf_counter()
    for _ in range(rounds):
        for sender in (0, 1):
            for t in (header, payload):
                (dist.send if rank == sender else dist.recv)(t, peer, group)
    return (time.perf_counter() - start) / (2 * rounds)
