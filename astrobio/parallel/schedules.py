"""Pipeline schedules as data: for each stage (one rank), the ordered list of actions it runs.

An action is a computation (``F`` forward, ``B`` backward, ``W`` weight gradient) or a communication
(``SEND_ACT``/``RECV_ACT`` of a stage's output activation, ``SEND_GRAD``/``RECV_GRAD`` of the gradient
of that activation), always for one micro-batch. Communication is explicit and non-blocking: a send
or receive is *posted* where it stands in the list, and the computation that needs received data
(``F`` its activation, ``B`` its gradient) waits for it. Sends never wait.

What ``B`` means depends on the kind (``Schedule.split_backward``):

- ``gpipe`` and ``1f1b``: ``B`` is the whole backward (input and weight gradients); there is no ``W``.
- ``zb-h1``: ``B`` computes only the gradient of the stage input (what the previous stage waits for),
  ``W`` the weight gradients, later, in what would otherwise be bubble (Qi et al. 2023, "Zero Bubble
  Pipeline Parallelism"). Stage ``s`` defers its ``W`` by ``s`` micro-batches, so at most ``p``
  micro-batches are held on any stage, as many as 1F1B holds on the first.

Cost convention used by the tests and the docs: F = B = W = 1 unit, so a whole backward is 2 units
(B + W). Then GPipe and 1F1B have a bubble of (p-1)/(m+p-1) and ZB-H1 (p-1)(F+B-W) idle units per
stage, about a third of 1F1B's (see ``theoretical_bubble``).
"""

from __future__ import annotations

from dataclasses import dataclass

COMPUTE = ("F", "B", "W")
COMMS = ("SEND_ACT", "RECV_ACT", "SEND_GRAD", "RECV_GRAD")
KINDS = ("gpipe", "1f1b", "zb-h1")


@dataclass(frozen=True)
class Action:
    """One step of one stage. ``peer`` is the other stage of a communication, None for compute."""

    op: str
    micro_batch: int
    peer: int | None = None

    def __post_init__(self):
        if self.op not in COMPUTE + COMMS:
            raise ValueError(f"unknown action {self.op!r}; expected one of {COMPUTE + COMMS}")
        if (self.peer is None) != (self.op in COMPUTE):
            raise ValueError(f"{self.op} needs a peer stage exactly when it is a communication")

    @property
    def is_compute(self) -> bool:
        return self.op in COMPUTE

    def __str__(self) -> str:
        peer = "" if self.peer is None else f"@{self.peer}"
        return f"{self.op}{self.micro_batch}{peer}"


@dataclass(frozen=True)
class Schedule:
    """``actions[s]`` is stage s's ordered list."""

    kind: str
    num_stages: int
    num_micro_batches: int
    split_backward: bool
    actions: tuple[tuple[Action, ...], ...]

    def describe(self, stage: int) -> str:
        return " ".join(str(a) for a in self.actions[stage])


def normalize_kind(kind: str) -> str:
    key = kind.lower().replace("_", "-")
    key = {"zbh1": "zb-h1", "one-f-one-b": "1f1b"}.get(key, key)
    if key not in KINDS:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(KINDS)}")
    return key


def compute_order(kind: str, stage: int, num_stages: int, m: int) -> list[tuple[str, int]]:
    """The (op, micro-batch) computations of one stage, in order."""
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warmup = min(num_stages - 1 - stage, m)
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):  # steady state: one forward, one backward
        order += [("F", warmup + i), ("B", i)]
    order += [("B", i) for i in range(m - warmup, m)]
    if kind == "zb-h1":
        order = insert_weight_passes(order, lag=stage, m=m)
    return order


def insert_weight_passes(order: list[tuple[str, int]], lag: int, m: int) -> list[tuple[str, int]]:
    """Puts W(j) right after B(j + lag); the last ``lag`` W's close the stage's list."""
    out = []
    for op, i in order:
        out.append((op, i))
        if op == "B" and i - lag >= 0:
            out.append(("W", i - lag))
    out += [("W", j) for j in range(max(m - lag, 0), m)]
    return out


def with_communication(order: list[tuple[str, int]], stage: int, num_stages: int) -> list[Action]:
    """Adds the sends and receives around each computation.

    A stage sends its output right after the forward (its input gradient right after the backward)
    and posts the receive for its next forward or backward at once, before any W in between: a
    receive costs nothing to post, and pairing each send with the next receive lets the executor
    issue them as one batch (on NCCL, a send and a receive issued one by one in opposite orders on
    the two stages deadlock)."""
    first, last = stage == 0, stage == num_stages - 1
    needs = {("F", i): Action("RECV_ACT", i, stage - 1) for op, i in order if op == "F" and not first}
    needs.update({("B", i): Action("RECV_GRAD", i, stage + 1) for op, i in order if op == "B" and not last})
    actions: list[Action] = []
    posted: set = set()

    def post_next_receive(after: int) -> None:
        upcoming = next((c for c in order[after:] if c[0] != "W"), None)
        if upcoming in needs and upcoming not in posted:
            posted.add(upcoming)
            actions.append(needs[upcoming])

    post_next_receive(0)
    for k, (op, i) in enumerate(order):
        post_next_receive(k)
        actions.append(Action(op, i))
        if op == "F" and not last:
            actions.append(Action("SEND_ACT", i, stage + 1))
        if op == "B" and not first:
            actions.append(Action("SEND_GRAD", i, stage - 1))
        post_next_receive(k + 1)
    return actions


def schedule(kind: str, stages: int, micro_batches: int) -> Schedule:
    """Every stage's actions for one optimizer step of ``micro_batches`` micro-batches."""
    kind = normalize_kind(kind)
    if stages < 1:
        raise ValueError(f"a pipeline needs at least 1 stage, got {stages}")
    if micro_batches < 1:
        raise ValueError(f"a step needs at least 1 micro-batch, got {micro_batches}")
    actions = tuple(tuple(with_communication(compute_order(kind, s, stages, micro_batches), s, stages))
                    for s in range(stages))
    return Schedule(kind, stages, micro_batches, kind == "zb-h1", actions)


def theoretical_bubble(kind: str, stages: int, micro_batches: int, f: float = 1.0, b: float = 1.0,
                       w: float = 1.0) -> float:
    """Idle fraction of the step with zero communication cost; b + w is a whole backward.

    GPipe and 1F1B idle (p-1)(f+b+w) per stage; ZB-H1 (p-1)(f+b-w) (Qi et al. 2023, section 3)."""
    kind = normalize_kind(kind)
    p, m = stages, micro_batches
    idle = (p - 1) * (f + b - w if kind == "zb-h1" else f + b + w)
    return idle / (m * (f + b + w) + idle)
