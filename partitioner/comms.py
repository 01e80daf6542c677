"""How a schedule's messages are issued: the one lowering of communication that the
validator checks, the simulator prices and the runtime executes.

A schedule lists, per rank, computes and ``SEND_*``/``RECV_*`` actions. On gloo every
receive can be posted early and matched by tag, but NCCL ignores tags, runs a rank's
point-to-point operations on the group's one communicator in issue order, and completes
a (large) send only when its receive runs. Issued one action at a time, 1F1B deadlocks
there in its first steady step: rank 0's activation send and rank 1's gradient send each
sit ahead of the receive the other one needs (PyTorch's ``Schedule1F1B`` pairs them by
hand in one batch, ``fwd_sends + bwd_recvs``). Lowering decides, for any lists, what each
rank issues, where, and grouped how:

- **messages**: a ``SEND_d`` of stage ``s`` sends one message to each stage on another rank
  that uses what ``s`` made (direction ``"F"``) or whose input gradient ``s`` computed
  (``"B"``); a ``RECV_d`` posts one receive per such peer stage. ``Edges`` says who talks
  to whom: the pipeline neighbours for a bare schedule, the plan's routes at run time (a
  skip connection goes straight from its producer to its consumer, so a compute that talks
  to another rank but has no SEND/RECV action gets one).
- **rounds**: the ranks' lists are walked in lock step, in nominal time (forward, input
  and weight gradient 1, full backward 2: the ratio the builders assume), each rank
  running its next compute once the messages it uses have arrived. A message goes at the
  instant the compute that made it ends: a batch right after that compute on the sender
  and, on the receiver, right after the compute it is running then, so the receive is
  posted at the latest when the sender is ready (earlier than its ``RECV`` action if need
  be: a late receive would hold the sender's whole queue). A rank issues each instant's
  operations as one batch (one ``torch.distributed.batch_isend_irecv``, one NCCL group).
- **why it cannot deadlock**: every operation of a batch of instant t meets its partner in
  the peer's batch of instant t, and a rank's batch of instant t is issued after computes
  that use only messages of earlier instants. So the instant-t batches reach the heads of
  their queues together and complete, for every t in turn: any schedule that the buffered
  replay (``schedule.replay``) accepts is lowered into one that runs under NCCL's rules,
  hand-written ones included. Within a batch the operations with one peer are in key
  order on both sides, so in-order matching pairs each send with its own receive.

``NcclModel`` executes issued batches under NCCL's rules — one in-order queue per rank,
a batch progressing only at the head of its queue, a send completing only when its
receive runs (no buffering), the operations of one batch progressing together and a wait
on a batch covering all of it — and reports a deadlock as the ranks and actions that wait
on each other. ``check`` drives it with a lowering, the in-process
``runtime.transport.NcclTransport`` with real tensors, and ``replay_log`` with the
operations each rank of a multi-process run recorded.

Collectives have a rule of their own: each process group is one NCCL communicator, and
every member must issue the group's collectives in the same order, each with the same
operation, element count and dtype (a mismatch hangs or reads the wrong bytes; gloo often
lets it pass). ``check_collectives`` verifies that on the ``Collective`` records each rank
of a run made (``runtime.collectives.CollectiveRecorder``), group by group, and
``replay_collectives`` that the groups' sequences interleave without a cycle when every
collective is taken to block its ranks until all members reach it.

>>> from partitioner.schedule import build_schedule
>>> low = lower(build_schedule("1f1b", 2, 2))
>>> [str(x) for x in low.steps(0)]
['0F0', '[0SEND_F0]', '0F1', '[0SEND_F1]', '[0RECV_B0]', '0B0', '[0RECV_B1]', '0B1']
>>> [str(x) for x in low.steps(1)]
['[1RECV_F0]', '1F0', '[1RECV_F1]', '1B0', '[1SEND_B0]', '1F1', '1B1', '[1SEND_B1]']
>>> len(check(low))  # a valid order of every compute, issue, match and completion
28
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Mapping, NamedTuple, Protocol, Sequence

from partitioner.schedule import Action, Schedule, ScheduleError

__all__ = ["Batch", "Collective", "CollectiveMismatchError", "DeadlockError", "Edges", "Key", "Lowered", "NcclModel",
           "NeighbourEdges", "check", "check_collectives", "describe", "lower", "replay_collectives", "replay_log"]

Key = tuple[str, int, int, int]  # (direction "F"/"B", sending stage, receiving stage, micro-batch)
Op = tuple[Key, int]  # a message and the peer rank at the other end


def describe(key: Key) -> str:
    d, src, dst, mb = key
    return f"{'activations' if d == 'F' else 'gradients'} {src}>{dst} of micro-batch {mb}"


class Edges(Protocol):
    """Who exchanges messages: ``targets(d, s)`` the stages stage ``s`` sends to in
    direction ``d``, ``sources(d, s)`` the stages that send to it (ascending)."""

    def targets(self, d: str, s: int) -> Sequence[int]: ...
    def sources(self, d: str, s: int) -> Sequence[int]: ...


@dataclass(frozen=True)
class NeighbourEdges:
    """The bare pipeline: stage s talks to s - 1 and s + 1 only."""

    n_stages: int

    def targets(self, d: str, s: int) -> Sequence[int]:
        t = s + 1 if d == "F" else s - 1
        return [t] if 0 <= t < self.n_stages else []

    def sources(self, d: str, s: int) -> Sequence[int]:
        t = s - 1 if d == "F" else s + 1
        return [t] if 0 <= t < self.n_stages else []


class Batch(NamedTuple):
    """The operations one rank issues together in one round."""

    round: int
    at: int  # issued after this many of the rank's computes (before compute ``at``)
    sends: tuple[Op, ...]  # ascending (peer, key)
    recvs: tuple[Op, ...]
    actions: tuple[Action, ...]  # the SEND/RECV actions whose messages it carries

    def __str__(self) -> str:
        return "[" + " ".join(map(str, self.actions)) + "]"


@dataclass(frozen=True)
class Lowered:
    schedule: Schedule  # the lists lowered (a SEND/RECV action for every cross-rank message)
    computes: tuple[tuple[Action, ...], ...]  # per rank, its computes in order
    rounds: tuple[tuple[int, ...], ...]  # per rank, the round each compute runs in
    batches: tuple[tuple[Batch, ...], ...]  # per rank, in issue order
    needs: tuple[tuple[tuple[Key, ...], ...], ...]  # per rank, per compute: the messages it uses
    n_rounds: int

    def steps(self, rank: int) -> list[Action | Batch]:
        """What ``rank`` does, in order: its computes with each batch before the compute it precedes."""
        out: list[Action | Batch] = []
        bs = iter(self.batches[rank])
        b = next(bs, None)
        for k, a in enumerate(self.computes[rank]):
            while b is not None and b.at == k:
                out.append(b)
                b = next(bs, None)
            out.append(a)
        while b is not None:
            out.append(b)
            b = next(bs, None)
        return out

    def label(self, rank: int, batch: Batch) -> str:
        return " ".join(map(str, batch.actions))


def _route_comms(s: Schedule, edges: Edges) -> Schedule:
    """``s`` with a RECV before / SEND after each compute that exchanges a message with
    another rank but has no such action (a skip connection past a same-rank neighbour)."""
    out, changed = [], False
    for r, acts in enumerate(s.actions):
        have = set(acts)
        new: list[Action] = []
        for a in acts:
            if a.kind not in ("F", "B", "I"):
                new.append(a)
                continue
            d = "F" if a.kind == "F" else "B"
            recv, send = Action(a.stage, "RECV_" + d, a.microbatch), Action(a.stage, "SEND_" + d, a.microbatch)
            if recv not in have and any(s.rank_of(p) != r for p in edges.sources(d, a.stage)):
                new.append(recv)
                changed = True
            new.append(a)
            if send not in have and any(s.rank_of(p) != r for p in edges.targets(d, a.stage)):
                new.append(send)
                changed = True
        out.append(tuple(new))
    return replace(s, actions=tuple(out)) if changed else s


def _messages(s: Schedule, edges: Edges, rank: int, a: Action) -> list[Op]:
    """The cross-rank messages communication action ``a`` of ``rank`` sends (SEND) or
    posts a receive for (RECV), each with the peer rank, ascending peer stage."""
    d = a.kind[-1]
    if a.kind.startswith("SEND"):
        keys = [(d, a.stage, t, a.microbatch) for t in edges.targets(d, a.stage)]
        peers = [s.rank_of(t) for t in edges.targets(d, a.stage)]
    else:
        keys = [(d, p, a.stage, a.microbatch) for p in edges.sources(d, a.stage)]
        peers = [s.rank_of(p) for p in edges.sources(d, a.stage)]
    return [(k, peer) for k, peer in zip(keys, peers) if peer != rank]


def lower(schedule: Schedule, edges: Edges | None = None) -> Lowered:
    """The operations each rank issues for ``schedule``, in rounds (module docstring).
    Raises ScheduleError for a message sent and never received (or the reverse), or lists
    that stall even with buffered messages (``schedule.replay`` says which action)."""
    edges = edges if edges is not None else NeighbourEdges(schedule.n_stages)
    s = _route_comms(schedule, edges)
    rank_of, n = s.rank_of, s.n_ranks
    computes: list[list[Action]] = [[] for _ in range(n)]
    needs: list[list[tuple[Key, ...]]] = [[] for _ in range(n)]
    #: key -> (sender, computes it must have run, its action) / (receiver, computes before its RECV, action)
    made: dict[Key, tuple[int, int, Action]] = {}
    posted: dict[Key, tuple[int, int, Action]] = {}
    for r, acts in enumerate(s.actions):
        for a in acts:
            c = len(computes[r])
            if a.is_compute:
                computes[r].append(a)
                d = "F" if a.kind == "F" else "B"
                needs[r].append(tuple((d, p, a.stage, a.microbatch) for p in edges.sources(d, a.stage)
                                      if rank_of(p) != r) if a.kind != "W" else ())
                continue
            for key, _ in _messages(s, edges, r, a):
                (made if a.kind.startswith("SEND") else posted).setdefault(key, (r, c, a))
    for key in made.keys() - posted.keys():
        raise ScheduleError(f"schedule {s.name!r}: rank {made[key][0]} sends {describe(key)} ({made[key][2]}), "
                            f"but no action of rank {rank_of(key[2])} receives it")
    for key in posted.keys() - made.keys():
        raise ScheduleError(f"schedule {s.name!r}: rank {posted[key][0]} receives {describe(key)} "
                            f"({posted[key][2]}), but no action of rank {rank_of(key[1])} sends it")

    # Lock step in nominal time (F = I = W = 1, B = 2: the ratio the builders assume): a
    # message goes the instant the compute that made it ends, in a batch right after that
    # compute on the sender and, on the receiver, right after the compute it is running
    # then (its receive is posted early rather than holding the sender up: under NCCL a
    # send waits for its receive, so a late receive delays everything queued behind it).
    waiting = {key: 1 for key in made}
    sends_at: list[dict[int, list[Key]]] = [defaultdict(list) for _ in range(n)]  # by computes ended
    for key, (r, c, _) in made.items():
        sends_at[r][c].append(key)
    position = [{act: i for i, act in enumerate(acts)} for acts in s.actions]
    started, ended = [0] * n, [0] * n
    ends: list[deque[int]] = [deque() for _ in range(n)]  # end times of computes running
    arrived: list[set[Key]] = [set() for _ in range(n)]
    rounds: list[list[int]] = [[] for _ in range(n)]
    batches: list[list[Batch]] = [[] for _ in range(n)]
    ready: list[Key] = []

    def unlock(table: dict[int, list[Key]], count: int) -> None:
        for key in table.pop(count, ()):
            waiting[key] -= 1
            if waiting[key] == 0:
                ready.append(key)

    for r in range(n):
        unlock(sends_at[r], 0)
    t, left = 0, len(made)
    while left or any(started[r] < len(computes[r]) or ends[r] for r in range(n)):
        for r in range(n):  # computes ending now
            while ends[r] and ends[r][0] <= t:
                ends[r].popleft()
                ended[r] += 1
                unlock(sends_at[r], ended[r])
        if ready:  # this instant's messages: one batch per rank, before the computes starting now
            ops: dict[int, tuple[list[Op], list[Op], list[Action]]] = defaultdict(lambda: ([], [], []))
            for key in ready:
                (src, _, send_act), (dst, _, recv_act) = made[key], posted[key]
                ops[src][0].append((key, dst))
                ops[dst][1].append((key, src))
                arrived[dst].add(key)
                for rank, act in ((src, send_act), (dst, recv_act)):
                    if act not in ops[rank][2]:
                        ops[rank][2].append(act)
            for r, (snd, rcv, carried) in sorted(ops.items()):
                order = position[r]
                batches[r].append(Batch(t, started[r], tuple(sorted(snd, key=lambda o: (o[1], o[0]))),
                                        tuple(sorted(rcv, key=lambda o: (o[1], o[0]))),
                                        tuple(sorted(carried, key=order.__getitem__))))
            left -= len(ready)
            ready.clear()
        for r in range(n):  # computes starting now: the rank is free and has its messages
            k = started[r]
            if not ends[r] and k < len(computes[r]) and all(key in arrived[r] for key in needs[r][k]):
                rounds[r].append(t)
                started[r] += 1
                ends[r].append(t + (2 if computes[r][k].kind == "B" else 1))
        unfinished = left or any(started[r] < len(computes[r]) for r in range(n))
        if unfinished and not ready and not any(ends):  # nothing running or to exchange: nothing will change
            stuck = ", ".join(f"rank {r} at {computes[r][started[r]]}" for r in range(n)
                              if started[r] < len(computes[r]))
            raise ScheduleError(f"schedule {s.name!r} stalls: {stuck} wait for messages never sent "
                                f"(run Schedule.validate() for the action at fault)\n{s.grid(comms=True)}")
        t += 1
    return Lowered(s, tuple(map(tuple, computes)), tuple(map(tuple, rounds)), tuple(map(tuple, batches)),
                   tuple(map(tuple, needs)), t)


def lower_unfused(schedule: Schedule, edges: Edges | None = None) -> Lowered:
    """Every communication action issued on its own, where it stands in the list, receives
    in list order and sends in the receiver's order: how a runtime that handles actions
    one at a time talks to NCCL (1F1B deadlocks under it). Kept to show what ``lower``
    prevents."""
    low = lower(schedule, edges)
    s = low.schedule
    edges = edges if edges is not None else NeighbourEdges(schedule.n_stages)
    posting: dict[tuple[int, int], list[Key]] = defaultdict(list)
    per_action: list[list[tuple[int, Action, list[Op], list[Op]]]] = []
    for r, acts in enumerate(s.actions):
        rows: list[tuple[int, Action, list[Op], list[Op]]] = []
        c = 0
        for a in acts:
            if a.is_compute:
                c += 1
                continue
            ops = _messages(s, edges, r, a)
            if a.kind.startswith("SEND"):
                rows.append((c, a, ops, []))
            else:
                for key, peer in ops:
                    posting[(peer, r)].append(key)
                rows.append((c, a, [], ops))
        per_action.append(rows)
    order = {pair: {k: i for i, k in enumerate(keys)} for pair, keys in posting.items()}
    batches = []
    for r, rows in enumerate(per_action):
        rank_batches = []
        held: dict[int, dict[int, Key]] = defaultdict(dict)
        nxt: dict[int, int] = defaultdict(int)
        for c, a, snd, rcv in rows:
            out: list[Op] = []
            for key, peer in snd:
                held[peer][order[(r, peer)][key]] = key
            for peer in sorted(held):
                while nxt[peer] in held[peer]:
                    out.append((held[peer].pop(nxt[peer]), peer))
                    nxt[peer] += 1
            rank_batches.append(Batch(-1, c, tuple(out), tuple(rcv), (a,)))
        batches.append(tuple(rank_batches))
    return replace(low, batches=tuple(batches))


# --- NCCL's rules ---------------------------------------------------------------------


@dataclass(eq=False)
class _Group:
    rank: int
    index: int  # issue count on its rank
    label: str
    ops: list[tuple[str, Op]]  # ("send" | "recv", (key, peer))
    left: int = 0
    done: bool = False


@dataclass
class NcclModel:
    """Batches issued by ``n_ranks`` ranks, executed under NCCL's rules (module docstring).

    ``issue`` queues a batch on its rank; ``progress`` matches what can be matched and
    returns the batches that completed; ``on_match(key, send_batch, recv_batch)`` is called
    for each matched pair (a transport copies the data there)."""

    n_ranks: int
    on_match: Callable[[Key, _Group, _Group], None] | None = None
    queues: list[deque[_Group]] = field(init=False)
    _sent: dict[tuple[int, int], list[tuple[Key, _Group]]] = field(init=False)
    _posted: dict[tuple[int, int], list[tuple[Key, _Group]]] = field(init=False)
    _matched: dict[tuple[int, int], int] = field(init=False)
    _count: list[int] = field(init=False)
    _where: dict[tuple[int, Key], _Group] = field(init=False)

    def __post_init__(self) -> None:
        self.queues = [deque() for _ in range(self.n_ranks)]
        self._sent, self._posted = defaultdict(list), defaultdict(list)
        self._matched = defaultdict(int)
        self._count = [0] * self.n_ranks
        self._where = {}

    def issue(self, rank: int, sends: Iterable[Op], recvs: Iterable[Op], label: str = "") -> _Group:
        ops = [("send", op) for op in sends] + [("recv", op) for op in recvs]
        g = _Group(rank, self._count[rank], label, ops, len(ops))
        self._count[rank] += 1
        for kind, (key, peer) in ops:
            if not 0 <= peer < self.n_ranks or peer == rank:
                raise ScheduleError(f"rank {rank} {kind}s {describe(key)} with rank {peer}: no such peer")
            (self._sent[(rank, peer)] if kind == "send" else self._posted[(peer, rank)]).append((key, g))
            self._where[(rank, key)] = g
        self.queues[rank].append(g)
        return g

    def complete(self, rank: int, key: Key) -> bool:
        """Whether the batch holding ``rank``'s operation on ``key`` has completed."""
        g = self._where.get((rank, key))
        return g is not None and g.done

    def idle(self, rank: int) -> bool:
        return not self.queues[rank]

    def progress(self) -> list[_Group]:
        finished: list[_Group] = []
        changed = True
        while changed:
            changed = False
            for q in self.queues:  # empty batches complete as soon as they reach the head
                while q and q[0].left == 0:
                    g = q.popleft()
                    g.done = True
                    finished.append(g)
                    changed = True
            for pair, sent in self._sent.items():
                posted = self._posted.get(pair, [])
                k = self._matched[pair]
                while k < len(sent) and k < len(posted):
                    (skey, sg), (rkey, rg) = sent[k], posted[k]
                    if not (self.queues[sg.rank] and self.queues[sg.rank][0] is sg
                            and self.queues[rg.rank] and self.queues[rg.rank][0] is rg):
                        break
                    if skey != rkey:
                        raise ScheduleError(
                            f"message order differs between ranks {pair[0]} and {pair[1]}: NCCL matches rank "
                            f"{pair[0]}'s send #{k + 1} to rank {pair[1]} ({describe(skey)}, batch [{sg.label}]) "
                            f"with rank {pair[1]}'s receive #{k + 1} from rank {pair[0]} ({describe(rkey)}, batch "
                            f"[{rg.label}]) whatever their tags: the data would land in the wrong place")
                    if self.on_match is not None:
                        self.on_match(skey, sg, rg)
                    sg.left -= 1
                    rg.left -= 1
                    k += 1
                    changed = True
                self._matched[pair] = k
        return finished

    def waits(self) -> list[str]:
        """One line per rank with unfinished batches: what its head batch waits for."""
        lines = []
        for r, q in enumerate(self.queues):
            if not q:
                continue
            g = q[0]
            behind = f" (and {len(q) - 1} batches queued behind it)" if len(q) > 1 else ""
            why = []
            for kind, (key, peer) in g.ops:
                mine = self._sent[(r, peer)] if kind == "send" else self._posted[(peer, r)]
                theirs = self._posted.get((r, peer), []) if kind == "send" else self._sent.get((peer, r), [])
                k = next(i for i, (kk, gg) in enumerate(mine) if gg is g and kk == key)
                if k < self._matched[(r, peer) if kind == "send" else (peer, r)]:
                    continue  # this operation already ran
                if k >= len(theirs):
                    why.append(f"{kind}s {describe(key)}: rank {peer} has not issued the matching "
                               f"{'receive' if kind == 'send' else 'send'} yet")
                else:
                    pg = theirs[k][1]
                    head = self.queues[peer][0] if self.queues[peer] else None
                    why.append(f"{kind}s {describe(key)}: rank {peer}'s matching operation is in its batch "
                               f"[{pg.label}], queued behind [{head.label if head else '?'}]")
            lines.append(f"rank {r}'s communicator runs batch [{g.label}]{behind}, which " + "; ".join(why))
        return lines


