"""Pipeline schedules as data: one ordered list of actions per rank.

A runtime interprets these lists and ``simulator`` replays them; a new schedule is a
new list, never a new runtime (docs/ARCHITECTURE.md, "Schedules"). Stage ``s`` lives on
rank ``s % n_ranks`` (looped placement, as in torch.distributed.pipelining's
interleaved schedules), so each rank holds ``v = n_stages // n_ranks`` stages.

>>> s = build_schedule("1f1b", n_ranks=2, n_microbatches=2)
>>> [str(a) for a in s.actions[1]]
['1RECV_F0', '1F0', '1B0', '1SEND_B0', '1RECV_F1', '1F1', '1B1', '1SEND_B1']
>>> Schedule.from_text(s.to_text()) == s
True
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from partitioner.cost_models.errors import PartitionError

__all__ = ["SCHEDULES", "SCHEDULE_NAMES", "Action", "Schedule", "ScheduleError", "ScheduleSpec", "build_schedule",
           "check_counts", "default_microbatches", "replay", "split_problem"]

COMPUTE_KINDS = ("F", "B", "I", "W")  # B = full backward; I + W = the same, split
COMM_KINDS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
_ACTION_RE = re.compile(r"(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)")
_ACTION_FORM = "<stage><kind><microbatch>, e.g. '2F0' or '1SEND_F3', kind one of " + ", ".join(
    COMPUTE_KINDS + COMM_KINDS
)


class ScheduleError(PartitionError):
    """A schedule's text, counts or action lists break a rule."""


PLACEMENTS = ("loop", "v")


def rank_of(stage: int, n_ranks: int, placement: str = "loop") -> int:
    """The rank that runs ``stage`` under ``placement`` (see ``Schedule.placement``)."""
    if placement == "v":
        return stage if stage < n_ranks else 2 * n_ranks - 1 - stage
    return stage % n_ranks


class Action(NamedTuple):
    """One step of one rank. SEND/RECV name the stage on *this* side of the link."""

    stage: int
    kind: str
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        m = _ACTION_RE.fullmatch(text)
        if m is None:
            raise ScheduleError(f"bad action text {text!r}: expected {_ACTION_FORM}")
        return cls(int(m[1]), m[2], int(m[3]))

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS


