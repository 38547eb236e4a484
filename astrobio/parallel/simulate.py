"""Replays a schedule with per-action costs: proves it completes, and reports its timeline.

Every stage runs its actions in order. Posting a send or a receive takes no time on the stage (the
transfer runs beside the computation and lands ``comm`` later); a forward waits for its activation,
a backward for its gradient. A schedule deadlocks when some stage waits for data whose send never
happens, or consumes data it never posted a receive for; the error lists each blocked stage's next
action. Sends and receives must also pair up in the same order on every channel, since NCCL matches
point-to-point messages by order.

Bubble fraction: the share of stage-time within the makespan that no computation fills,
``sum_s idle_s / (p * makespan)``; waiting on communication counts as bubble, as it does in the
measured trace (``astrobio.parallel.trace.measured_bubble``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from astrobio.parallel.schedules import Action, Schedule

# what each compute op consumes: (channel kind it receives, offset of the sending stage)
NEEDS = {"F": ("ACT", -1), "B": ("GRAD", +1)}


class DeadlockError(RuntimeError):
    """The schedule cannot finish; ``blocked`` maps each stuck stage to the action it waits at."""

    def __init__(self, message: str, blocked: dict[int, str]):
        super().__init__(message)
        self.blocked = blocked


@dataclass(frozen=True)
class Costs:
    """Seconds (or units) per action, ``b`` for the input-gradient part of a backward and ``w`` for the
    weight part; ``comm`` is the transfer time of one message; ``per_stage`` overrides
    ``{(stage, op): cost}`` and ``per_action`` overrides ``{(stage, op, micro_batch): cost}`` (a
    measured trace replayed action by action)."""

    f: float = 1.0
    b: float = 1.0
    w: float = 1.0
    comm: float = 0.0
    per_stage: dict = field(default_factory=dict)
    per_action: dict = field(default_factory=dict)

    def of(self, stage: int, op: str, split_backward: bool, micro_batch: int | None = None) -> float:
        """A B that is the whole backward (GPipe, 1F1B) costs b + w unless overridden."""
        if (stage, op, micro_batch) in self.per_action:
            return self.per_action[(stage, op, micro_batch)]
        whole = {"F": self.f, "B": self.b if split_backward else self.b + self.w, "W": self.w}
        return self.per_stage.get((stage, op), whole[op])


@dataclass
class SimResult:
    makespan: float
    bubble: float
    idle: list[float]
    peak_in_flight: list[int]
    timeline: list[list[tuple[Action, float, float]]]  # per stage: (compute action, start, end)


def simulate(sched: Schedule, costs: Costs | None = None) -> SimResult:
    """Replays ``sched``; raises DeadlockError (or ValueError for mispaired channels) when it cannot run."""
    costs = costs or Costs()
    check_channels(sched)
    state = _Replay(sched, costs)
    while state.advance():
        pass
    state.raise_if_stuck()
    return state.result()


def check_channels(sched: Schedule) -> None:
    """Each send must meet one receive, in the same order on each (from, to, kind) channel."""
    sends, recvs = defaultdict(list), defaultdict(list)
    for stage, actions in enumerate(sched.actions):
        for a in actions:
            if a.op.startswith("SEND_"):
                sends[(stage, a.peer, a.op[5:])].append(a.micro_batch)
            elif a.op.startswith("RECV_"):
                recvs[(a.peer, stage, a.op[5:])].append(a.micro_batch)
    for channel in sorted(set(sends) | set(recvs)):
        sent, received = sends.get(channel, []), recvs.get(channel, [])
        if sorted(sent) != sorted(received):
            continue  # unmatched messages: the replay reports them as a deadlock with its blocked actions
        if sent != received:
            src, dst, kind = channel
            raise ValueError(f"stage {src} sends {kind} in micro-batch order {sent} but stage {dst} receives "
                             f"in order {received}; post receives in the order of the sends")


class _Replay:
    def __init__(self, sched: Schedule, costs: Costs):
        self.sched, self.costs = sched, costs
        p = sched.num_stages
        self.pos = [0] * p
        self.clock = [0.0] * p
        self.arrival: dict[tuple[str, int, int], float] = {}  # (kind, micro-batch, to stage) -> time
        self.posted: list[set] = [set() for _ in range(p)]  # (kind, micro-batch) receives posted
        self.in_flight = [set() for _ in range(p)]
        self.peak = [0] * p
        self.timeline: list[list] = [[] for _ in range(p)]

    def advance(self) -> bool:
        progressed = False
        for stage in range(self.sched.num_stages):
            while self.pos[stage] < len(self.sched.actions[stage]) and self.step(stage):
                self.pos[stage] += 1
                progressed = True
        return progressed

    def step(self, stage: int) -> bool:
        """Runs the stage's next action if its data is there; False when it must wait."""
        a = self.sched.actions[stage][self.pos[stage]]
        if a.op.startswith("SEND_"):
            self.arrival[(a.op[5:], a.micro_batch, a.peer)] = self.clock[stage] + self.costs.comm
            return True
        if a.op.startswith("RECV_"):
            self.posted[stage].add((a.op[5:], a.micro_batch))
            return True
        ready = self.clock[stage]
        if a.op in NEEDS and self.has_peer(stage, a.op):
            key = (NEEDS[a.op][0], a.micro_batch)
            if key not in self.posted[stage] or key + (stage,) not in self.arrival:
                return False
            ready = max(ready, self.arrival[key + (stage,)])
        end = ready + self.costs.of(stage, a.op, self.sched.split_backward, a.micro_batch)
        self.timeline[stage].append((a, ready, end))
        self.clock[stage] = end
        self.track_memory(stage, a)
        return True

    def has_peer(self, stage: int, op: str) -> bool:
        return 0 <= stage + NEEDS[op][1] < self.sched.num_stages

    def track_memory(self, stage: int, a: Action) -> None:
        releases = "W" if self.sched.split_backward else "B"
        if a.op == "F":
            self.in_flight[stage].add(a.micro_batch)
            self.peak[stage] = max(self.peak[stage], len(self.in_flight[stage]))
        elif a.op == releases:
            self.in_flight[stage].discard(a.micro_batch)

    def raise_if_stuck(self) -> None:
        blocked = {}
        for stage, actions in enumerate(self.sched.actions):
            if self.pos[stage] < len(actions):
                blocked[stage] = self.why_blocked(stage, actions[self.pos[stage]])
        unreceived = [f"stage {to} never receives {kind} {mb} sent to it"
                      for (kind, mb, to) in self.arrival if (kind, mb) not in self.posted[to]]
        if blocked or unreceived:
            lines = [f"stage {s}: {why}" for s, why in blocked.items()] + unreceived
            raise DeadlockError(f"{self.sched.kind} schedule deadlocks:\n  " + "\n  ".join(lines), blocked)

    def why_blocked(self, stage: int, a: Action) -> str:
        kind, offset = NEEDS[a.op]
        if (kind, a.micro_batch) not in self.posted[stage]:
            return f"{a} consumes {kind} {a.micro_batch} but posts no RECV_{kind} for it"
        return f"{a} waits for {kind} {a.micro_batch}, which stage {stage + offset} never sends"

    def result(self) -> SimResult:
        makespan = max(self.clock)
        busy = [sum(end - start for _, start, end in rows) for rows in self.timeline]
        idle = [makespan - b for b in busy]
        bubble = sum(idle) / (len(idle) * makespan) if makespan > 0 else 0.0
        return SimResult(makespan, bubble, idle, self.peak, self.timeline)
