"""One interpreter for one rank's action list, whatever moves the tensors.

Actions (``partitioner.schedule``): ``F`` runs a stage forward on its inputs and keeps
inputs and outputs for the backward; ``B`` runs ``torch.autograd.backward`` from the
stage outputs with the gradients that came back (the loss on the last stage) and
collects the gradients of the stage inputs; a split backward runs ``I`` (the stage
inputs' gradients only, graph kept, sent on at once) and later ``W`` (the weights'
gradients, from what ``I`` saved: ``runtime.splitgrad``), so until ``W`` the
micro-batch's activations stay alive; ``SEND_*``/``RECV_*`` hand tensors to the
``Transport``. Receives are waited on only by the compute that needs them, so a
transport that posts them early (``prepost``) overlaps communication with compute.

Routing (``routing``): a value goes from the stage that makes it straight to each
stage that uses it, and its gradient straight back, where the producer sums the
gradients of all its consumers. The SEND/RECV actions stay the points where a stage
sends what it made / posts what it needs; a stage a value only passes through is
called with ``None`` in that slot and its output there is ignored.

Communication is lowered once (``partitioner.comms.lower``, over the plan's routes): the
rank's steps are its computes with batches of operations between them, each batch issued
as one group (``Transport.post``: one ``batch_isend_irecv``), in an order and grouping
that cannot deadlock under NCCL's rules (in-order execution per communicator, tags
ignored, sends that complete only when their receive runs); the simulator prices the
same lowering. A compute waits only for the messages it uses. A transport that matches
by tag (``prepost``: gloo) posts every receive of the step at its start instead, and its
batches carry only sends. Messages between stages of the same rank never touch the
transport. ``comm_log`` records what the rank issued and waited for, in order, for
``partitioner.comms.replay_log``.

Data parallelism: with ``grad_sync`` (``runtime.grad_sync.GradSync``), the interpreter
tells it, from the schedule, which action is each stage's final backward on this rank (its
last ``B``, ``I`` or ``W``): ``arm(stage)`` just before it and ``ready(stage)`` just after,
so the replicas' all-reduce of that stage's gradients starts during it; the actions never
wait for it (``Runner.step`` does, after the last action).

Loss scaling: the last stage computes ``loss_fn(output_mb, target_mb) / d`` for each of
the ``m`` micro-batches, with ``d = m`` unless ``start`` is given another divisor, so for a
mean-reduced loss over equal micro-batches the sum over micro-batches (what ``finish``
returns, and what the gradients are of) equals the full-batch loss. A loss that is a sum
over tokens divided by the step's count of valid tokens (``start(..., loss_divisor=n)``)
gives the full-batch token mean however unevenly the valid tokens fall (``Runner.step``'s
``normalize="tokens"``).

Evaluation: a schedule with no backward action (only ``F`` and its ``SEND_F``/``RECV_F``,
lowered like any other) runs forwards only: nothing is kept for a backward, the last stage
adds up the loss (when targets are given) and keeps its outputs when asked; the caller runs
it under ``torch.no_grad``.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence

import torch
from torch import nn

from partitioner.comms import Batch, Lowered, lower
from partitioner.plan import Plan
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.profiling import named
from partitioner.runtime.routing import Links, Route
from partitioner.runtime.spec import static_shapes
from partitioner.runtime.splitgrad import WeightWork, input_grads, weight_grads
from partitioner.runtime.transport import Key, Layout, Pending, Transport
from partitioner.runtime.values import Wire, boundary_wires, check_value, decode, encode, input_wires
from partitioner.schedule import Action, Schedule

__all__ = ["Interpreter", "TraceEvent"]

LossFn = Callable[[Any, Any], torch.Tensor]


class TraceEvent(NamedTuple):
    rank: int
    name: str  # action text ("1F0"), or "wait 1RECV_F0" for time blocked on a receive
    start_ns: int  # time.perf_counter_ns(): one clock for every process on a machine
    end_ns: int


Link = tuple[int, tuple[Wire, ...]]  # (the stage at the other end, the values)


class GradReady(Protocol):
    """Told when each stage's gradients become final in a step (``runtime.grad_sync.GradSync``)."""

    def begin(self, order: Sequence[int]) -> None: ...  # the stages, as their final backwards come
    def arm(self, stage: int) -> None: ...  # the stage's final backward is next
    def ready(self, stage: int) -> None: ...  # it has run: the stage's gradients are final


