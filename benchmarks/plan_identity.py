"""Plans must not change when the planner is reorganised or made faster: write every case's
plan JSON (``plan.to_json()``, the exact bytes ``Plan.save`` writes) into a folder, then
compare two folders.

Cases: every test fixture (``tests/fixtures/models.py``) at 2 and 4 stages and under option
variants (schedules, objectives, recompute, data parallelism, ZeRO-1, nodes, automatic
schedule / micro-batches / replicas, no example inputs, a plan re-applied from its JSON);
the Hugging Face zoo of ``tests/hf`` at 2 and 4 stages (skipped without transformers); and
the benchmarks' models (the 10,000-node MLP into 64 stages, the quality figure's GPTs, the
balance benchmark's GPT-2 and Llama with ``cut_at`` and pinned cuts). A refusal is a result
too: it is written as ``<case>.error`` (exception type and message) and compared the same way.

    PYTHONPATH=. .venv/bin/python benchmarks/plan_identity.py OUT_DIR [--only GLOB ...]
    PYTHONPATH=. .venv/bin/python benchmarks/plan_identity.py --compare BEFORE AFTER
    PYTHONPATH=. .venv/bin/python benchmarks/plan_identity.py OUT_DIR --joint --only 'joint-*'

``--compare`` prints each differing case with the first JSON path where the two differ,
cases present on one side only, and exits 1 when anything differs. Fields a plan gained
after a baseline was written (``ADDED``: ``routes``, with plan version 4) are left out of
the comparison together with ``version``, so a baseline from before them stays valid; the
rest of each file must still match byte for byte. The full set (220 cases,
10 of them refusals) takes about 10 CPU-minutes, most of it the zoo's captures; ``--only``
with a few globs (``'mlp.*' 'zoo-vit.*'``) checks a change in seconds. ``--joint`` adds the joint
layout search's cases (``JOINT_VARIANTS`` on every fixture, ``joint-*``): write both folders
with it (a baseline from before them lacks them).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
import warnings
from typing import Any, Callable, Iterator

import torch

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from partitioner import load_plan, partition  # noqa: E402
from tests.fixtures.models import FIXTURES  # noqa: E402

#: fixture variants: name → partition() keyword arguments (on top of the fixture's inputs)
VARIANTS: dict[str, dict[str, Any]] = {
    "pp2": dict(n_gpus=2),
    "pp4": dict(n_gpus=4),
    "interleaved": dict(n_gpus=2, schedule="interleaved-1f1b", virtual_stages=2, n_microbatches=2),
    "zbh1-step": dict(n_gpus=2, schedule="zb-h1", n_microbatches=4, objective="step"),
    "zbv": dict(n_gpus=2, schedule="zbv", n_microbatches=4),
    "gpipe": dict(n_gpus=4, schedule="gpipe", n_microbatches=2),
    "a100-full-bottleneck": dict(n_gpus=4, device="a100-80gb", link="pcie4", recompute="full",
                                 objective="bottleneck"),
    "recompute-selective": dict(n_gpus=2, recompute="selective", precision="bf16-mixed", optimizer="sgd"),
    "tight-memory": dict(n_gpus=2, memory_limit=40_000),
    "sched-auto": dict(n_gpus=2, schedule="auto"),
    "micro-auto": dict(n_gpus=2, n_microbatches="auto"),
    "dp2": dict(n_gpus=4, data_parallel=2),
    "dp2-zero1": dict(n_gpus=4, data_parallel=2, zero=1),
    "dp-auto": dict(n_gpus=4, data_parallel="auto"),
    "nodes": dict(n_gpus=4, data_parallel=2, gpus_per_node=2),
    "nodes-pp": dict(n_gpus=4, gpus_per_node=2, inter_link="ib-ndr-400"),
}


def _fixture_cases() -> Iterator[tuple[str, Callable[[], Any]]]:
    for name, fx in sorted(FIXTURES.items()):
        def model_and_inputs(fx: Any = fx) -> tuple[Any, Any, Any]:
            torch.manual_seed(0)
            return fx.build(), fx.inputs(), fx.kwargs() or None

        for variant, kw in VARIANTS.items():
            def run(mi: Any = model_and_inputs, kw: dict[str, Any] = kw) -> Any:
                model, args, kwargs = mi()
                return partition(model, example_inputs=args, example_kwargs=kwargs, **kw).plan

            yield f"{name}.{variant}", run

        def no_inputs(mi: Any = model_and_inputs) -> Any:
            model, _, _ = mi()
            return partition(model, n_gpus=2).plan

        def reapplied(mi: Any = model_and_inputs) -> Any:
            model, args, kwargs = mi()
            plan = partition(model, n_gpus=4, example_inputs=args, example_kwargs=kwargs, schedule="zb-h1",
                             n_microbatches=4).plan
            return load_plan(plan.to_json()).apply(model).plan

        def reapplied_dp(mi: Any = model_and_inputs) -> Any:
            model, args, kwargs = mi()
            plan = partition(model, n_gpus=4, example_inputs=args, example_kwargs=kwargs, data_parallel=2,
                             zero=1, gpus_per_node=2).plan
            return load_plan(plan.to_json()).apply(model).plan

        def squeezed(mi: Any = model_and_inputs) -> Any:
            """Memory 10% under the unconstrained plan's fullest stage: the exact-memory loop and
            recompute="auto" at work."""
            model, args, kwargs = mi()
            plan = partition(model, n_gpus=2, example_inputs=args, example_kwargs=kwargs).plan
            limit = int(0.9 * max(st.cost.memory_bytes for st in plan.stages))
            return partition(model, n_gpus=2, example_inputs=args, example_kwargs=kwargs, memory_limit=limit).plan

        yield f"{name}.no-inputs", no_inputs
        yield f"{name}.squeezed", squeezed
        yield f"{name}.apply", reapplied
        yield f"{name}.apply-dp", reapplied_dp


#: the joint layout search (``zero="auto"``, ``layout.joint``) on the fixtures: ``--joint`` adds these
#: cases (``joint-<fixture>.<variant>``), which baselines written before them do not have
JOINT_VARIANTS: dict[str, dict[str, Any]] = {
    "all-auto": dict(n_gpus=4, data_parallel="auto", zero="auto", schedule="auto", n_microbatches="auto",
                     optimizer="adamw"),
    "tp-auto": dict(n_gpus=4, data_parallel="auto", zero="auto", tensor_parallel="auto", optimizer="adamw",
                    precision="bf16-mixed"),
    "nodes-tight": dict(n_gpus=8, data_parallel="auto", zero="auto", schedule="auto", gpus_per_node=4,
                        inter_link="ib-ndr-400", optimizer="adamw", memory_limit=400_000),
}


def _joint_cases() -> Iterator[tuple[str, Callable[[], Any]]]:
    for name, fx in sorted(FIXTURES.items()):
        for variant, kw in JOINT_VARIANTS.items():
            def run(fx: Any = fx, kw: dict[str, Any] = kw) -> Any:
                torch.manual_seed(0)
                return partition(fx.build(), example_inputs=fx.inputs(), example_kwargs=fx.kwargs() or None,
                                 **kw).plan

            yield f"joint-{name}.{variant}", run


def _zoo_cases() -> Iterator[tuple[str, Callable[[], Any]]]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed: the Hugging Face zoo is skipped", file=sys.stderr)
        return
    from tests.hf.zoo import ZOO

    for name in sorted(ZOO):
        for n in (2, 4):
            def run(name: str = name, n: int = n) -> Any:
                torch.manual_seed(0)
                model = ZOO[name].build()
                return partition(model, n, ZOO[name].inputs(), device="cpu", link="loopback").plan

            yield f"zoo-{name}.pp{n}", run


def _bench_cases() -> Iterator[tuple[str, Callable[[], Any]]]:
    def mlp10k() -> Any:
        from benchmarks.partition_bench import DeepMLP

        torch.manual_seed(0)
        return partition(DeepMLP(2500), n_gpus=64, example_inputs=(torch.randn(8, 64),), device="a100-80gb",
                         link="pcie4", schedule="gpipe", n_microbatches=8).plan

    yield "bench-mlp10k.pp64", mlp10k

    def gpt_quality(n: int) -> Callable[[], Any]:
        def run() -> Any:
            from partitioner.examples import gpt_example

            torch.manual_seed(0)
            model, (idx,) = gpt_example(batch=32, seq=64, n_layer=12, n_embd=256, n_head=8, vocab_size=8192,
                                        block_size=64)
            return partition(model, n_gpus=n, example_inputs=(idx,), device="a100-80gb", link="nvlink4").plan
        return run

    yield "bench-gpt12x256.pp4", gpt_quality(4)
    yield "bench-gpt12x256.pp8", gpt_quality(8)

    def gpt2_small_meta() -> Any:
        from partitioner.examples import gpt_example

        with torch.device("meta"):
            big, (idx,) = gpt_example(batch=32, seq=1024, n_layer=12, n_embd=768, n_head=12, vocab_size=50257,
                                      block_size=1024)
        return partition(big, n_gpus=4, example_inputs=(idx,), device="a100-80gb", link="nvlink4").plan

    yield "bench-gpt2small-meta.pp4", gpt2_small_meta
    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    for bench_name in ("gpt2", "llama"):
        def blocks(bench_name: str = bench_name) -> Any:
            from benchmarks._models import BENCHES, MICRO, N_STAGES, M

            b = BENCHES[bench_name]()
            return partition(b.model, N_STAGES, b.inputs(MICRO * M), n_microbatches=M, cut_at=b.blocks,
                             device="cpu", link="loopback").plan

        def pinned(bench_name: str = bench_name) -> Any:
            from benchmarks._models import BENCHES, MICRO, N_STAGES, M, bounds_to_pins

            b = BENCHES[bench_name]()
            pins = bounds_to_pins(b, [0, 4, 8, 11, len(b.layers)])
            return partition(b.model, N_STAGES, b.inputs(MICRO * M), n_microbatches=M, pinned_cuts=pins,
                             device="cpu", link="loopback").plan

        yield f"bench-{bench_name}.cut-at", blocks
        yield f"bench-{bench_name}.pinned", pinned


def cases(joint: bool = False) -> Iterator[tuple[str, Callable[[], Any]]]:
    """Every case: (name, a thunk returning its Plan); ``joint``: the joint search's too."""
    yield from _fixture_cases()
    yield from _zoo_cases()
    yield from _bench_cases()
    if joint:
        yield from _joint_cases()