class DeadlockError(ScheduleError):
    """The operations cannot all complete under NCCL's rules."""


def check(low: Lowered) -> list[tuple]:
    """Execute ``low`` under NCCL's rules: each rank runs its steps in order, a compute
    once the batches holding the messages it uses have completed, a batch issued (never
    blocking the rank) where it stands. Returns the events in an order that respects every
    dependency: ``("compute", rank, compute index)``, ``("issue", rank, batch index)``,
    ``("match", key, (rank, batch index) of the send, (rank, batch index) of the receive)``,
    ``("done", rank, batch index)``. Raises DeadlockError naming the ranks, actions and
    batches that wait on each other."""
    s = low.schedule
    model = NcclModel(s.n_ranks)
    events: list[tuple] = []
    model.on_match = lambda key, sg, rg: events.append(("match", key, (sg.rank, sg.index), (rg.rank, rg.index)))
    steps = [low.steps(r) for r in range(s.n_ranks)]
    pc, nc, nb = [0] * s.n_ranks, [0] * s.n_ranks, [0] * s.n_ranks
    progress = True
    while progress:
        progress = False
        for r in range(s.n_ranks):
            while pc[r] < len(steps[r]):
                st = steps[r][pc[r]]
                if isinstance(st, Batch):
                    model.issue(r, st.sends, st.recvs, low.label(r, st))
                    events.append(("issue", r, nb[r]))
                    nb[r] += 1
                else:
                    if not all(model.complete(r, k) for k in low.needs[r][nc[r]]):
                        break
                    events.append(("compute", r, nc[r]))
                    nc[r] += 1
                pc[r] += 1
                progress = True
        for g in model.progress():
            events.append(("done", g.rank, g.index))
            progress = True
    unfinished = [r for r in range(s.n_ranks) if pc[r] < len(steps[r]) or not model.idle(r)]
    if unfinished:
        lines = []
        for r in unfinished:
            if pc[r] < len(steps[r]):
                missing = [k for k in low.needs[r][nc[r]] if not model.complete(r, k)]
                lines.append(f"rank {r} waits at {steps[r][pc[r]]} for {', '.join(map(describe, missing))}")
            else:
                lines.append(f"rank {r} has run its list and waits for its sends to complete")
        raise DeadlockError(
            f"schedule {s.name!r} deadlocks under NCCL's rules (one in-order queue of batched point-to-point "
            "operations per rank, tags ignored, a send completes only when its receive runs):\n  "
            + "\n  ".join(lines + model.waits()) + "\n" + s.grid(comms=True))
    return events


