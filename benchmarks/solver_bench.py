"""Time ``partitioner.solver.solve`` on a synthetic 10,000-position, 64-stage instance.

Run: ``.venv/bin/python benchmarks/solver_bench.py [--n 10000] [--stages 64]``.
Prints the best-of-3 solve time and the bottleneck against the lower bound.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--stages", type=int, default=64)
    args = parser.parse_args()
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
