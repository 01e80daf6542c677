"""The user's own split points (issue 9, item 6): ``torch.distributed.pipelining.pipe_split()``
in ``forward``. With k markers and k + 1 stages they are the cuts; ``cut_at="markers"``
chooses among them with fewer stages and adds the solver's cuts with more; otherwise they
are not used, and the plan and a warning say so. Both capture routes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torch.distributed.pipelining", reason="pipe_split needs torch.distributed")

from torch.distributed.pipelining import pipe_split  # noqa: E402

from partitioner import PartitionError, load_plan, partition  # noqa: E402
from partitioner.passes.markers import MARKER, MARKERS  # noqa: E402
from partitioner.passes.trace import capture  # noqa: E402

ROUTES = ("fx", "export")
ROOT = Path(__file__).resolve().parents[2]


class Marked(nn.Module):
    """Eight layers; ``pipe_split()`` after layers 1 and 5 (so the stages are uneven)."""

    def __init__(self, after: tuple[int, ...] = (1, 5)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(8))
        self.after = after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = torch.relu(layer(x))
            if i in self.after:
                pipe_split()
        return x


class MarkedMidShape(nn.Module):
    """A marker where a tuple of tensors is live: it cannot be a cut."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.a(x).chunk(2, dim=-1)
        pipe_split()
        return self.b(torch.cat(parts, dim=-1))


def _partition(model: nn.Module, n: int, route: str, **kw: object) -> tuple[object, list[str]]:
    x = torch.randn(8, 16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe = partition(model, n, (x,), capture_route=route, device="cpu", **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(pipe(x), model(x))
    return pipe, [str(w.message) for w in seen if "pipe_split" in str(w.message)]


def _cut_layers(pipe: object) -> list[int]:
    """The layer index each stage after the first starts with."""
    out = []
    for st in pipe.plan.stages[1:]:  # type: ignore[attr-defined]
        first = next(m for m in st.modules if m.startswith("layers."))
        out.append(int(first.split(".")[1]))
    return out


@pytest.mark.parametrize("route", ROUTES)
def test_capture_records_the_markers_and_removes_their_nodes(route: str) -> None:
    gm = capture(Marked(), (torch.randn(8, 16),), {}, route=route).gm
    assert gm.meta[MARKERS] == 2
    assert not any("pipe_split" in str(n.target) for n in gm.graph.nodes)
    assert [n.meta[MARKER] for n in gm.graph.nodes if MARKER in n.meta] == [0, 1]


@pytest.mark.parametrize("route", ROUTES)
def test_k_markers_are_the_cuts_of_k_plus_one_stages(route: str) -> None:
    model = Marked()
    pipe, warned = _partition(model, 3, route)
    assert _cut_layers(pipe) == [2, 6]
    assert "cuts at the 2 pipe_split() markers" in pipe.plan.notes
    assert not warned
    again = load_plan(pipe.plan.to_json()).apply(model)
    assert again.plan.cuts == pipe.plan.cuts


@pytest.mark.parametrize("route", ROUTES)
def test_cut_at_markers_with_fewer_stages_chooses_among_them(route: str) -> None:
    pipe, _ = _partition(Marked(), 2, route, cut_at="markers")
    assert _cut_layers(pipe) in ([2], [6])
    assert any("chosen among the 2 pipe_split() markers" in n for n in pipe.plan.notes)


@pytest.mark.parametrize("route", ROUTES)
def test_cut_at_markers_with_more_stages_keeps_them_and_adds_the_solvers(route: str) -> None:
    pipe, _ = _partition(Marked(), 4, route, cut_at="markers")
    cuts = _cut_layers(pipe)
    assert len(cuts) == 3 and {2, 6} <= set(cuts)
    assert any("markers are cuts; the solver placed the other 1" in n for n in pipe.plan.notes)


@pytest.mark.parametrize("route", ROUTES)
def test_unused_markers_are_said_not_ignored(route: str) -> None:
    pipe, warned = _partition(Marked(), 2, route)
    assert warned and "cut_at='markers'" in warned[0]
    assert any("markers are not used (2 markers make 3 stages, not 2)" in n for n in pipe.plan.notes)


def test_a_marker_that_cannot_be_a_cut_says_which_and_why() -> None:
    with pytest.raises(PartitionError, match=r"pipe_split\(\) marker 0 \(before node .* cannot be a cut: "
                                             r"non-tensor value crosses.*move that pipe_split\(\) call"):
        _partition(MarkedMidShape(), 2, "fx")


def test_cut_at_markers_without_markers_says_so() -> None:
    with pytest.raises(PartitionError, match=r"cut_at='markers', but forward calls .*pipe_split\(\) nowhere"):
        _partition(Marked(after=()), 2, "fx", cut_at="markers")


#: A forward that imports torch.distributed.pipelining itself: the op pipe_split() calls is
#: registered for the first time while the first capture traces it.
_FIRST_CALL = textwrap.dedent("""
    import sys, warnings
    import torch
    from torch import nn
    from partitioner import partition

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(8))

        def forward(self, x):
            from torch.distributed.pipelining import pipe_split
            for i, layer in enumerate(self.layers):
                x = torch.relu(layer(x))
                if i == 1:
                    pipe_split()
            return x

    assert "torch.distributed.pipelining" not in sys.modules, "imported before the first capture"
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 16)
    for _ in range(2):
        pipe = partition(model, 2, (x,), device="cpu", link="loopback", capture_route=sys.argv[1])
        print("cuts", pipe.plan.cuts, "cuts at the 1 pipe_split() markers" in pipe.plan.notes)
""")


def test_a_marker_whose_module_forward_imports_is_found_on_the_first_call_of_a_process() -> None:
    """A fresh process on the fx route (the export route records the op by itself)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _FIRST_CALL, "fx"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("cuts")]
    assert lines == ["cuts ('relu_1 | layers.2',) True"] * 2, done.stdout