def replay_log(logs: Sequence[Sequence[tuple]]) -> None:
    """Replay what each rank of a run issued, under NCCL's rules. ``logs[r]`` is rank r's
    record in order: ``("batch", sends, recvs)`` (``(key, peer)`` pairs, one
    ``batch_isend_irecv``) and ``("wait", key)`` (the rank blocked until that message's
    batch completed). Raises DeadlockError if the ranks would wait on each other."""
    model = NcclModel(len(logs))
    pc = [0] * len(logs)
    progress = True
    while progress:
        progress = False
        for r, log in enumerate(logs):
            while pc[r] < len(log):
                ev = log[pc[r]]
                if ev[0] == "wait":
                    if not model.complete(r, ev[1]):
                        break
                else:
                    model.issue(r, ev[1], ev[2], " ".join(f"{'send' if i < len(ev[1]) else 'recv'} {k[0]}{k[1]}>{k[2]}:{k[3]}"
                                                          for i, (k, _) in enumerate([*ev[1], *ev[2]])))
                pc[r] += 1
                progress = True
        if model.progress():
            progress = True
    unfinished = [r for r in range(len(logs)) if pc[r] < len(logs[r]) or not model.idle(r)]
    if unfinished:
        lines = [f"rank {r} waits for {describe(logs[r][pc[r]][1])}" if pc[r] < len(logs[r])
                 else f"rank {r} waits for its sends" for r in unfinished]
        raise DeadlockError("the recorded operations deadlock under NCCL's rules:\n  "
                            + "\n  ".join(lines + model.waits()))