def write_plans(out: str, only: list[str] | None = None, *, verbose: bool = True, joint: bool = False) -> list[str]:
    """Write each case's plan JSON (``<case>.json``) or refusal (``<case>.error``) into ``out``;
    ``only``: glob patterns of case names; ``joint``: with the joint search's cases. Returns
    the names written."""
    os.makedirs(out, exist_ok=True)
    written = []
    for name, run in cases(joint):
        if only and not any(fnmatch.fnmatchcase(name, p) for p in only):
            continue
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                text, ext = run().to_json(), "json"
            except Exception as e:  # noqa: BLE001 - a refusal is a result too, and must stay the same
                text, ext = f"{type(e).__name__}: {e}\n", "error"
        with open(os.path.join(out, f"{name}.{ext}"), "w", encoding="utf-8", newline="") as f:
            f.write(text)
        written.append(name)
        if verbose:
            print(f"{name}: {ext} ({time.perf_counter() - t0:.2f} s)", flush=True)
    return written


#: plan fields added since baselines were written (each with a plan version bump): ``compare``
#: leaves them and ``version`` out, so an older baseline still checks everything else
ADDED = ("routes",)


def without_added(text: bytes) -> bytes:
    """A plan file's bytes with the ``ADDED`` fields and ``version`` left out, written back the
    way ``Plan.to_json`` writes (sorted keys, indent 1). Anything that is not JSON in that
    exact form (an ``.error`` file, hand-formatted JSON) is returned as it is, so a difference
    in bytes alone still shows."""
    try:
        data = json.loads(text)
    except ValueError:
        return text
    if not isinstance(data, dict) or (json.dumps(data, indent=1, sort_keys=True) + "\n").encode() != text:
        return text
    for key in (*ADDED, "version"):
        data.pop(key, None)
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def first_difference(a: Any, b: Any, path: str = "$") -> str | None:
    """The first JSON path where ``a`` and ``b`` differ (None: equal)."""
    if type(a) is not type(b):
        return path
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k}"
            hit = first_difference(a[k], b[k], f"{path}.{k}")
            if hit:
                return hit
        return None
    if isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b)):
            hit = first_difference(x, y, f"{path}[{i}]")
            if hit:
                return hit
        return f"{path}[{min(len(a), len(b))}]" if len(a) != len(b) else None
    return None if a == b else path


