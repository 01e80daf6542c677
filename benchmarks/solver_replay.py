"""Record the cut solver's calls during one joint layout search, then replay them against two
versions of ``partitioner/solver.py``: the CPU time of each, and whether every answer agrees.

    PYTHONPATH=. .venv/bin/python benchmarks/solver_replay.py record calls.pkl -- --model 70b --gpus 16 --layers 24
    PYTHONPATH=. .venv/bin/python benchmarks/solver_replay.py compare calls.pkl old_solver.py partitioner/solver.py

``record`` runs ``benchmarks/joint_profile.py`` (the arguments after ``--``) with the solver's
uncached bodies (``_solve``, ``_min_cost_at``, ``_feasible``: what runs on a memo miss) wrapped,
and pickles each call's input and answer (a refusal as its message and closest split).
``compare`` loads both solver files as separate modules and runs every recorded call on each,
alternating call by call so that both see the same machine load; it prints CPU-seconds per
kind and the number of calls whose answers differ (a ``Solution`` compared field by field).
An old version to compare with: ``git show REV:partitioner/solver.py > old_solver.py``.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import importlib.util
import os
import pickle
import runpy
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("solve", "min_cost_at", "feasible")


def record(out: str, args: list[str]) -> None:
    import partitioner.solver as S

    calls: list[Any] = []

    def wrap(kind: str, fn: Any) -> Any:
        def recorded(*a: Any, **k: Any) -> Any:
            try:
                answer = fn(*a, **k)
            except S.InfeasibleError as e:
                calls.append((kind, a, k, ("refused", (str(e), getattr(e, "closest", None)))))
                raise
            calls.append((kind, a, k, ("ok", answer)))
            return answer
        return recorded

    for kind in KINDS:
        setattr(S, "_" + kind, wrap(kind, getattr(S, "_" + kind)))
    atexit.register(lambda: pickle.dump(calls, open(out, "wb")))
    sys.argv = ["joint_profile.py", *args]
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "joint_profile.py"), run_name="__main__")


def _load(path: str, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _answer(M: Any, kind: str, a: Any, k: Any) -> Any:
    try:
        r = getattr(M, "_" + kind)(*a, **k)
    except M.PartitionError as e:
        return ("refused", str(e), getattr(e, "closest", None))
    return ("ok", dataclasses.astuple(r) if dataclasses.is_dataclass(r) else r)


def compare(calls_file: str, a_path: str, b_path: str) -> None:
    A, B = _load(a_path, "solver_a"), _load(b_path, "solver_b")
    calls = pickle.load(open(calls_file, "rb"))
    cpu: collections.Counter[tuple[str, str]] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    differ = 0
    for kind, a, k, _ in calls:
        got = []
        for tag, M in (("A", A), ("B", B)):
            t = time.process_time()
            got.append(_answer(M, kind, a, k))
            cpu[tag, kind] += time.process_time() - t
        count[kind] += 1
        differ += got[0] != got[1]
    for kind in KINDS:
        if count[kind]:
            print(f"{kind}: {count[kind]} calls, A {cpu['A', kind]:.2f} CPU-s, B {cpu['B', kind]:.2f} CPU-s")
    print(f"total: A {sum(v for (t, _), v in cpu.items() if t == 'A'):.2f}, "
          f"B {sum(v for (t, _), v in cpu.items() if t == 'B'):.2f} CPU-s; answers differ in {differ} calls")


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "record":
        rest = sys.argv[3:]
        record(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest)
    elif len(sys.argv) == 5 and sys.argv[1] == "compare":
        compare(*sys.argv[2:5])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
