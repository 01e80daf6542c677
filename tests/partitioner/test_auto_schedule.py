"""schedule="auto" / n_microbatches="auto": the predicted-fastest candidate that fits memory,
with the ranking in the plan's notes (what ``partitioner plan --explain`` prints)."""

from __future__ import annotations

import functools
import re

import pytest

from partitioner import partition
from partitioner.api import AUTO_NOTE
from partitioner.examples import quickstart
from partitioner.solver import InfeasibleError


@functools.cache
def _model():  # type: ignore[no-untyped-def]
    return quickstart()


def _ranking(plan) -> list[tuple[str, int, float]]:  # type: ignore[no-untyped-def]
    out = []
    for note in plan.notes:
        hit = re.fullmatch(rf"{AUTO_NOTE} #\d+ (\S+) m=(\d+): predicted step ([\d.e+-]+) ms", note)
        if hit:
            out.append((hit[1], int(hit[2]), float(hit[3]) * 1e-3))
    return out


def test_auto_picks_the_fastest_candidate_and_records_the_ranking() -> None:
    model, inputs = _model()
    pipe = partition(model, n_gpus=2, example_inputs=inputs, schedule="auto", n_microbatches="auto", device="cpu")
    ranking = _ranking(pipe.plan)
    batch = inputs[0].shape[0]
    names = {n for n, _, _ in ranking}
    assert names == {"gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zbv"}
    assert {m for _, m, _ in ranking} == {d for d in range(1, batch + 1) if batch % d == 0}
    assert [t for *_, t in ranking] == sorted(t for *_, t in ranking)
    best, m, t = ranking[0]
    p = pipe.plan.prediction
    assert (p.schedule, p.n_microbatches) == (best, m)
    assert p.step_time_s == pytest.approx(t, rel=1e-3)  # notes print 4 digits
    # the same plan as asking for that schedule and m directly (no drift between the two paths)
    direct = partition(model, n_gpus=2, example_inputs=inputs, schedule=best, n_microbatches=m, device="cpu")
    assert direct.plan.prediction == p
    assert [st.nodes for st in direct.plan.stages] == [st.nodes for st in pipe.plan.stages]
    # and every other candidate predicts no faster when solved on its own
    for name, mm, tt in ranking[1:4]:
        other = partition(model, n_gpus=2, example_inputs=inputs, schedule=name, n_microbatches=mm, device="cpu")
        assert other.plan.prediction.step_time_s >= p.step_time_s
        assert other.plan.prediction.step_time_s == pytest.approx(tt, rel=1e-3)


