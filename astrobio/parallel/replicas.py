"""Data parallel over pipeline replicas: the ranks' layout, and the gradients' average over replicas.

Layout. A job of ``replicas x stages`` ranks is a 2-D mesh ("dp", "pp"), stages innermost: rank
``r`` is stage ``r % stages`` of replica ``r // stages``. The ranks of one replica (consecutive
ranks: ``--nproc-per-node`` a multiple of the stages keeps a pipeline on one machine) form a "pp"
group, over which activations and gradients go stage to stage; the ranks of one stage (one in every
replica) form a "dp" group, over which its gradients are averaged. ``Layout`` is that arithmetic, for
names in messages before any group exists; ``mesh`` builds the groups
(``torch.distributed.device_mesh.init_device_mesh``).

Gradients. ``GradientReducer`` averages a stage's gradients over its replicas while backward still
runs: the parameters are cut into buckets (in reverse order, as backward produces them), a
post-accumulate-grad hook counts each parameter's micro-batches, and a bucket whose every gradient has
had the step's last micro-batch goes into one asynchronous all-reduce at once. ``finish`` (before the
optimizer reads the gradients) waits for them and divides the sums by the replicas. Buckets are reduced
in their fixed order on every replica (a ready bucket waits for the ones before it), so the replicas
issue the same collectives in the same order whatever order their hooks fire in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

BUCKET_BYTES = 25 << 20  # as torch's DistributedDataParallel: few enough collectives, early enough overlap
MESH_DIMS = ("dp", "pp")


@dataclass(frozen=True)
class Layout:
    """Where each rank of a ``replicas x stages`` job sits (stages innermost)."""

    replicas: int
    stages: int

    @property
    def world_size(self) -> int:
        return self.replicas * self.stages

    def stage_of(self, rank: int) -> int:
        return rank % self.stages

    def replica_of(self, rank: int) -> int:
        return rank // self.stages

    def pipeline_ranks(self, replica: int) -> list[int]:
        """The global ranks of ``replica``'s stages, in stage order."""
        return list(range(replica * self.stages, (replica + 1) * self.stages))

    def name(self, rank: int) -> str:
        """How messages name ``rank``: its stage alone in a job of one pipeline, else replica and stage."""
        if self.replicas == 1 or rank < 0:
            return f"stage {rank} (rank {rank})"
        return f"rank {rank} (replica {self.replica_of(rank)}, stage {self.stage_of(rank)})"


def mesh(layout: Layout, device_type: str):
    """The job's ("dp", "pp") DeviceMesh; every rank calls it (the process group must be up)."""
    from torch.distributed.device_mesh import init_device_mesh
    if dist.get_world_size() != layout.world_size:
        raise ValueError(f"the job has {dist.get_world_size()} ranks but {layout.replicas} replicas x "
                         f"{layout.stages} stages need {layout.world_size}")
    return init_device_mesh(device_type, (layout.replicas, layout.stages), mesh_dim_names=MESH_DIMS)


def buckets_of(params: Sequence[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """``params`` in reverse order, cut into runs of one dtype and at most ``bucket_bytes`` (a larger
    parameter is a bucket of its own)."""
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if not buckets or size + nbytes > bucket_bytes or buckets[-1][0].dtype != p.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


class GradientReducer:
    """Averages ``params``' gradients over the ranks of ``group`` (this stage's replicas) per bucket,
    overlapped with backward; see the module docstring. ``wait(work)`` waits for a collective (the
    rank's FaultGuard, so a failed replica stops this one)."""

    def __init__(self, params: Sequence[nn.Parameter], group: dist.ProcessGroup, wait: Callable[[dist.Work], None],
                 bucket_bytes: int = BUCKET_BYTES):
        self.group, self.wait = group, wait
        self.replicas = dist.get_world_size(group)
        self.buckets = buckets_of([p for p in params if p.requires_grad], bucket_bytes)
        self.bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        self.names = {id(p): f"bucket {b} parameter {i} {tuple(p.shape)}"
                      for b, bucket in enumerate(self.buckets) for i, p in enumerate(bucket)}
        self.hooks = [p.register_post_accumulate_grad_hook(self.on_gradient) for bucket in self.buckets for p in bucket]
        self.begin_step(1)

    def begin_step(self, num_micro_batches: int) -> None:
        """Before the step's backward passes: each parameter's gradient is final after this many."""
        self.expected = num_micro_batches
        self.counts = {id(p): 0 for bucket in self.buckets for p in bucket}
        self.final = [0] * len(self.buckets)  # parameters of each bucket whose gradient is final
        self.launched: list[tuple[list[nn.Parameter], torch.Tensor, dist.Work]] = []

    def on_gradient(self, p: nn.Parameter) -> None:
        key = id(p)
        self.counts[key] += 1
        if self.counts[key] > self.expected:
            raise RuntimeError(f"{self.names[key]} got {self.counts[key]} gradients in a step of {self.expected} "
                               f"micro-batches; its bucket was already reduced across replicas")
        if self.counts[key] == self.expected:
            self.final[self.bucket_of[key]] += 1
            self.launch_ready()

    def launch_ready(self) -> None:
        """Starts the all-reduce of every bucket, in order, whose gradients are all final."""
        while len(self.launched) < len(self.buckets):
            b = len(self.launched)
            if self.final[b] < len(self.buckets[b]):
                return
            self.launch(b)

    def launch(self, b: int) -> None:
        # NOTE: a parameter without a gradient (unused this step) counts as zeros: every replica must
        # send the same bucket layout, and another replica's data may have used it. After the gradients,
        # one count per parameter of the replicas that had one: a parameter no replica used keeps no
        # gradient, as in one process (an optimizer then skips it: no decay, no moment update)
        bucket = self.buckets[b]
        had = torch.tensor([float(p.grad is not None) for p in bucket], dtype=bucket[0].dtype,
                           device=bucket[0].device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket]
                         + [had])
        self.launched.append((bucket, flat, dist.all_reduce(flat, group=self.group, async_op=True)))

    def finish(self) -> None:
        """After the step's backward passes: every gradient holds its mean over the replicas."""
        while len(self.launched) < len(self.buckets):  # buckets with a parameter that saw fewer micro-batches
            self.launch(len(self.launched))
        for bucket, flat, work in self.launched:
            self.wait(work)
            grads, had = flat[:-len(bucket)], flat[-len(bucket):].tolist()
            grads.div_(self.replicas)
            offset = 0
            for p, users in zip(bucket, had):
                reduced = grads[offset:offset + p.numel()].view_as(p)
                if users == 0:
                    p.grad = None  # no replica used it
                elif p.grad is None:
                    p.grad = reduced.clone()
                else:
                    p.grad.copy_(reduced)
                offset += p.numel()
        self.launched = []

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