@dataclass(frozen=True)
class Schedule:
    name: str  # a builder's name, or any word for hand-written lists
    n_ranks: int
    n_stages: int  # a multiple of n_ranks; stage s runs on rank s % n_ranks
    n_microbatches: int
    actions: tuple[tuple[Action, ...], ...]  # per rank, in execution order, comms included
    #: "loop": stage s on rank s % n_ranks; "v" (two stages per rank): stage s on rank s
    #: for s < n_ranks, else on rank 2 * n_ranks - 1 - s (rank 0 holds the first and last stage)
    placement: str = "loop"

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ScheduleError(f"schedule name {self.name!r} must be one non-empty word")
        if min(self.n_ranks, self.n_stages, self.n_microbatches) < 1:
            raise ScheduleError(
                f"counts must be >= 1: ranks={self.n_ranks} stages={self.n_stages} microbatches={self.n_microbatches}"
            )
        if self.n_stages % self.n_ranks:
            raise ScheduleError(f"n_stages must be a multiple of n_ranks ({self.n_stages} % {self.n_ranks} != 0)")
        if self.placement not in PLACEMENTS:
            raise ScheduleError(f"placement {self.placement!r} must be one of {', '.join(PLACEMENTS)}")
        if self.placement == "v" and self.n_stages != 2 * self.n_ranks:
            raise ScheduleError(f"placement 'v' needs n_stages == 2 * n_ranks ({self.n_stages} != {2 * self.n_ranks})")
        if len(self.actions) != self.n_ranks:
            raise ScheduleError(f"need one action list per rank ({len(self.actions)} != {self.n_ranks})")
        # Lists and plain tuples are accepted so hand-written schedules stay short to write.
        acts = tuple(tuple(Action(*a) for a in rank) for rank in self.actions)
        object.__setattr__(self, "actions", acts)

    def rank_of(self, stage: int) -> int:
        return rank_of(stage, self.n_ranks, self.placement)

    def to_text(self) -> str:
        head = f"schedule {self.name} ranks={self.n_ranks} stages={self.n_stages} microbatches={self.n_microbatches}"
        if self.placement != "loop":
            head += f" placement={self.placement}"
        rows = [" ".join([f"rank {r}:", *map(str, acts)]) for r, acts in enumerate(self.actions)]
        return "\n".join([head, *rows]) + "\n"

    @classmethod
    def from_text(cls, text: str) -> Schedule:
        # '#' comments and blank lines let golden files and bug reports carry notes.
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        head = re.fullmatch(r"schedule (\S+) ranks=(\d+) stages=(\d+) microbatches=(\d+)(?: placement=(\w+))?",
                            lines[0]) if lines else None
        if head is None:
            raise ScheduleError("schedule text must start with 'schedule <name> ranks=<p> stages=<s> microbatches=<m>'")
        actions = []
        for r, line in enumerate(lines[1:]):
            label, _, rest = line.partition(":")
            if label != f"rank {r}":
                raise ScheduleError(f"expected line 'rank {r}: <actions>', got {line!r}")
            actions.append(tuple(Action.parse(t) for t in rest.split()))
        return cls(head[1], int(head[2]), int(head[3]), int(head[4]), tuple(actions), head[5] or "loop")

    def grid(self, mark: tuple[int, int] | None = None, *, comms: bool = False) -> str:
        """Steps x ranks, like torch.distributed.pipelining's ``_format_pipeline_order``.

        Rows are positions in each rank's list, not times (the simulator gives times).
        ``mark=(rank, step)`` brackets that cell, ``step`` indexing the full list; in a
        compute-only grid a marked SEND/RECV lands on the rank's next compute.
        """
        cols = [[(i, a) for i, a in enumerate(acts) if comms or a.is_compute] for acts in self.actions]
        n_rows = max(map(len, cols), default=0)
        cells = [[str(a) for _, a in col] + [""] * (n_rows - len(col)) for col in cols]
        mark_row = None
        if mark is not None:
            r, step = mark
            mark_row = next((j for j, (i, _) in enumerate(cols[r]) if i >= step), None)
            if mark_row is not None:
                cells[r][mark_row] = f"[{cells[r][mark_row]}]"
        width = [max([len(f"Rank {r}"), *map(len, col)]) for r, col in enumerate(cells)]
        digits = len(str(max(n_rows - 1, 0)))
        label = " " * (len("Step ") + digits + 2)
        out = [(label + " ".join(f"{f'Rank {r}':<{w}}" for r, w in enumerate(width))).rstrip()]
        for j in range(n_rows):
            row = f"Step {j:0{digits}d}: " + " ".join(f"{cells[r][j]:<{w}}" for r, w in enumerate(width))
            out.append(row.rstrip() + (f"  <-- rank {mark[0]}" if mark and j == mark_row else ""))
        return "\n".join(out)

    def validate(self) -> None:
        """Raise ScheduleError if the lists would deadlock, use data before it arrives,
        or miss / repeat a forward or backward; then lower their communication
        (``partitioner.comms.lower``: groups that cannot deadlock under NCCL's rules for any
        lists this replay accepts), which raises if a message has no receive."""
        replay(self)
        # comms imports this module (Action, Schedule): imported here to keep that one-way.
        from partitioner.comms import lower  # noqa: PLC0415 - import cycle (comms imports this module's Action and Schedule)

        lower(self)


# --- message-passing replay, shared by validate() and the simulator -----------------


def _message(a: Action) -> tuple[str, int, int]:
    """The link message a SEND posts or a RECV takes: (direction, sending stage, mb)."""
    return {
        "SEND_F": ("F", a.stage, a.microbatch),
        "RECV_F": ("F", a.stage - 1, a.microbatch),
        "SEND_B": ("B", a.stage, a.microbatch),
        "RECV_B": ("B", a.stage + 1, a.microbatch),
    }[a.kind]