def _carries(wires: Sequence[Wire], grad: bool) -> bool:
    """Whether a link of these values is a message: some value travels (forward), some
    value gets a gradient (backward). Both ends and the lowering decide by this alone."""
    return any(w.requires_grad if grad else w.travels for w in wires)


class _RouteEdges:
    """``partitioner.comms.Edges`` from the plan's routes: who sends whom a message that
    carries something (activations that travel; gradients only for values that need one)."""

    def __init__(self, links: Links, wires: Mapping[str, Wire], n_stages: int) -> None:
        self.out = {("F", s): [p for p, names in links.sends(s) if _carries([wires[n] for n in names], False)]
                    for s in range(n_stages)}
        self.out.update({("B", s): [p for p, names in links.receives(s)
                                    if _carries([wires[n] for n in names], True)] for s in range(n_stages)})
        self.inc: dict[tuple[str, int], list[int]] = {}
        for (d, s), targets in self.out.items():
            for t in targets:
                self.inc.setdefault((d, t), []).append(s)
        for v in self.inc.values():
            v.sort()

    def _key(self) -> tuple:
        return tuple(sorted((k, tuple(v)) for k, v in self.out.items()))

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RouteEdges) and self._key() == other._key()

    def targets(self, d: str, s: int) -> list[int]:
        return self.out.get((d, s), [])

    def sources(self, d: str, s: int) -> list[int]:
        return self.inc.get((d, s), [])


@functools.lru_cache(maxsize=8)
def _lowered(schedule: Schedule, edges: _RouteEdges) -> Lowered:
    """One lowering per schedule and routes: the ranks of one process share it."""
    return lower(schedule, edges)