# --- collectives ------------------------------------------------------------------------


class Collective(NamedTuple):
    """One collective a rank issued, as NCCL sees it."""

    group: str  # the process group's name: the same on every member (torch names groups in creation order)
    ranks: tuple[int, ...]  # the group's members, global ranks in group-rank order
    op: str  # "all_reduce(sum)", "all_gather", "reduce_scatter(avg)", "broadcast(src=0)", "barrier", ...
    numel: int  # elements this rank contributes (all-gather: its input; reduce-scatter: its whole input)
    dtype: str  # "float32", ...
    where: str = ""  # the code that issued it, for messages only (never compared)

    @property
    def fingerprint(self) -> tuple[str, int, str]:
        """What every member's collective at one position of the group's sequence must share."""
        return self.op, self.numel, self.dtype

    def __str__(self) -> str:
        return f"{self.op} of {self.numel} {self.dtype}" + (f" [{self.where}]" if self.where else "")


class CollectiveMismatchError(ScheduleError):
    """The ranks of a process group issued different collective sequences on it."""


def _rank_logs(logs: Mapping[int, Sequence[Collective]] | Sequence[Sequence[Collective]]) -> dict[int, list[Collective]]:
    items = logs.items() if isinstance(logs, Mapping) else enumerate(logs)
    return {int(r): list(log) for r, log in items}