def test_auto_leaves_out_what_does_not_fit_memory() -> None:
    model, inputs = _model()
    kw = dict(n_gpus=2, example_inputs=inputs, n_microbatches=8, device="cpu", recompute="none")
    need = {s: max(st.cost.memory_bytes for st in partition(model, schedule=s, **kw).plan.stages)
            for s in ("gpipe", "1f1b")}
    assert need["gpipe"] > need["1f1b"]  # gpipe keeps 8 micro-batches in flight, 1f1b at most 2
    limit = (need["gpipe"] + need["1f1b"]) // 2
    pipe = partition(model, schedule="auto", memory_limit=limit, **kw)
    assert pipe.plan.prediction.schedule != "gpipe"
    assert "gpipe" not in {n for n, _, _ in _ranking(pipe.plan)}
    assert any(n.startswith(f"{AUTO_NOTE} -- gpipe m=8: does not fit") for n in pipe.plan.notes)
    with pytest.raises(InfeasibleError):
        partition(model, schedule="gpipe", memory_limit=limit, **kw)
    with pytest.raises(InfeasibleError, match="no candidate"):
        partition(model, schedule="auto", memory_limit=need["1f1b"] // 4, **kw)


def test_auto_plan_records_the_choice_and_reapplies() -> None:
    import json

    from partitioner import load_plan

    model, inputs = _model()
    pipe = partition(model, n_gpus=2, example_inputs=inputs, schedule="1f1b", n_microbatches="auto", device="cpu")
    assert pipe.plan.options["n_microbatches"] == pipe.plan.prediction.n_microbatches
    assert pipe.plan.options["schedule"] == "1f1b"
    again = load_plan(json.loads(pipe.plan.to_json())).apply(model)
    assert again.plan.to_json() == pipe.plan.to_json()


def test_cli_explain_prints_the_ranking(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from partitioner.tools.cli import main

    out = tmp_path / "p.json"
    assert main(["plan", "partitioner.examples:quickstart", "--gpus", "2", "--device", "cpu", "--schedule", "auto",
                 "--microbatches", "4", "-o", str(out), "--quiet", "--explain"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("automatic choice: picked ")
    rows = [ln for ln in text.splitlines() if ln.startswith("  #")]
    assert len(rows) == 5 and {r.split()[1] for r in rows} == {"gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zbv"}
    with pytest.raises(SystemExit):
        main(["plan", "partitioner.examples:quickstart", "--microbatches", "x", "-o", str(out)])
    assert "expected an integer or 'auto'" in capsys.readouterr().err


def test_partition_accepts_a_schedule_object() -> None:
    from partitioner.schedule import Schedule, build_schedule

    model, inputs = _model()
    by_name = partition(model, n_gpus=2, example_inputs=inputs, schedule="zb-h1", n_microbatches=4, device="cpu")
    obj = build_schedule("zb-h1", 2, 4)
    by_obj = partition(model, n_gpus=2, example_inputs=inputs, schedule=obj, device="cpu")
    assert by_obj.plan.to_json() == by_name.plan.to_json()
    # a hand-written list: priced and recorded under its own name
    text = obj.to_text().replace("schedule zb-h1", "schedule mine")
    mine = Schedule.from_text(text)
    pipe = partition(model, n_gpus=2, example_inputs=inputs, schedule=mine, device="cpu")
    assert pipe.plan.prediction.schedule == "mine" and pipe.plan.prediction.n_microbatches == 4
    assert pipe.plan.prediction.step_time_s == by_name.plan.prediction.step_time_s
    with pytest.raises(Exception, match="is for 2 ranks and 2 stages"):
        partition(model, n_gpus=4, example_inputs=inputs, schedule=mine, device="cpu")
    with pytest.raises(Exception, match="n_microbatches=8 but schedule 'mine' has 4"):
        partition(model, n_gpus=2, example_inputs=inputs, schedule=mine, n_microbatches=8, device="cpu")


def test_a_hand_written_schedule_round_trips_through_the_plan_file() -> None:
    """The plan stores a hand-written schedule's action lists (options.schedule_text, data): it
    loads, re-applies byte-identically and runs by its name; a damaged copy is refused with its
    path, and a built-in name on lists that are not the builder's is refused at partition()."""
    import copy
    import dataclasses
    import json

    import torch

    from partitioner import PlanError, load_plan
    from partitioner.schedule import Schedule, build_schedule

    model, inputs = _model()
    zb = build_schedule("zb-h1", 2, 4)
    mine = Schedule.from_text(zb.to_text().replace("schedule zb-h1", "schedule mine"))
    pipe = partition(model, n_gpus=2, example_inputs=inputs, schedule=mine, device="cpu")
    j = pipe.plan.to_json()
    assert json.loads(j)["options"]["schedule_text"] == mine.to_text()
    plan = load_plan(j)
    again = plan.apply(model)
    assert again.plan.to_json() == j
    (x,) = inputs
    y = torch.randn_like(model(x))
    loss_fn = torch.nn.functional.mse_loss
    # runs by name with the stored lists, like the object itself
    a = again.train_step(x, target=y, loss_fn=loss_fn, schedule="mine")
    b = again.train_step(x, target=y, loss_fn=loss_fn, schedule=mine)
    assert torch.allclose(a, b)
    with pytest.raises(Exception, match="hand-written for 4 micro-batches, not 2"):
        again.train_step(x, target=y, loss_fn=loss_fn, schedule="mine", n_microbatches=2)
    # a V-placed hand-written schedule: stage ranks are checked against its own placement
    myv = Schedule.from_text(build_schedule("zbv", 2, 4, 4).to_text().replace("schedule zbv", "schedule myv"))
    vj = partition(model, n_gpus=2, example_inputs=inputs, schedule=myv, device="cpu").plan.to_json()
    assert [st["rank"] for st in json.loads(vj)["stages"]] == [0, 1, 1, 0]
    assert load_plan(vj).apply(model).plan.to_json() == vj
    # a built-in schedule given as an object records no lists (the name rebuilds them)
    by_obj = partition(model, n_gpus=2, example_inputs=inputs, schedule=zb, device="cpu").plan
    assert "schedule_text" not in json.loads(by_obj.to_json())["options"]
    d = json.loads(j)
    for bad, match in ((d["options"]["schedule_text"].replace("0F3", "0F2", 1), "not valid"),
                       (d["options"]["schedule_text"].replace("microbatches=4", "microbatches=2"), "not valid|microbatches"),
                       (d["options"]["schedule_text"].replace("schedule mine", "schedule yours"), "has name 'yours'")):
        e = copy.deepcopy(d)
        e["options"]["schedule_text"] = bad
        with pytest.raises(PlanError, match=match) as info:
            load_plan(json.dumps(e))
        assert "$.options.schedule_text" in str(info.value) or info.value.path == "$.options.schedule_text"
    e = copy.deepcopy(d)
    del e["options"]["schedule_text"]
    with pytest.raises(PlanError, match="unknown schedule 'mine'.*schedule_text"):
        load_plan(json.dumps(e))
    fake = dataclasses.replace(build_schedule("1f1b", 2, 4), name="zb-h1")  # valid lists, not zb-h1's
    with pytest.raises(Exception, match="named 'zb-h1', a built-in schedule.*own name"):
        partition(model, n_gpus=2, example_inputs=inputs, schedule=fake, device="cpu")