def _static_error(s: Schedule, r: int, a: Action) -> str | None:
    if a.kind not in COMPUTE_KINDS + COMM_KINDS:
        return f"unknown kind {a.kind!r}: expected {_ACTION_FORM}"
    if not (0 <= a.stage < s.n_stages and 0 <= a.microbatch < s.n_microbatches):
        return f"stage must be in [0, {s.n_stages}) and micro-batch in [0, {s.n_microbatches})"
    if s.rank_of(a.stage) != r:
        return f"stage {a.stage} lives on rank {s.rank_of(a.stage)} (stage % n_ranks), not rank {r}"
    if a.kind in COMM_KINDS:
        peer = a.stage + (1 if a.kind in ("SEND_F", "RECV_B") else -1)
        if not 0 <= peer < s.n_stages:
            return f"stage {a.stage} has no neighbour stage {peer} to talk to"
        if s.rank_of(peer) == r:
            return f"stages {a.stage} and {peer} share rank {r}; no message is needed"
    return None


def _inputs_error(
    s: Schedule, r: int, a: Action, done: set[tuple[int, str, int]], got: set[tuple[str, int, int]]
) -> str | None:
    st, k, mb = a
    bwd = {(st, "B", mb), (st, "I", mb)} & done
    if k == "F" and st > 0:
        if s.rank_of(st - 1) == r:
            if (st - 1, "F", mb) not in done:
                return f"needs forward {st - 1}F{mb} first (same rank)"
        elif ("F", st - 1, mb) not in got:
            return f"uses micro-batch {mb} before it arrives: no {st}RECV_F{mb} earlier on rank {r}"
    if k in ("B", "I", "SEND_F") and (st, "F", mb) not in done:
        return f"needs forward {st}F{mb} to have run first"
    if k in ("B", "I") and bwd:
        return f"micro-batch {mb} of stage {st} already ran its backward"
    if k in ("B", "I") and st < s.n_stages - 1:
        if s.rank_of(st + 1) == r:
            if not {(st + 1, "B", mb), (st + 1, "I", mb)} & done:
                return f"needs backward of stage {st + 1} micro-batch {mb} first (same rank)"
        elif ("B", st + 1, mb) not in got:
            return f"needs the gradient from stage {st + 1}: no {st}RECV_B{mb} earlier on rank {r}"
    if k == "W" and (st, "I", mb) not in done:
        return f"weight grad needs input grad {st}I{mb} first"
    if k == "SEND_B" and not bwd:
        return f"sends a gradient not yet computed: no {st}B{mb} or {st}I{mb} earlier"
    return None