def _groups(logs: dict[int, list[Collective]]) -> dict[str, tuple[int, ...]]:
    """Group name -> members, refusing a name that means different members on different ranks
    or a group whose record names a rank that is not a member."""
    members: dict[str, tuple[tuple[int, ...], int]] = {}
    for r, log in logs.items():
        for c in log:
            if r not in c.ranks:
                raise CollectiveMismatchError(f"rank {r} recorded {c} on process group {c.group!r} of ranks "
                                              f"{list(c.ranks)}, of which it is not a member")
            seen = members.setdefault(c.group, (c.ranks, r))
            if seen[0] != c.ranks:
                raise CollectiveMismatchError(
                    f"process group {c.group!r} has ranks {list(seen[0])} on rank {seen[1]} but {list(c.ranks)} on "
                    f"rank {r}: the ranks created their groups in different orders (new_group is collective: every "
                    "rank must create every group, in the same order)")
    return {g: m for g, (m, _) in members.items()}


def check_collectives(logs: Mapping[int, Sequence[Collective]] | Sequence[Sequence[Collective]]) -> dict[str, int]:
    """Check that every process group's members issued the identical collective sequence.

    ``logs`` maps each global rank (or is a list indexed by it) to the ``Collective`` records
    it made, in issue order. Every member of every group named in a record must have a log
    here. Returns the number of collectives per group name. Raises
    ``CollectiveMismatchError`` naming the group, its ranks and the first position at which
    their sequences differ (an operation, element count or dtype that differs, or a rank
    whose sequence ends there), with what each member issued there and just before."""
    by_rank = _rank_logs(logs)
    counts: dict[str, int] = {}
    for group, ranks in sorted(_groups(by_rank).items(), key=lambda kv: kv[1]):
        missing = [r for r in ranks if r not in by_rank]
        if missing:
            raise CollectiveMismatchError(f"process group {group!r} (ranks {list(ranks)}): no record of rank(s) "
                                          f"{missing}, so its sequence cannot be checked")
        seqs = {r: [c for c in by_rank[r] if c.group == group] for r in ranks}
        n = max(len(s) for s in seqs.values())
        for k in range(n):
            at = {r: (s[k] if k < len(s) else None) for r, s in seqs.items()}
            prints = {None if c is None else c.fingerprint for c in at.values()}
            if len(prints) == 1:
                continue
            lines = []
            for r in ranks:
                c, s = at[r], seqs[r]
                now = str(c) if c is not None else f"nothing: its {len(s)} collectives on this group end before"
                before = f" (after {s[k - 1]})" if k > 0 and k <= len(s) else ""
                lines.append(f"rank {r} issues {now}{before}")
            raise CollectiveMismatchError(
                f"collectives differ on process group {group!r} (global ranks {list(ranks)}) at its collective #{k + 1}"
                f" (of {n}): NCCL would hang or read the wrong bytes there\n  " + "\n  ".join(lines))
        counts[group] = n
    return counts


