"""One interpreter for one rank's action list, whatever moves the tensors.

Actions (``partitioner.schedule``): ``F`` runs a stage forward on its inputs and keeps
inputs and outputs for the backward; ``B`` runs ``torch.autograd.backward`` from the
stage outputs with the gradients that came back (the loss on the last stage) and
collects the gradients of the stage inputs; ``SEND_*``/``RECV_*`` hand tensors to the
``Transport``. Receives are waited on only by the compute that needs them, so a
transport that posts them early (``prepost``) overlaps communication with compute.

Loss scaling: the last stage computes ``loss_fn(output_mb, target_mb) / m`` for each of
the ``m`` micro-batches, so for a mean-reduced loss the sum over micro-batches (what
``finish`` returns, and what the gradients are of) equals the full-batch loss.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from partitioner.plan import Plan
from partitioner.runtime.errors import PipelineRuntimeError
from partitioner.runtime.transport import Key, Pending, Transport
from partitioner.runtime.values import Wire, boundary_wires, check_value, decode, encode, input_wires
from partitioner.schedule import Action, Schedule

__all__ = ["Interpreter", "TraceEvent"]

LossFn = Callable[[Any, Any], torch.Tensor]


class TraceEvent(NamedTuple):
    rank: int
    name: str  # action text ("1F0"), or "wait 1RECV_F0" for time blocked on a receive
    start_ns: int  # time.perf_counter_ns(): one clock for every process on a machine
    end_ns: int


def _message(a: Action) -> Key:
    st, k, mb = a
    return {"SEND_F": ("F", st, mb), "RECV_F": ("F", st - 1, mb),
            "SEND_B": ("B", st, mb), "RECV_B": ("B", st + 1, mb)}[k]


class Interpreter:
    """Runs ``schedule.actions[rank]`` over ``modules`` ({stage index: module})."""

    def __init__(self, rank: int, modules: Mapping[int, nn.Module], plan: Plan, schedule: Schedule,
                 transport: Transport, loss_fn: LossFn, unflatten: Callable[[Sequence[Any]], Any],
                 device: torch.device | str | None = None) -> None:
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
        self.actions = schedule.actions[rank]
        self.last = plan.n_stages - 1
        self.events: list[TraceEvent] = []
        self._layout: tuple[int, int] | None = None
        self._waited_until = 0
        self._reset()

    # -- one step ------------------------------------------------------------------
    def _reset(self) -> None:
        self._pending: dict[Key, Pending] = {}
        self._local: dict[Key, list[torch.Tensor]] = {}  # same-rank hand-offs
        self._out: dict[Key, list[torch.Tensor]] = {}  # encoded, waiting for their SEND
        self._saved: dict[tuple[int, int], tuple[list[Any], Any]] = {}
        self._loss: torch.Tensor | None = None

    def start(self, microbatch_size: int, seq: int, inputs: Sequence[Sequence[Any]] | None = None,
              targets: Sequence[Any] | None = None) -> None:
        """Begin a step: stage 0's owner passes the micro-batched flat ``inputs``, the last
        stage's owner the micro-batched ``targets``."""
        m = self.schedule.n_microbatches
        if 0 in self.modules and (inputs is None or len(inputs) != m):
            raise PipelineRuntimeError(f"rank {self.rank} runs stage 0 and needs {m} micro-batches of inputs", self.rank)
        if self.last in self.modules and (targets is None or len(targets) != m):
            raise PipelineRuntimeError(f"rank {self.rank} runs the last stage and needs {m} micro-batches of "
                                       "targets: pass target=...", self.rank)
        self._reset()
        self.events = []
        if self._layout != (microbatch_size, seq):
            # Evaluating the plan's polynomials is slow-ish (sympy): once per layout.
            self._wires = [boundary_wires(self.plan, b, microbatch_size, seq) for b in range(self.last)]
            self._grad_wires = [tuple(w for w in ws if w.requires_grad) for ws in self._wires]
            self._inputs_wires = input_wires(self.plan, microbatch_size, seq)
            self._layout = (microbatch_size, seq)
        self.inputs, self.targets, self.m = inputs, targets, m
        if self.transport.prepost:
            for a in self.actions:
                if a.kind.startswith("RECV"):
                    self._post(a)

    def can_run(self, a: Action) -> bool:
        """False while ``a`` is a receive whose message has not been sent (one process)."""
        return not a.kind.startswith("RECV") or self.transport.prepost or self.transport.arrived(_message(a))

    def run(self, a: Action) -> None:
        t0 = time.perf_counter_ns()
        self._waited_until = 0
        try:
            getattr(self, "_" + a.kind)(a.stage, a.microbatch, a)
        except PipelineRuntimeError as e:
            if e.rank is not None:
                raise
            raise PipelineRuntimeError(f"rank {self.rank}, action {a}: {e}", self.rank, str(a), e.secondary) from e
        except Exception as e:
            what = {"F": "forward", "B": "backward"}.get(a.kind, a.kind.lower())
            raise PipelineRuntimeError(
                f"rank {self.rank}, action {a} (stage {a.stage} {what}, micro-batch {a.microbatch}) failed: "
                f"{type(e).__name__}: {e}", self.rank, str(a)) from e
        # Time blocked on a receive is its own "wait" event, not part of the compute.
        self.events.append(TraceEvent(self.rank, str(a), max(t0, self._waited_until), time.perf_counter_ns()))

    def finish(self) -> torch.Tensor | None:
        """Wait for outstanding sends; the step's loss on the last stage's rank, else None."""
        self.transport.flush()
        left = [f"{s}F{mb}" for s, mb in self._saved]
        if left:
            raise PipelineRuntimeError(f"rank {self.rank}: forwards without a backward at the end of the step: {left}")
        return self._loss

    # -- actions -----------------------------------------------------------------------
    def _wires_of(self, key: Key) -> tuple[Wire, ...]:
        direction, sender, _ = key
        return self._wires[sender] if direction == "F" else self._grad_wires[sender - 1]

    def _post(self, a: Action) -> None:
        key = _message(a)
        if key not in self._pending:
            bufs = [w.empty(self.device) for w in self._wires_of(key) if w.travels]
            self._pending[key] = self.transport.recv(key, self.schedule.rank_of(key[1]), bufs)

    def _take(self, key: Key) -> list[torch.Tensor]:
        """The tensors of message ``key``, from this rank or a peer, waiting if needed."""
        if self.schedule.rank_of(key[1]) == self.rank:
            return [t.clone() for t in self._local.pop(key)]  # clone: the receiver owns its copy
        pending = self._pending.pop(key, None)
        if pending is None:
            raise PipelineRuntimeError(f"message {key} used before its RECV action ran")
        t0 = time.perf_counter_ns()
        out = pending.wait()
        self._waited_until = time.perf_counter_ns()
        self.events.append(TraceEvent(self.rank, f"wait {key[0]}{key[1]}:{key[2]}", t0, self._waited_until))
        return out

    def _give(self, key: Key, tensors: list[torch.Tensor]) -> None:
        peer_stage = key[1] + (1 if key[0] == "F" else -1)
        (self._local if self.schedule.rank_of(peer_stage) == self.rank else self._out)[key] = tensors

    def _RECV_F(self, s: int, mb: int, a: Action) -> None:
        self._post(a)

    _RECV_B = _RECV_F

    def _SEND_F(self, s: int, mb: int, a: Action) -> None:
        key = _message(a)
        self.transport.send(key, self.schedule.rank_of(s + 1), self._out.pop(key))

    def _SEND_B(self, s: int, mb: int, a: Action) -> None:
        key = _message(a)
        self.transport.send(key, self.schedule.rank_of(s - 1), self._out.pop(key))

    def _F(self, s: int, mb: int, a: Action) -> None:
        where = f"stage {s} micro-batch {mb}"
        if s == 0:
            assert self.inputs is not None  # start() checked
            args = list(self.inputs[mb])
            encode(f"{where} input", self._inputs_wires, args)  # checks only
        else:
            args = decode(self._wires[s - 1], self._take(("F", s - 1, mb)), grad=True)
        out = self.modules[s](*args)
        if s == self.last:
            assert self.targets is not None
            loss = self.loss_fn(self.unflatten(list(out)), self.targets[mb])
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise PipelineRuntimeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                                           f"{tuple(getattr(loss, 'shape', ()))}")
            loss = loss / self.m  # see the module docstring
            self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()
            self._saved[(s, mb)] = (args, loss)
        else:
            self._give(("F", s, mb), encode(f"{where} output", self._wires[s], list(out)))
            self._saved[(s, mb)] = (args, list(out))

    def _B(self, s: int, mb: int, a: Action) -> None:
        args, out = self._saved.pop((s, mb))
        if s == self.last:
            torch.autograd.backward(out)
        else:
            grads = iter(self._take(("B", s + 1, mb)))
            roots, seeds = [], []
            for w, o in zip(self._wires[s], out):
                if w.requires_grad:
                    g = next(grads)
                    if isinstance(o, torch.Tensor) and o.requires_grad:
                        roots.append(o)
                        seeds.append(g)
            if roots:
                torch.autograd.backward(roots, seeds)
        if s > 0:
            gin = []
            for w, v in zip(self._wires[s - 1], args):
                if w.requires_grad:
                    # No gradient reached this input (it did not feed the loss): send zeros,
                    # since the peer's buffer layout comes from the plan, not from this run.
                    g = v.grad if isinstance(v, torch.Tensor) and v.grad is not None else torch.zeros_like(v)
                    check_value(f"stage {s} micro-batch {mb} gradient", w, g)
                    gin.append(g)
            self._give(("B", s, mb), gin)

    def _I(self, s: int, mb: int, a: Action) -> None:
        raise PipelineRuntimeError("split backward (I/W actions) is not supported by this runtime yet; "
                                   "use a schedule with full backwards (B)")

    _W = _I