def replay(s: Schedule, visit: Callable[[int, int, Action], None] | None = None) -> None:
    """Run the lists with buffered sends and blocking receives, calling ``visit(rank,
    step, action)`` in an order that respects every dependency; raise on any fault."""

    def fail(r: int, i: int, why: str) -> ScheduleError:
        return ScheduleError(
            f"schedule {s.name!r}: rank {r}, step {i}, action {s.actions[r][i]}: {why}\n"
            + s.grid(mark=(r, i), comms=True)
        )

    pc = [0] * s.n_ranks
    done: set[tuple[int, str, int]] = set()  # (stage, compute kind, mb)
    in_flight: dict[tuple[str, int, int], tuple[int, int]] = {}  # message -> (rank, step) of SEND
    got: set[tuple[str, int, int]] = set()  # messages received
    progress = True
    while progress:
        progress = False
        for r, acts in enumerate(s.actions):
            while pc[r] < len(acts):
                i = pc[r]
                a = acts[i]
                why = _static_error(s, r, a)
                if why is None and a.kind.startswith("RECV"):
                    msg = _message(a)
                    if msg in got:
                        why = "receives the same message twice"
                    elif msg not in in_flight:
                        break  # blocked: maybe the peer sends later
                    else:
                        del in_flight[msg]
                        got.add(msg)
                elif why is None and a.kind.startswith("SEND"):
                    why = _inputs_error(s, r, a, done, got)
                    if why is None and (_message(a) in in_flight or _message(a) in got):
                        why = "sends the same message twice"
                    in_flight[_message(a)] = (r, i)
                elif why is None:
                    why = _inputs_error(s, r, a, done, got)
                    if why is None and a in done:
                        why = "runs twice"
                    done.add(a)
                if why is not None:
                    raise fail(r, i, why)
                if visit is not None:
                    visit(r, i, a)
                pc[r] += 1
                progress = True
    stuck = [r for r in range(s.n_ranks) if pc[r] < len(s.actions[r])]
    if stuck:
        r, others = stuck[0], ", ".join(f"rank {q} step {pc[q]} ({s.actions[q][pc[q]]})" for q in stuck)
        a = s.actions[r][pc[r]]
        src = a.stage + (1 if a.kind == "RECV_B" else -1)
        send = Action(src, "SEND_" + a.kind[-1], a.microbatch)
        raise fail(
            r,
            pc[r],
            f"waits for {send} from rank {s.rank_of(src)}, which never comes; "
            f"deadlock, every unfinished rank waits: {others}",
        )
    for r, i in in_flight.values():
        raise fail(r, i, "sent but never received")
    missing = [
        f"{st}{k}{mb}"
        for st in range(s.n_stages)
        for mb in range(s.n_microbatches)
        for k in ("F", "B")
        if (st, k, mb) not in done and not (k == "B" and {(st, "I", mb), (st, "W", mb)} <= done)
    ]
    if missing:
        raise ScheduleError(
            f"schedule {s.name!r} never runs {', '.join(missing[:8])}"
            f"{' ...' if len(missing) > 8 else ''}: every stage needs one forward and one "
            f"backward (B, or I then W) per micro-batch\n{s.grid()}"
        )


# --- builders: each returns compute order per rank; _with_comms adds the messages ----


def _gpipe(p: int, m: int, v: int) -> list[list[Action]]:
    """All forwards, then all backwards (Huang et al. 2019, GPipe). p=3, m=4, f=b=1:

    rank 0: 0F0 0F1 0F2 0F3 .   .   .   .   0B0 0B1 0B2 0B3
    rank 1: .   1F0 1F1 1F2 1F3 .   .   1B0 1B1 1B2 1B3 .
    rank 2: .   .   2F0 2F1 2F2 2F3 2B0 2B1 2B2 2B3 .   .
    """
    out = []
    for r in range(p):
        stages = range(r, v * p, p)  # v > 1 is "looped BFS": stage by stage
        fwd = [Action(s, "F", mb) for s in stages for mb in range(m)]
        out.append(fwd + [Action(s, "B", mb) for s in reversed(stages) for mb in range(m)])
    return out


def _one_f_one_b(p: int, m: int) -> list[list[Action]]:
    """PipeDream-Flush / Megatron 1F1B (Narayanan et al. 2021). p=3, m=4, f=b=1:

    rank 0: 0F0 0F1 0F2 .   .   0B0 0F3 0B1 .   0B2 .   0B3
    rank 1: .   1F0 1F1 .   1B0 1F2 1B1 1F3 1B2 .   1B3 .
    rank 2: .   .   2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3 .   .

    Rank r warms up with p-1-r forwards, so stage r holds at most p-r micro-batches.
    """
    out = []
    for r in range(p):
        warm = min(p - 1 - r, m)
        acts = [Action(r, "F", mb) for mb in range(warm)]
        for i in range(m - warm):
            acts += [Action(r, "F", warm + i), Action(r, "B", i)]
        out.append(acts + [Action(r, "B", mb) for mb in range(m - warm, m)])
    return out


