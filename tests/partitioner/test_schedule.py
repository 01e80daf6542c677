"""Schedules as data: text round trip, builders that validate, golden lists and grids,
and validation that catches hand-broken lists with a marked grid."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from partitioner.cost_models.errors import PartitionError
from partitioner.schedule import SCHEDULES, Action, Schedule, ScheduleError, build_schedule

GOLDEN = Path(__file__).parent / "golden"
KINDS = ("F", "B", "I", "W", "SEND_F", "RECV_F", "SEND_B", "RECV_B")
actions = st.builds(Action, st.integers(0, 10**6), st.sampled_from(KINDS), st.integers(0, 10**6))


@given(actions)
def test_action_text_round_trips(a: Action) -> None:
    assert Action.parse(str(a)) == a


def test_action_text_is_compact() -> None:
    assert str(Action(2, "F", 0)) == "2F0"
    assert Action.parse("1SEND_F3") == Action(1, "SEND_F", 3)
    assert Action.parse("0RECV_B1") == Action(0, "RECV_B", 1)


@pytest.mark.parametrize("text", ["", "F0", "2X0", "2f0", "-1F0", "2F", " 2F0", "2SEND0", "2F0x"])
def test_bad_action_text_says_the_expected_form(text: str) -> None:
    with pytest.raises(ScheduleError, match=r"bad action text .*expected <stage><kind><microbatch>"):
        Action.parse(text)
    assert issubclass(ScheduleError, PartitionError)


@given(st.lists(st.lists(actions, max_size=6), min_size=1, max_size=4), st.integers(1, 9))
def test_schedule_text_round_trips_any_lists(lists: list[list[Action]], m: int) -> None:
    s = Schedule("hand-made", len(lists), 2 * len(lists), m, tuple(map(tuple, lists)))
    assert Schedule.from_text(s.to_text()) == s
    assert Schedule.from_text(s.to_text()).to_text() == s.to_text()


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "must start with 'schedule <name>"),
        ("schedule x ranks=1 stages=1\nrank 0: 0F0", "must start with"),
        (
            "schedule x ranks=2 stages=2 microbatches=1\nrank 1: 1F0\nrank 0:",
            "expected line 'rank 0: <actions>'",
        ),
        ("schedule x ranks=1 stages=1 microbatches=1\nrank 0: 0F0 0Q0", "bad action text '0Q0'"),
        ("schedule x ranks=2 stages=2 microbatches=1\nrank 0: 0F0", r"one action list per rank \(1 != 2\)"),
        (
            "schedule x ranks=2 stages=3 microbatches=1\nrank 0:\nrank 1:",
            r"multiple of n_ranks \(3 % 2 != 0\)",
        ),
    ],
)
def test_from_text_errors(text: str, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        Schedule.from_text(text)


def _cases() -> list[tuple[str, int, int, int]]:
    out = []
    for p, m in itertools.product((1, 2, 3, 4, 5), (1, 2, 3, 4, 7, 8, 12)):
        out += [("gpipe", p, m, p), ("1f1b", p, m, p), ("naive", p, 1, p)]
        out += [("gpipe", p, m, 2 * p), ("naive", p, 1, 3 * p)]
        out += [("zb-h1", p, m, p), ("zbv", p, m, 2 * p)]
        if m % p == 0:
            out += [("interleaved-1f1b", p, m, v * p) for v in (1, 2, 3, 4)]
    return sorted(set(out))


@pytest.mark.parametrize("name, p, m, n_stages", _cases())
def test_builders_produce_valid_complete_lists(name: str, p: int, m: int, n_stages: int) -> None:
    s = build_schedule(name, p, m, n_stages)
    s.validate()
    computes = [a for rank in s.actions for a in rank if a.is_compute]
    kinds = "FIW" if SCHEDULES[name].split_backward else "FB"
    want = {(st_, k, mb) for st_ in range(n_stages) for mb in range(m) for k in kinds}
    assert sorted(computes) == sorted(Action(*t) for t in want)  # each exactly once
    assert all(s.rank_of(a.stage) == r for r, rank in enumerate(s.actions) for a in rank)
    assert Schedule.from_text(s.to_text()) == s


def test_naive_forces_one_microbatch_and_defaults() -> None:
    assert build_schedule("naive", 3, 8).n_microbatches == 1
    assert build_schedule("interleaved-1f1b", 2, 4).n_stages == 4  # v = 2 by default
    assert build_schedule("1f1b", 4, 8).n_stages == 4


@pytest.mark.parametrize(
    "args, match",
    [
        (
            ("pipedream", 2, 4),
            "unknown schedule 'pipedream': expected one of gpipe, 1f1b, interleaved-1f1b, zb-h1, zbv, naive",
        ),
        (("interleaved-1f1b", 4, 6), r"multiple of n_ranks \(6 % 4 != 0\): try n_microbatches=8"),
        (("1f1b", 2, 4, 4), r"1f1b needs n_stages == n_ranks \(4 != 2\); use 'interleaved-1f1b'"),
        (("gpipe", 2, 4, 3), r"multiple of n_ranks \(3 % 2 != 0\)"),
        (("gpipe", 0, 4), "n_ranks must be an int >= 1, got 0"),
        (("1f1b", 2, 0), "n_microbatches must be an int >= 1, got 0"),
        (("gpipe", 2, True), "n_microbatches must be an int >= 1, got True"),
    ],
)
def test_builder_errors(args: tuple, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        build_schedule(*args)


GOLDEN_CASES = {
    "gpipe_p2_m4": ("gpipe", 2, 4, None),
    "1f1b_p4_m8": ("1f1b", 4, 8, None),
    "interleaved_p2_v2_m4": ("interleaved-1f1b", 2, 4, 4),
    "naive_p3": ("naive", 3, 1, None),
    "zbh1_p4_m8": ("zb-h1", 4, 8, None),
    "zbv_p2_m4": ("zbv", 2, 4, None),
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_golden(case: str, update_golden: bool) -> None:
    """Any change to a builder's lists shows up here as a readable diff.
    Refresh deliberately with UPDATE_GOLDEN=1 (or pytest --update-golden)."""
    s = build_schedule(*GOLDEN_CASES[case])
    for suffix, text in ((".schedule.txt", s.to_text()), (".grid.txt", s.grid() + "\n")):
        path = GOLDEN / (case + suffix)
        if update_golden:
            path.write_text(text)
        assert path.read_text() == text, f"{path.name} differs; rerun with UPDATE_GOLDEN=1 if intended"
    assert Schedule.from_text((GOLDEN / f"{case}.schedule.txt").read_text()) == s


def _edit(s: Schedule, rank: int, new: str) -> Schedule:
    acts = list(s.actions)
    acts[rank] = tuple(Action.parse(t) for t in new.split())
    return Schedule(s.name, s.n_ranks, s.n_stages, s.n_microbatches, tuple(acts))


def test_recv_before_peer_send_deadlocks() -> None:
    s = build_schedule("gpipe", 2, 1)
    assert " ".join(map(str, s.actions[0])) == "0F0 0SEND_F0 0RECV_B0 0B0"
    # Rank 0 now waits for the gradient before sending the activation rank 1 waits for.
    bad = _edit(s, 0, "0F0 0RECV_B0 0SEND_F0 0B0")
    with pytest.raises(
        ScheduleError, match=r"rank 0, step 1, action 0RECV_B0: waits for 1SEND_B0 from rank 1.*deadlock"
    ) as e:
        bad.validate()
    assert "[0RECV_B0]" in str(e.value) and "<-- rank 0" in str(e.value)
    assert "rank 1 step 0 (1RECV_F0)" in str(e.value)


def test_forward_before_its_input_arrives() -> None:
    s = build_schedule("1f1b", 2, 2)
    bad = _edit(s, 1, "1RECV_F0 1F0 1B0 1SEND_B0 1F1 1RECV_F1 1B1 1SEND_B1")
    with pytest.raises(ScheduleError, match=r"rank 1, step 4, action 1F1: uses micro-batch 1 before it arrives"):
        bad.validate()


@pytest.mark.parametrize(
    "rank, new, match",
    [
        (0, "0F0 0SEND_F0 0RECV_B0 0B0 0F0", r"step 4, action 0F0: runs twice"),
        (0, "0B0 0F0 0SEND_F0 0RECV_B0", r"step 0, action 0B0: needs forward 0F0 to have run first"),
        (0, "0F0 0SEND_F0 0B0", r"action 0B0: needs the gradient from stage 1: no 0RECV_B0"),
        (0, "0F0 0SEND_F0 0SEND_F0 0RECV_B0 0B0", r"step 2, action 0SEND_F0: sends the same message twice"),
        (0, "0F0 0SEND_F0 1F0 0RECV_B0 0B0", r"step 2, action 1F0: stage 1 lives on rank 1"),
        (0, "0F0 0SEND_F0 0RECV_B0 0B0 0SEND_B0", r"0SEND_B0: stage 0 has no neighbour stage -1"),
        (0, "0F0 0SEND_F0 0RECV_B0 0B0 0F5", r"0F5: stage must be in \[0, 2\) and micro-batch in \[0, 1\)"),
        (0, "0F0 0SEND_F0", r"rank 1, step 3, action 1SEND_B0: sent but never received"),
        (1, "1RECV_F0 1F0", r"rank 0, step 2, action 0RECV_B0: waits for 1SEND_B0"),
    ],
)
def test_validation_names_rank_step_action_and_rule(rank: int, new: str, match: str) -> None:
    with pytest.raises(ScheduleError, match=match):
        _edit(build_schedule("gpipe", 2, 1), rank, new).validate()


def test_missing_compute_is_reported() -> None:
    bad = _edit(build_schedule("gpipe", 1, 2), 0, "0F0 0F1 0B0")
    with pytest.raises(ScheduleError, match=r"never runs 0B1: every stage needs one forward and one backward"):
        bad.validate()


def test_split_backward_validates_and_w_needs_i() -> None:
    s = build_schedule("1f1b", 2, 2)
    split = [
        [b for a in rank for b in ([a._replace(kind="I"), a._replace(kind="W")] if a.kind == "B" else [a])]
        for rank in s.actions
    ]
    Schedule("1f1b-iw", 2, 2, 2, tuple(map(tuple, split))).validate()
    bad = _edit(build_schedule("gpipe", 1, 1), 0, "0F0 0W0 0I0")
    with pytest.raises(ScheduleError, match=r"action 0W0: weight grad needs input grad 0I0 first"):
        bad.validate()


def test_grid_marks_a_cell() -> None:
    s = build_schedule("gpipe", 2, 2)
    assert s.grid().splitlines()[0] == "        Rank 0 Rank 1"
    marked = s.grid(mark=(1, 1))  # step 1 of rank 1 is 1F0; rank 1 compute row 0
    assert marked.splitlines()[1] == "Step 0: 0F0    [1F0]  <-- rank 1"
    assert "[1RECV_F0]" in s.grid(mark=(1, 0), comms=True)


def test_registry_is_the_one_list_of_schedules() -> None:
    """API, CLI and interop read the registry: nothing keeps its own list."""
    import subprocess
    import sys

    from partitioner.api import _check_counts
    from partitioner.tools.cli import build_parser

    assert tuple(SCHEDULES) == ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zbv", "naive")
    parser = build_parser()
    plan = next(a for a in parser._subparsers._group_actions[0].choices["plan"]._actions if "--schedule" in a.option_strings)
    assert tuple(plan.choices) == (*SCHEDULES, "auto")
    for name, spec in SCHEDULES.items():
        _check_counts(2, spec.default_stages_per_rank, name, 4)  # each accepted by the API at its defaults
        s = build_schedule(name, 2, 4)
        assert s.n_stages == 2 * spec.default_stages_per_rank and s.placement == spec.placement
    out = subprocess.run([sys.executable, "-c", "import sys, partitioner.schedule; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the registry is pure Python


def test_zero_bubble_shrinks_the_bubble_at_1f1b_memory() -> None:
    """Unit times (F = 1, B = 2 = I + W): zb-h1 beats 1f1b and keeps every rank's
    micro-batches in flight (forward done, W not yet) at most p, 1F1B's peak; zbv beats
    interleaved-1f1b. The paper's ZB-H1 bubble is (p-1)(F+I-W) = p-1 units per rank;
    1F1B's is (p-1)(F+B) = 3(p-1)."""
    from partitioner.simulator import simulate

    for p, m in ((2, 4), (4, 8), (4, 16)):
        one = simulate(build_schedule("1f1b", p, m), [1.0] * p, [2.0] * p)
        zb = simulate(build_schedule("zb-h1", p, m), [1.0] * p, [2.0] * p)
        assert zb.step_time < one.step_time
        # the greedy order comes within 2 units of the paper's handcrafted ZB-H1 (bubble p-1)
        assert zb.step_time <= 3 * m + (p - 1) + 2
        assert max(zb.peak_inflight) == max(one.peak_inflight) == p
        inter = simulate(build_schedule("interleaved-1f1b", p, m), [0.5] * 2 * p, [1.0] * 2 * p)
        v = simulate(build_schedule("zbv", p, m), [0.5] * 2 * p, [1.0] * 2 * p)
        assert v.step_time < inter.step_time


def test_v_placement_round_trips_and_is_checked() -> None:
    s = build_schedule("zbv", 3, 4)
    assert [s.rank_of(i) for i in range(6)] == [0, 1, 2, 2, 1, 0]
    assert "placement=v" in s.to_text().splitlines()[0]
    assert Schedule.from_text(s.to_text()) == s
    with pytest.raises(ScheduleError, match="placement 'v' needs n_stages == 2 \\* n_ranks"):
        Schedule("x", 2, 2, 1, ((), ()), "v")
    with pytest.raises(ScheduleError, match=r"zbv needs n_stages == 2 \* n_ranks \(2 != 4\)"):
        build_schedule("zbv", 2, 4, 2)