class Interpreter:
    """Runs ``schedule.actions[rank]`` over ``modules`` ({stage index: module});
    ``routes`` (``routing.routes``) says where each boundary value is made and used."""

    #: fp16-mixed (``runtime.precision``): the last stage's backward starts from ``loss * loss_scale``
    loss_scale: torch.Tensor | None = None
    #: sequence parallelism (``runtime.tensor_parallel.shard_boundaries``): each boundary value's
    #: wire as it travels on this rank (its sequence shard); None: the plan's wires
    wire_map: Callable[[Wire], Wire] | None = None

    def __init__(self, rank: int, modules: Mapping[int, nn.Module], plan: Plan, schedule: Schedule,
                 transport: Transport, loss_fn: LossFn, unflatten: Callable[[Sequence[Any]], Any],
                 device: torch.device | str | None = None, *, routes: Mapping[str, Route],
                 grad_sync: GradReady | None = None) -> None:
        mine = [s for s in range(schedule.n_stages) if schedule.rank_of(s) == rank]
        if schedule.n_stages != plan.n_stages or sorted(modules) != mine:
            raise PipelineRuntimeError(
                f"rank {rank}: schedule {schedule.name!r} places stages {mine} of {schedule.n_stages} here "
                f"(stage s on rank s % {schedule.n_ranks}), the plan has {plan.n_stages} stages and this "
                f"rank holds {sorted(modules)}; build the schedule for the plan's stage count")
        wrong = [st.index for st in plan.stages if st.rank != schedule.rank_of(st.index)]
        if wrong:
            raise PipelineRuntimeError(f"plan puts stage {wrong[0]} on rank {plan.stages[wrong[0]].rank}, "
                                       f"the schedule on rank {schedule.rank_of(wrong[0])}")
        self.rank, self.modules, self.plan, self.schedule = rank, dict(modules), plan, schedule
        self.transport, self.loss_fn, self.unflatten, self.device = transport, loss_fn, unflatten, device
        self.links = Links(dict(routes))
        # Which messages carry something (dtypes and kinds do not change with the layout).
        seq = int(plan.symbols.get("S", 1))
        wires = {w.name: w for b in range(plan.n_stages - 1) for w in boundary_wires(plan, b, 1, seq)}
        self._kinds = wires  # what each value is (kind, dtype, gradient), whatever the layout
        #: the lowering this rank executes (``partitioner.comms``): computes and batches
        self.lowered = _lowered(schedule, _RouteEdges(self.links, wires, plan.n_stages))
        self.schedule = schedule = self.lowered.schedule
        self.steps: list[Action | Batch] = self.lowered.steps(rank)
        self.last = plan.n_stages - 1
        self.grad_sync = grad_sync
        computes = self.lowered.computes[rank]
        #: no backward in the schedule (every rank's list): an evaluation, nothing kept for a backward
        self.forward_only = not any(a.kind != "F" for acts in self.lowered.computes for a in acts)
        #: the last stage's outputs per micro-batch of the last step (``start(..., keep_outputs=True)``)
        self.outputs: list[Any] = []
        self._needs = dict(zip(computes, self.lowered.needs[rank]))
        #: each stage's final backward action on this rank -> the stage, and the stages in that order
        last: dict[int, int] = {a.stage: i for i, a in enumerate(computes) if a.kind in ("B", "I", "W")}
        self.final_backward: dict[Action, int] = {computes[i]: s for s, i in last.items()}
        self.final_order: list[int] = sorted(last, key=last.__getitem__)
        self.events: list[TraceEvent] = []
        #: (key, value names, payload bytes) of every message this rank sent in the last step
        self.sent: list[tuple[Key, tuple[str, ...], int]] = []
        #: the last step's operations in issue order: ("batch", sends, recvs) with (key, peer
        #: rank) pairs, and ("wait", key) where a compute waited for a message
        self.comm_log: list[tuple] = []
        self._layout: tuple[int, int] | None = None
        self._waited_until = 0
        self._reset()

    @property
    def actions(self) -> list[Action]:
        """The actions this rank runs, in order: its computes, and the SEND/RECV actions whose
        messages each batch carries (a SEND/RECV with nothing to carry is not run)."""
        return [x for st in self.steps for x in (st.actions if isinstance(st, Batch) else (st,))]

    def message_values(self, key: Key) -> tuple[str, ...]:
        """The values whose tensors message ``key`` carries, in the order they travel (as
        ``_wire_layout`` lays the message out on both ends)."""
        d, src, dst, _ = key
        names = dict(self.links.sends(src) if d == "F" else self.links.receives(src)).get(dst, ())
        return tuple(n for n in names if (self._kinds[n].requires_grad if d == "B" else self._kinds[n].travels))

    # -- one step ------------------------------------------------------------------
    def _reset(self) -> None:
        self._pending: dict[Key, Pending] = {}
        self._local: dict[Key, list[torch.Tensor]] = {}  # same-rank hand-offs
        self._out: dict[Key, list[torch.Tensor]] = {}  # encoded, waiting for their batch
        self._saved: dict[tuple[int, int], tuple[list[Any], Any]] = {}
        self._weights: dict[tuple[int, int], WeightWork] = {}  # I done, W to come
        self._params: dict[int, list[nn.Parameter]] = {}  # per stage, for I
        self._loss: torch.Tensor | None = None

    def _wire_layout(self, microbatch_size: int, seq: int) -> None:
        """Per stage and direction, the links it sends and receives, with the values'
        wires at this layout; messages with nothing to carry are dropped on both ends."""
        wire: dict[str, Wire] = {}
        for b in range(self.last):
            for w in boundary_wires(self.plan, b, microbatch_size, seq):
                wire.setdefault(w.name, w)
        if self.wire_map is not None:
            wire = {n: self.wire_map(w) for n, w in wire.items()}
        self._wire = wire

        def links(pairs: list[tuple[int, tuple[str, ...]]], grad: bool) -> list[Link]:
            out = []
            for peer, names in pairs:
                ws = tuple(wire[n] for n in names if not grad or wire[n].requires_grad)
                if _carries(ws, grad):
                    out.append((peer, ws))
            return out

        n = self.plan.n_stages
        self._sends = {"F": [links(self.links.sends(s), False) for s in range(n)],
                       "B": [links(self.links.receives(s), True) for s in range(n)]}
        self._recvs = {"F": [links(self.links.receives(s), False) for s in range(n)],
                       "B": [links(self.links.sends(s), True) for s in range(n)]}
        # Each message's layout and value names, so a batch does no lookups.
        self._shape: dict[tuple[str, int, int], Layout] = {
            (d, peer, s): tuple((w.shape, w.dtype) for w in ws if w.travels)
            for d in ("F", "B") for s in range(n) for peer, ws in self._recvs[d][s]}
        self._names = {(d, s, peer): tuple(w.name for w in ws)
                       for d in ("F", "B") for s in range(n) for peer, ws in self._sends[d][s]}

    def start(self, microbatch_size: int, seq: int, inputs: Sequence[Sequence[Any]] | None = None,
              targets: Sequence[Any] | None = None, *, loss_divisor: float | torch.Tensor | None = None,
              keep_outputs: bool = False) -> None:
        """Begin a step: stage 0's owner passes the micro-batched flat ``inputs``, the last
        stage's owner the micro-batched ``targets`` (optional for a forward-only schedule:
        without them no loss is computed). Each micro-batch's loss is divided by
        ``loss_divisor`` (default: the number of micro-batches); ``keep_outputs`` keeps
        the last stage's outputs in ``outputs`` (forward-only schedules)."""
        m = self.schedule.n_microbatches
        if 0 in self.modules and (inputs is None or len(inputs) != m):
            raise PipelineRuntimeError(f"rank {self.rank} runs stage 0 and needs {m} micro-batches of inputs", self.rank)
        if self.last in self.modules and (targets is not None or not self.forward_only) and (
                targets is None or len(targets) != m):
            raise PipelineRuntimeError(f"rank {self.rank} runs the last stage and needs {m} micro-batches of "
                                       "targets: pass target=...", self.rank)
        self._reset()
        self.events, self.sent = [], []
        if self._layout != (microbatch_size, seq):
            # Evaluating the plan's polynomials is slow-ish (sympy): once per layout.
            self._wire_layout(microbatch_size, seq)
            self._inputs_wires = input_wires(self.plan, microbatch_size, seq)
            self._layout = (microbatch_size, seq)
        self.inputs, self.targets, self.m = inputs, targets, m
        self.loss_divisor = m if loss_divisor is None else loss_divisor
        self.keep_outputs, self.outputs = keep_outputs, []
        if self.grad_sync is not None:
            self.grad_sync.begin(self.final_order)
        self.comm_log = []
        if self.transport.prepost:  # every receive of the step, now (matched by tag)
            recvs = [(key, peer, self._shape[key[:3]]) for b in self.steps if isinstance(b, Batch)
                     for key, peer in b.recvs]
            self._pending.update(zip((k for k, _, _ in recvs), self.transport.post(self.rank, [], recvs, self.device)))

    def can_run(self, step: Action | Batch) -> bool:
        """False while ``step`` is a compute whose messages have not all arrived (one process)."""
        if isinstance(step, Batch):
            return True
        return all(self.transport.arrived(k) for k in self._needs.get(step, ()))

    def run(self, step: Action | Batch) -> None:
        t0 = time.perf_counter_ns()
        self._waited_until = 0
        if isinstance(step, Batch):
            a = step.actions[0]
            try:
                with contextlib.ExitStack() as ranges:  # each action it carries, as a profiler range
                    for x in step.actions:
                        ranges.enter_context(named(x))
                    self._issue(step)
            except PipelineRuntimeError as e:
                if e.rank is not None:
                    raise
                raise PipelineRuntimeError(f"rank {self.rank}, batch {step}: {e}", self.rank, str(a), e.secondary) from e
            # One event per action it carries, the group's time split between them, so a
            # trace names every action and per-kind sums add up to the wall time.
            t1 = time.perf_counter_ns()
            cut = [t0 + (t1 - t0) * i // len(step.actions) for i in range(len(step.actions) + 1)]
            self.events.extend(TraceEvent(self.rank, str(x), cut[i], cut[i + 1]) for i, x in enumerate(step.actions))
            return
        a = step
        sync = self.grad_sync
        final = self.final_backward.get(a) if sync is not None else None
        try:
            if sync is not None and final is not None:
                sync.arm(final)
            with named(a):  # the action's text ("1F0") as a range in a user's torch.profiler trace
                getattr(self, "_" + a.kind)(a.stage, a.microbatch, a)
            if sync is not None and final is not None:
                sync.ready(final)  # launches, never waits
        except PipelineRuntimeError as e:
            if e.rank is not None:
                raise
            raise PipelineRuntimeError(f"rank {self.rank}, action {a}: {e}{self._static_hint()}", self.rank, str(a),
                                       e.secondary) from e
        except Exception as e:
            what = {"F": "forward", "B": "backward"}.get(a.kind, a.kind.lower())
            raise PipelineRuntimeError(
                f"rank {self.rank}, action {a} (stage {a.stage} {what}, micro-batch {a.microbatch}) failed: "
                f"{type(e).__name__}: {e}{self._static_hint()}", self.rank, str(a)) from e
        # Time blocked on a receive is its own "wait" event, not part of the compute.
        self.events.append(TraceEvent(self.rank, str(a), max(t0, self._waited_until), time.perf_counter_ns()))

    def _static_hint(self) -> str:
        """For a plan whose shapes are fixed to its example (symbolic shape propagation failed
        when planning), run at another micro-batch size: most likely why an op failed."""
        if not static_shapes(self.plan):
            return ""
        example = self.plan.symbols.get("B")
        if example is None or self._layout is None or self._layout[0] == example:
            return ""
        return (f" (this plan's shapes are fixed to its example batch of {example}: symbolic shape propagation "
                f"failed when planning, see plan.notes; the model may not run micro-batches of {self._layout[0]}: "
                "make its shapes follow its inputs (no sizes written into view/reshape), or run with "
                "n_microbatches=1)")

    def finish(self) -> torch.Tensor | None:
        """Wait for outstanding sends; the step's loss on the last stage's rank, else None."""
        self.transport.flush()
        left = [f"{s}F{mb}" for s, mb in self._saved]
        if left:
            raise PipelineRuntimeError(f"rank {self.rank}: forwards without a backward at the end of the step: {left}")
        return self._loss

    # -- messages ----------------------------------------------------------------------
    def _take(self, key: Key) -> list[torch.Tensor]:
        """The tensors of message ``key``, from this rank or a peer, waiting if needed."""
        if self.schedule.rank_of(key[1]) == self.rank:
            return [t.clone() for t in self._local.pop(key)]  # clone: the receiver owns its copy
        pending = self._pending.pop(key, None)
        if pending is None:
            raise PipelineRuntimeError(f"message {key} used before its receive was posted")
        self.comm_log.append(("wait", key))
        t0 = time.perf_counter_ns()
        out = pending.wait()
        self._waited_until = time.perf_counter_ns()
        d, src, dst, mb = key
        self.events.append(TraceEvent(self.rank, f"wait {d}{src}>{dst}:{mb}", t0, self._waited_until))
        return out

    def _give(self, key: Key, tensors: list[torch.Tensor]) -> None:
        (self._local if self.schedule.rank_of(key[2]) == self.rank else self._out)[key] = tensors

    def _issue(self, batch: Batch) -> None:
        """Issue one batch: its sends (made by earlier computes) and, unless every receive
        was posted at the start, its receives, as one group."""
        sends = []
        for key, peer in batch.sends:
            tensors = self._out.pop(key)
            self.sent.append((key, self._names[key[:3]], sum(t.numel() * t.element_size() for t in tensors)))
            sends.append((key, peer, tensors))
        recvs = [] if self.transport.prepost else [(key, peer, self._shape[key[:3]]) for key, peer in batch.recvs]
        self.comm_log.append(("batch", tuple(batch.sends), tuple(batch.recvs)))
        if sends or recvs:
            self._pending.update(zip((k for k, _, _ in recvs), self.transport.post(self.rank, sends, recvs, self.device)))

    # -- compute -----------------------------------------------------------------------
    def _F(self, s: int, mb: int, a: Action) -> None:
        where = f"stage {s} micro-batch {mb}"
        if s == 0:
            assert self.inputs is not None  # start() checked
            args = list(self.inputs[mb])
            encode(f"{where} input", self._inputs_wires, args)  # checks only
        else:
            got: dict[str, Any] = {}
            for peer, ws in self._recvs["F"][s]:
                got.update(zip((w.name for w in ws), decode(ws, self._take(("F", peer, s, mb)), grad=True)))
            args = [got.get(n) for n in self.plan.stages[s].inputs]  # None: only passes through
        out = self.modules[s](*args)
        if s == self.last:
            if self.forward_only:  # evaluation: the loss and, if asked, the outputs; nothing saved
                if self.keep_outputs:
                    self.outputs.append(self.unflatten(list(out)))
                if self.targets is not None:
                    self._add_loss(self._loss_of(out, mb))
                return
            loss = self._loss_of(out, mb)
            self._add_loss(loss)
            self._saved[(s, mb)] = (args, loss if self.loss_scale is None else loss * self.loss_scale)
            return
        names = self.plan.stages[s].outputs
        if len(out) != len(names):
            raise PipelineRuntimeError(f"{where} output: expected {len(names)} values ({list(names)}), got {len(out)}")
        made = dict(zip(names, out))
        for peer, ws in self._sends["F"][s]:
            self._give(("F", s, peer, mb), encode(f"{where} output", ws, [made[w.name] for w in ws]))
        if not self.forward_only:
            self._saved[(s, mb)] = (args, made)

    def _loss_of(self, out: Any, mb: int) -> torch.Tensor:
        """The micro-batch's share of the step's loss: ``loss_fn(...) / loss_divisor``."""
        assert self.targets is not None
        loss = self.loss_fn(self.unflatten(list(out)), self.targets[mb])
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise PipelineRuntimeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                                       f"{tuple(getattr(loss, 'shape', ()))}")
        return loss / self.loss_divisor  # see the module docstring

    def _add_loss(self, loss: torch.Tensor) -> None:
        self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()

    def _roots(self, s: int, mb: int, out: Any) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """What backward starts from: the loss on the last stage, else the outputs that
        require grad with the gradients that came back (summed over their consumers)."""
        if s == self.last:
            return [out], [None]
        grads: dict[str, torch.Tensor] = {}  # summed over the value's consumers
        for peer, ws in self._recvs["B"][s]:
            for w, g in zip(ws, self._take(("B", peer, s, mb))):
                grads[w.name] = grads[w.name] + g if w.name in grads else g
        roots: list[torch.Tensor] = []
        seeds: list[torch.Tensor | None] = []
        for name, g in grads.items():
            o = out[name]
            if isinstance(o, torch.Tensor) and o.requires_grad:
                roots.append(o)
                seeds.append(g)
        return roots, seeds

    def _send_input_grads(self, s: int, mb: int, args: list[Any]) -> None:
        if s == 0:
            return
        given = dict(zip(self.plan.stages[s].inputs, args))
        for peer, ws in self._sends["B"][s]:
            gin = []
            for w in ws:
                v = given[w.name]
                # No gradient reached this input (it did not feed the loss): send zeros,
                # since the peer's buffer layout comes from the plan, not from this run.
                g = v.grad if isinstance(v, torch.Tensor) and v.grad is not None else torch.zeros_like(v)
                check_value(f"stage {s} micro-batch {mb} gradient", w, g)
                gin.append(g)
            self._give(("B", s, peer, mb), gin)

    def _B(self, s: int, mb: int, a: Action) -> None:
        args, out = self._saved.pop((s, mb))
        roots, seeds = self._roots(s, mb, out)
        if roots:
            torch.autograd.backward(roots, seeds)
        self._send_input_grads(s, mb, args)

    def _I(self, s: int, mb: int, a: Action) -> None:
        """Input gradients only (``torch.autograd.grad`` on the stage inputs, graph kept);
        what the weights need is kept for this micro-batch's ``W`` (see ``splitgrad``)."""
        args, out = self._saved[(s, mb)]
        roots, seeds = self._roots(s, mb, out)
        params = self._params.get(s)
        if params is None:  # once per stage: requires_grad does not change within a step
            params = self._params[s] = [p for p in self.modules[s].parameters() if p.requires_grad]
        self._weights[(s, mb)] = input_grads(roots, seeds, args, params)
        self._send_input_grads(s, mb, args)

    def _W(self, s: int, mb: int, a: Action) -> None:
        self._saved.pop((s, mb))
        weight_grads(self._weights.pop((s, mb)))