def _interleaved(p: int, m: int, v: int) -> list[list[Action]]:
    """Megatron interleaved 1F1B (Narayanan et al. 2021, sec. 2.2). p=2, v=2, m=4, f=b=1:

    rank 0: 0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 .   2B2 .   2B3 0B2 0B3
    rank 1: .   1F0 1F1 3F0 3B0 3F1 3B1 1F2 1B0 1F3 1B1 3F2 3B2 3F3 3B3 1B2 1B3 .

    Work is walked in rounds of p micro-batches per local stage; warm-up is
    (v-1)*p + 2*(p-1-r) forwards, as in Megatron-LM and torch's ScheduleInterleaved1F1B.
    """
    total = m * v

    def mb(k: int) -> int:  # k-th unit of work on a rank -> micro-batch
        return (k // (p * v)) * p + k % p

    def f(r: int, k: int) -> Action:  # round k // p walks local stages upward...
        return Action((k // p) % v * p + r, "F", mb(k))

    def b(r: int, k: int) -> Action:  # ...and backwards walks them downward
        return Action((v - 1 - (k // p) % v) * p + r, "B", mb(k))

    out = []
    for r in range(p):
        warm = min((v - 1) * p + 2 * (p - 1 - r), total)
        acts = [f(r, k) for k in range(warm)]
        for i in range(total - warm):
            acts += [f(r, warm + i), b(r, i)]
        out.append(acts + [b(r, k) for k in range(total - warm, total)])
    return out


def _zero_bubble(p: int, m: int, v: int, placement: str) -> list[list[Action]]:
    """Zero-bubble orders (Qi et al. 2023): backward split into I (input gradient, on the
    critical path) and W (weight gradient, deferred into what would be bubbles).

    Built by list scheduling in unit time (F = I = W = 1, free links), as the paper's
    handcrafted ZB-H1 / ZB-V are: a free rank runs the ready I of the oldest micro-batch
    (nearest the loss first), else a ready F, else its oldest pending W. New micro-batches
    enter a rank's first local stage only while fewer than ``limit`` of its forwards await
    their W, which bounds activation memory as 1F1B does: ``p - r`` micro-batches on rank
    r for zb-h1 (1F1B's figure), ``2p`` half-size chunks per rank for zbv (one rank's
    1F1B peak, p full chunks). p=2, m=4, v=1 (zb-h1):

    rank 0: 0F0 0F1 .   0I0 0F2 0I1 0F3 0I2 0W0 0I3 0W1 0W2 0W3
    rank 1: .   1F0 1I0 1F1 1I1 1W0 1F2 1I2 1W1 1F3 1I3 1W2 1W3
    """
    n = p * v
    where = [rank_of(s, p, placement) for s in range(n)]
    local = [[s for s in range(n) if where[s] == r] for r in range(p)]
    limit = [2 * p if placement == "v" else p] * p
    done: dict[tuple[int, str, int], int] = {}  # (stage, kind, mb) -> finishing time
    nxt = {(s, k): 0 for s in range(n) for k in "FIW"}
    out: list[list[Action]] = [[] for _ in range(p)]
    waiting = [0] * p  # forwards on the rank whose W has not run
    busy_until = [0] * p
    t, total = 0, 3 * n * m
    while sum(len(o) for o in out) < total:
        for r in range(p):
            if busy_until[r] > t:
                continue

            def ready(s: int, k: str) -> bool:
                mb = nxt[(s, k)]
                if mb >= m:
                    return False
                if k == "F":
                    return s == 0 or done.get((s - 1, "F", mb), t + 1) <= t
                if k == "I":
                    return done.get((s, "F", mb), t + 1) <= t and (
                        s == n - 1 or done.get((s + 1, "I", mb), t + 1) <= t)
                return done.get((s, "I", mb), t + 1) <= t

            pick = None
            ready_i = [s for s in local[r] if ready(s, "I")]
            if ready_i:
                pick = (min(ready_i, key=lambda s: (nxt[(s, "I")], -s)), "I")
            else:
                ready_f = [s for s in local[r] if ready(s, "F") and (s != local[r][0] or waiting[r] < limit[r])]
                if ready_f:
                    pick = (max(ready_f), "F")
                else:
                    ready_w = [s for s in local[r] if ready(s, "W")]
                    if ready_w:
                        pick = (min(ready_w, key=lambda s: (nxt[(s, "W")], -s)), "W")
            if pick is None:
                continue
            s, k = pick
            mb = nxt[(s, k)]
            nxt[(s, k)] += 1
            done[(s, k, mb)] = t + 1
            busy_until[r] = t + 1
            waiting[r] += {"F": 1, "I": 0, "W": -1}[k]
            out[r].append(Action(s, k, mb))
        t += 1
        if t > 10 * total + 10:  # cannot happen for these builders; never loop forever
            raise ScheduleError(f"zero-bubble builder made no progress (p={p}, m={m}, v={v})")
    return out


def _with_comms(p: int, n_stages: int, compute: list[list[Action]],
                placement: str = "loop") -> tuple[tuple[Action, ...], ...]:
    """Post each SEND right after the compute that made the value and each RECV right
    before the compute that needs it, as a runtime with async sends would."""
    out = []
    for r, acts in enumerate(compute):
        full: list[Action] = []
        for a in acts:
            st, mb = a.stage, a.microbatch
            prev_remote = st > 0 and rank_of(st - 1, p, placement) != r
            next_remote = st < n_stages - 1 and rank_of(st + 1, p, placement) != r
            fwd = a.kind == "F"
            bwd = a.kind in ("B", "I")
            if (fwd and prev_remote) or (bwd and next_remote):
                full.append(Action(st, "RECV_F" if fwd else "RECV_B", mb))
            full.append(a)
            if (fwd and next_remote) or (bwd and prev_remote):
                full.append(Action(st, "SEND_F" if fwd else "SEND_B", mb))
        out.append(tuple(full))
    return tuple(out)


# --- the registry: one entry per schedule -----------------------------------------


@dataclass(frozen=True)
class ScheduleSpec:
    """Everything the library knows about a named schedule: the API, the CLI's help and
    choices, the plan schema (tests/partitioner/test_schedule.py checks it) and the
    PyTorch interop read it from here. Adding a schedule = one entry + its tests."""

    name: str
    build: Callable[[int, int, int], list[list[Action]]]  # (n_ranks, n_microbatches, v) -> compute per rank
    help: str  # one line for --help
    stages_per_rank: tuple[int, ...] | None = None  # allowed v = n_stages // n_ranks; None: any
    default_stages_per_rank: int = 1
    placement: str = "loop"
    microbatches_multiple_of_ranks: bool = False
    whole_batch: bool = False  # the batch runs unsplit (n_microbatches forced to 1)
    split_backward: bool = False  # uses I/W actions
    pytorch: str | None = None  # torch.distributed.pipelining class that runs it


SCHEDULES: dict[str, ScheduleSpec] = {
    "gpipe": ScheduleSpec("gpipe", _gpipe, "all forwards, then all backwards (GPipe)", pytorch="ScheduleGPipe"),
    "1f1b": ScheduleSpec("1f1b", lambda p, m, v: _one_f_one_b(p, m),
                         "one forward, one backward (PipeDream-Flush); memory bounded by the stage count",
                         stages_per_rank=(1,), pytorch="Schedule1F1B"),
    "interleaved-1f1b": ScheduleSpec("interleaved-1f1b", _interleaved,
                                     "1F1B over V stages per rank (Megatron); needs micro-batches a multiple of ranks",
                                     default_stages_per_rank=2, microbatches_multiple_of_ranks=True,
                                     pytorch="ScheduleInterleaved1F1B"),
    "zb-h1": ScheduleSpec("zb-h1", lambda p, m, v: _zero_bubble(p, m, v, "loop"),
                          "zero bubble ZB-H1: backward split into input and weight gradients, weights deferred "
                          "into the bubbles; at most p micro-batches in flight per rank (1F1B's rank 0)", stages_per_rank=(1,), split_backward=True,
                          pytorch="ScheduleInterleavedZeroBubble"),
    "zbv": ScheduleSpec("zbv", lambda p, m, v: _zero_bubble(p, m, v, "v"),
                        "zero bubble ZB-V: two stages per rank in a V (rank 0 holds the first and last), split "
                        "backward", stages_per_rank=(2,), default_stages_per_rank=2, placement="v",
                        split_backward=True, pytorch="ScheduleZBVZeroBubble"),
    "naive": ScheduleSpec("naive", _gpipe, "no pipelining: the whole batch through one stage at a time",
                          whole_batch=True),
}
SCHEDULE_NAMES = tuple(SCHEDULES)


def _spec_of(name: str) -> ScheduleSpec:
    spec = SCHEDULES.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ScheduleError(f"unknown schedule {name!r}: expected one of {', '.join(SCHEDULE_NAMES)}")
    return spec


def split_problem(batch: int, parts: int, what: str = "micro-batches", option: str = "n_microbatches") -> str | None:
    """Why ``batch`` samples do not split into ``parts`` equal ``what`` (None if they do): the
    one divisibility rule, worded once, for the planner and the runtime to raise as their own
    error (micro-batches per step; data-parallel replicas)."""
    if batch % parts == 0:
        return None
    return (f"the batch of {batch} samples does not split into {parts} {what}; choose {option} among "
            f"{[d for d in range(1, batch + 1) if batch % d == 0]}")


def check_counts(name: str, n_ranks: int, n_microbatches: int, n_stages: int) -> None:
    """Raise ScheduleError unless schedule ``name`` can run these counts."""
    spec = _spec_of(name)
    for what, n in (("n_ranks", n_ranks), ("n_microbatches", n_microbatches), ("n_stages", n_stages)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ScheduleError(f"{what} must be an int >= 1, got {n!r}")
    if n_stages % n_ranks:
        raise ScheduleError(
            f"n_stages must be a multiple of n_ranks ({n_stages} % {n_ranks} != 0): stage s runs on rank s % n_ranks"
        )
    p, m, v = n_ranks, n_microbatches, n_stages // n_ranks
    if spec.stages_per_rank is not None and v not in spec.stages_per_rank:
        k = spec.stages_per_rank[0]
        hint = {"1f1b": "; use 'interleaved-1f1b' for {v} stages per rank",
                "zb-h1": "; use 'zbv' for 2 stages per rank"}.get(name, "")
        raise ScheduleError(f"{name} needs n_stages == {'' if k == 1 else f'{k} * '}n_ranks "
                            f"({n_stages} != {k * p})" + hint.format(v=v))
    if spec.microbatches_multiple_of_ranks and m % p and not spec.whole_batch:
        raise ScheduleError(
            f"{name} needs n_microbatches to be a multiple of n_ranks "
            f"({m} % {p} != 0): try n_microbatches={(m // p + 1) * p}"
        )


def default_microbatches(name: str, batch: int | None, n_ranks: int) -> int:
    """The default micro-batch count: the largest divisor of ``batch`` up to 2 per rank
    (a multiple of the ranks where the schedule needs one); 1 without a batch."""
    spec = _spec_of(name)
    if spec.whole_batch or batch is None:
        return 1
    divisors = [d for d in range(1, batch + 1) if batch % d == 0 and d <= 2 * n_ranks]
    if spec.microbatches_multiple_of_ranks:
        divisors = [d for d in divisors if d % n_ranks == 0] or [n_ranks]
    return max(divisors)


def build_schedule(name: str, n_ranks: int, n_microbatches: int, n_stages: int | None = None) -> Schedule:
    """Build a named schedule (``SCHEDULES``) with its SEND/RECV actions.

    ``n_stages`` defaults to the entry's stages per rank times ``n_ranks`` (2 for
    "interleaved-1f1b" and "zbv"). "naive" is plain model parallelism for comparison:
    the batch is not split, so ``n_microbatches`` is forced to 1.
    """
    spec = _spec_of(name)
    if spec.whole_batch:
        n_microbatches = 1
    if n_stages is None:
        n_stages = spec.default_stages_per_rank * n_ranks if isinstance(n_ranks, int) else n_ranks
    check_counts(name, n_ranks, n_microbatches, n_stages)
    p, m, v = n_ranks, n_microbatches, n_stages // n_ranks
    return Schedule(name, p, n_stages, m, _with_comms(p, n_stages, spec.build(p, m, v), spec.placement),
                    spec.placement)
