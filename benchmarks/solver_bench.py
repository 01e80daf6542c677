"""Time ``partitioner.solver.solve`` on a synthetic 10,000-position, 64-stage instance.

Run: ``.venv/bin/python benchmarks/solver_bench.py [--n 10000] [--stages 64]``.
Prints the best-of-3 solve time and the bottleneck against the lower bound.

``--mlp``: the search of ``benchmarks/partition_bench.py``'s instance (the 2,500-layer MLP,
10,000 nodes, 64 stages, A100 + PCIe 4, GPipe m=8) captured from ``partition()``: solve +
refine as ``partitioner.search.search`` runs them, now and at commit 2cec17e (before the issue 8 item 7
work, loaded from git), side by side in one run, best of 3 each, and whether the answers agree.
"""

from __future__ import annotations

import argparse
import random
import time

from partitioner.solver import SolverInput, solve

__all__: list[str] = []


def build(n: int, S: int, seed: int = 0) -> SolverInput:
    rng = random.Random(seed)
    # Transformer-like mix: most positions are cheap (views, norms), some are matmuls.
    compute = [rng.choice((0, 2_000, 5_000)) if rng.random() < 0.7 else
               rng.randint(50_000, 400_000) for _ in range(n)]  # ns
    cut_bytes = [0] + [rng.randint(1, 64) * 2**20 for _ in range(n - 1)] + [0]
    cut_cost = [0] + [b // 25_000 for b in cut_bytes[1:-1]] + [0]  # ns at ~25 GB/s
    allowed = [True] + [rng.random() < 0.6 for _ in range(n - 1)] + [True]
    static = [rng.randint(0, 8) * 2**20 if c > 10_000 else 0 for c in compute]
    act = [rng.randint(0, 4) * 2**20 for _ in range(n)]
    inflight = [S - i for i in range(S)]  # 1F1B
    need = [sum(static) / S + inflight[i] * sum(act) / S for i in range(S)]
    capacity = [int(1.5 * x) + 2**30 for x in need]
    return SolverInput(compute, cut_cost, cut_bytes, allowed, static, act, inflight,
                       capacity, pinned=(sorted(k for k in range(1, n) if allowed[k])[n // 4],))


def _old_modules() -> tuple[object, object]:
    """solver and refine as of commit 2cec17e, loaded from git into private modules."""
    import importlib.util
    import subprocess
    import sys
    import types

    mods = []
    for name in ("solver", "refine"):
        src = subprocess.run(["git", "show", f"2cec17e:partitioner/{name}.py"], capture_output=True, text=True,
                             check=True).stdout
        if name == "refine":
            src = src.replace("from partitioner.solver import", "from _old_solver import")
        mod = types.ModuleType(f"_old_{name}")
        sys.modules[f"_old_{name}"] = mod
        exec(compile(src, f"2cec17e:partitioner/{name}.py", "exec"), mod.__dict__)  # noqa: S102 - our own history
        mods.append(mod)
    assert importlib.util is not None
    return mods[0], mods[1]


def mlp_search() -> None:
    from dataclasses import replace

    import torch

    import partitioner.search as search
    from partitioner import partition
    from partitioner.refine import refine

    sys_path_bench()
    from partition_bench import DeepMLP

    got: dict[str, SolverInput] = {}
    real = search.search_cuts

    def spy(prob, sin):  # type: ignore[no-untyped-def]
        got["sin"] = sin
        return real(prob, sin)

    search.search_cuts = spy
    try:
        partition(DeepMLP(2500), n_gpus=64, example_inputs=(torch.randn(8, 64),), device="a100-80gb", link="pcie4",
                  schedule="gpipe", n_microbatches=8)
    finally:
        search.search_cuts = real
    sin = got["sin"]
    base = sin.choices()[0]  # what search.search solves first: memory free, no recompute option
    free = replace(sin, options=[], compute=base.compute, act_mem=base.act_mem, capacity=[2**60] * len(sin.capacity))
    old_solver, old_refine = _old_modules()
    old_free = old_solver.SolverInput(**{k: v for k, v in free.__dict__.items()  # type: ignore[attr-defined]
                                         if k not in ("avoid", "has_compute")})
    rows = {}
    for label, run in (("now", lambda: refine(free, 64, solve(free, 64))),
                       ("2cec17e", lambda: old_refine.refine(old_free, 64, old_solver.solve(old_free, 64)))):  # type: ignore[attr-defined]
        best, sol = float("inf"), None
        for _ in range(3):
            t0 = time.perf_counter()
            sol = run()
            best = min(best, time.perf_counter() - t0)
        rows[label] = (best, sol)
    (t_new, new), (t_old, old) = rows["now"], rows["2cec17e"]
    print(f"search (solve + refine) of the 10,000-node MLP into 64 stages, best of 3: now {t_new:.3f} s, "
          f"at 2cec17e {t_old:.3f} s ({t_old / t_new:.1f}x)")
    print(f"bottleneck now {new.bottleneck} ps, before {old.bottleneck} ps (equal: {new.bottleneck == old.bottleneck}); "
          f"sorted stage times now {sorted(new.stage_times, reverse=True)[:3]}..., "
          f"before {sorted(old.stage_times, reverse=True)[:3]}...")


def sys_path_bench() -> None:
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--stages", type=int, default=64)
    parser.add_argument("--mlp", action="store_true", help="time the search of partition_bench's MLP, now vs before")
    args = parser.parse_args()
    if args.mlp:
        mlp_search()
        return
    inp = build(args.n, args.stages)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        sol = solve(inp, args.stages)
        times.append(time.perf_counter() - t0)
    gap = (sol.bottleneck - sol.lower_bound) / sol.lower_bound
    print(f"n={args.n} stages={args.stages}: best of 3 {min(times) * 1e3:.1f} ms "
          f"(all: {', '.join(f'{t * 1e3:.1f}' for t in times)} ms)")
    print(f"bottleneck {sol.bottleneck} ns, lower bound {sol.lower_bound} ns "
          f"(+{gap:.2%}), optimal={sol.optimal}, cut bytes {sol.total_cut_bytes / 2**20:.0f} MiB, "
          f"peak stage memory {max(sol.stage_mem) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