def replay_collectives(logs: Mapping[int, Sequence[Collective]] | Sequence[Sequence[Collective]]) -> None:
    """Replay the ranks' collectives, every one blocking its rank until all members of its
    group have reached it (conservative: an asynchronous collective on NCCL does not hold the
    next one of another communicator back). Each rank runs its record in order. Raises
    ``DeadlockError`` naming what each stuck rank waits in and where its group's other
    members are. Check the groups' sequences first (``check_collectives``)."""
    by_rank = _rank_logs(logs)
    groups = _groups(by_rank)
    pc = {r: 0 for r in by_rank}
    # per rank, per collective: its position in its group's sequence on that rank
    index: dict[int, list[int]] = {}
    for r, log in by_rank.items():
        count: dict[str, int] = defaultdict(int)
        index[r] = []
        for c in log:
            index[r].append(count[c.group])
            count[c.group] += 1
    progress = True
    while progress:
        progress = False
        for r, log in by_rank.items():
            if pc[r] >= len(log):
                continue
            c, k = log[pc[r]], index[r][pc[r]]
            members = groups[c.group]
            if all(m in by_rank and pc[m] < len(by_rank[m]) and by_rank[m][pc[m]].group == c.group
                   and index[m][pc[m]] == k for m in members):
                for m in members:
                    pc[m] += 1
                progress = True
    stuck = [r for r in by_rank if pc[r] < len(by_rank[r])]
    if stuck:
        lines = []
        for r in stuck:
            c = by_rank[r][pc[r]]
            others = []
            for m in groups[c.group]:
                if m == r:
                    continue
                if m not in by_rank or pc[m] >= len(by_rank[m]):
                    others.append(f"rank {m} has finished")
                else:
                    o = by_rank[m][pc[m]]
                    others.append(f"rank {m} is in {o.op} on group {o.group!r} (ranks {list(o.ranks)})")
            lines.append(f"rank {r} waits in {c} on group {c.group!r} (ranks {list(c.ranks)}, its collective "
                         f"#{index[r][pc[r]] + 1} there) while " + ", ".join(others))
        raise DeadlockError("the recorded collectives wait on each other when each blocks until its whole group "
                            "reaches it:\n  " + "\n  ".join(lines))