def compare(before: str, after: str) -> list[str]:
    """One line per case whose bytes differ between the folders (or that one side lacks)."""
    def listing(d: str) -> dict[str, str]:
        return {f.rsplit(".", 1)[0]: f for f in os.listdir(d) if f.endswith((".json", ".error"))}

    a, b = listing(before), listing(after)
    out = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            out.append(f"{name}: only in {before if name in a else after}")
            continue
        with open(os.path.join(before, a[name]), "rb") as f:
            x = f.read()
        with open(os.path.join(after, b[name]), "rb") as f:
            y = f.read()
        x, y = without_added(x), without_added(y)
        if x == y:
            continue
        if a[name] != b[name]:
            out.append(f"{name}: {a[name]} vs {b[name]}")
        elif a[name].endswith(".error"):
            out.append(f"{name}: the refusal differs: {x.decode().strip()[:200]!r} vs {y.decode().strip()[:200]!r}")
        else:
            try:
                where = first_difference(json.loads(x), json.loads(y)) or "bytes only (same JSON values)"
            except ValueError:
                where = "not JSON"
            out.append(f"{name}: differs at {where}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", help="folder to write the plans into")
    ap.add_argument("--only", nargs="*", default=None, help="glob patterns of case names (e.g. 'mlp.*')")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two folders")
    ap.add_argument("--list", action="store_true", help="print the case names")
    ap.add_argument("--joint", action="store_true",
                    help="add the joint layout search's cases (joint-*; not in baselines written before them)")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(name for name, _ in cases(args.joint)))
        return 0
    if args.compare:
        diffs = compare(*args.compare)
        n = len({f.rsplit(".", 1)[0] for d in args.compare for f in os.listdir(d)
                 if f.endswith((".json", ".error"))})
        for line in diffs:
            print(line)
        print(f"{n} cases compared, {len(diffs)} differ")
        return 1 if diffs else 0
    if not args.out:
        ap.error("give an output folder or --compare BEFORE AFTER")
    t0 = time.perf_counter()
    names = write_plans(args.out, args.only, joint=args.joint)
    print(f"{len(names)} cases written to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
