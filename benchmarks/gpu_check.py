"""The runtime on real GPUs, in one script: every schedule, bf16-mixed, eager and compiled,
predicted against measured; and the NCCL path with 64 MiB activations on 2+ GPUs.

Run on a CUDA machine: ``python benchmarks/gpu_check.py [--out gpu_check.json]`` (about 3-6
minutes on one H100; ``--quick`` for a smaller model). ``--smoke`` runs the same code on the CPU
with tiny shapes (gloo ranks matching in NCCL's order stand in for NCCL), which CI does so the
script cannot rot between the sessions that have a GPU.

Part 1, one device, one process (``pipe.train_step(..., comm="nccl")``: every rank's lists on
the device, messages under NCCL's rules): a Llama-shaped model in bf16 (``precision`` is then
``"bf16-mixed"``), planned for 4 pipeline ranks on the card's profile, for gpipe, 1f1b,
interleaved-1f1b, zb-h1 and zbv, eager and (where the schedule allows) compiled. Reported:
- per stage, forward and backward of one micro-batch timed with CUDA events (median of 5)
  against the plan's ``fwd_time_s`` / ``bwd_time_s`` (the cost model's prediction);
- per stage, the activation memory of the plan's in-flight micro-batches, measured as
  ``torch.cuda.max_memory_allocated`` above the stage's weights and gradients, against the
  plan's ``saved_bytes`` x in-flight (+ recompute transient); weights + gradients measured
  against the plan's bf16 bytes;
- per schedule, the step's wall time in one process (the ranks' work serialised on one
  device, so about the sum of stage times, not the pipelined step) and the plan's predicted
  pipelined step, with the loss (finite, equal eager vs compiled within bf16 tolerance).

Calibration (``partitioner.calibrate.calibrate_curves``, about ``--calibrate-budget`` seconds):
the card's efficiency curves (matmuls per dtype, flash attention, bandwidth, launch floor,
AdamW) measured and fitted, the profile written beside ``--out`` (``calibrated_profile.json``;
``partitioner plan --device FILE`` loads it), and the fit's predicted / measured per kernel.
Then the 1f1b Llama is planned on the shipped profile and on the calibrated one, and each
stage's measured forward / backward is printed against both predictions.

Part 2, two or more GPUs (skipped on one): one process per GPU over NCCL, ``build_stage`` +
``runner`` for 1f1b and zbv, blocks ``x + W(norm(x))`` of width 8192 on 4096 tokens, so every
activation and gradient message is 4096 x 8192 bf16 = 64 MiB (far above NCCL's buffers: sends
are rendezvous), two steps each under a 120 s timeout. A hang fails with the ranks' report.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

# Count GPUs through NVML, not the CUDA runtime: the multi-GPU ranks are forked, which needs
# this process's CUDA untouched until then.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from partitioner import partition, poly  # noqa: E402
from partitioner.calibrate import compare, default_base, fit_curves, measure_curves  # noqa: E402
from partitioner.cost_models.devices import get_device  # noqa: E402
from partitioner.examples.llama import Llama, LlamaConfig  # noqa: E402
from partitioner.runtime.launch import spawn  # noqa: E402
from partitioner.runtime.local import train_step  # noqa: E402
from partitioner.schedule import SCHEDULES  # noqa: E402

__all__: list[str] = []

SCHEDULE_NAMES = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zbv"]


def device_profile(dev: torch.device) -> str:
    """The built-in profile for this card (``partitioner.cost_models.devices.DEVICES``), by name."""
    if dev.type != "cuda":
        return "local"
    name = torch.cuda.get_device_name(dev).lower()
    for key, profile in (("h200", "h200"), ("h100", "h100-sxm"), ("a100", "a100-80gb")):
        if key in name:
            return profile
    return "h100-sxm"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], dev: torch.device, reps: int = 5) -> float:
    """Median seconds of ``fn`` over ``reps`` runs (CUDA events on a GPU, after one warm-up)."""
    fn()
    out = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def per_stage(pipe: Any, x: torch.Tensor, dev: torch.device) -> list[dict[str, Any]]:
    """Each stage alone: forward / backward time of one micro-batch, and the memory its
    in-flight micro-batches keep, against the plan."""
    plan = pipe.plan
    mb = plan.prediction.microbatch_size
    seq = int(plan.symbols.get("S", 1))
    flat = pipe.flatten_inputs((x[:mb],), {})
    values: dict[str, Any] = dict(zip([d["name"] for d in plan.inputs], flat))
    rows = []
    for st, mod in zip(plan.stages, pipe.stages):
        args = [values.get(n) for n in st.inputs]
        args = [a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                for a in args]
        with torch.no_grad():
            outs = mod(*args)
        values.update(zip(st.outputs, outs))

        def fwd() -> Any:
            return mod(*args)

        def fwd_bwd() -> None:
            out = mod(*args)
            roots = [o for o in (out if isinstance(out, (list, tuple)) else [out])
                     if isinstance(o, torch.Tensor) and o.requires_grad]
            if roots:
                torch.autograd.backward(roots, [torch.ones_like(r) for r in roots])

        t_f = timed(fwd, dev)
        t_fb = timed(fwd_bwd, dev)
        mod.zero_grad(set_to_none=False)
        # Memory: weights + grads as held, then the in-flight micro-batches' saved activations.
        weights = sum(p.numel() * p.element_size() for p in mod.parameters()) * 2
        inflight = plan.prediction.peak_inflight[st.index]
        measured_act = float("nan")
        if dev.type == "cuda":
            sync(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            kept = [mod(*args) for _ in range(inflight)]
            sync(dev)
            measured_act = torch.cuda.max_memory_allocated(dev) - base
            del kept
        predicted_act = inflight * poly.evaluate(poly.from_text(st.cost.saved_bytes), mb, seq) + \
            poly.evaluate(poly.from_text(st.cost.recompute_bytes), mb, seq)
        rows.append({"stage": st.index, "fwd_pred_s": st.cost.fwd_time_s, "fwd_meas_s": t_f,
                     "bwd_pred_s": st.cost.bwd_time_s, "bwd_meas_s": max(t_fb - t_f, 0.0),
                     "act_pred_B": predicted_act, "act_meas_B": measured_act, "inflight": inflight,
                     "weights_grads_meas_B": weights, "weights_grads_pred_B": 2 * st.cost.param_bytes})
    return rows


def part1(args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      hidden_dim=args.dim * 8 // 3 // 64 * 64 or 64, max_seq_len=args.seq)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = Llama(cfg).to(dev, dtype)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    profile = device_profile(dev)
    can_compile = "compile" in inspect.signature(train_step).parameters and not args.smoke
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                           "profile": profile, "model": vars(cfg) if hasattr(cfg, "__dict__") else str(cfg),
                           "schedules": {}}
    for name in SCHEDULE_NAMES:
        spec = SCHEDULES[name]
        kw = {"virtual_stages": spec.default_stages_per_rank} if spec.default_stages_per_rank > 1 else {}
        t0 = time.perf_counter()
        pipe = partition(model, n_gpus=args.ranks, example_inputs=(x,), schedule=name, n_microbatches=args.m,
                         device=profile, cut_at="layers.*", **kw)
        plan_s = time.perf_counter() - t0
        row: dict[str, Any] = {"stages": pipe.plan.n_stages, "precision": pipe.plan.options.get("precision"),
                               "predicted_step_s": pipe.plan.prediction.step_time_s, "plan_s": plan_s}
        if name in ("1f1b", "zbv") or args.all_stage_rows:
            row["per_stage"] = per_stage(pipe, x, dev)
        for compiled in (False, True):
            if compiled and (not can_compile or spec.split_backward or (name not in args.compile)):
                row["compiled"] = ("refused: split backward" if spec.split_backward else
                                   "not run (--compile)" if can_compile else "not available")
                continue
            extra = {"compile": True} if compiled else {}
            losses, times = [], []
            for _ in range(args.steps):
                model.zero_grad(set_to_none=True)
                sync(dev)
                t0 = time.perf_counter()
                loss = pipe.train_step(x, target=y, loss_fn=loss_fn, schedule=name, comm="nccl", **extra)
                sync(dev)
                times.append(time.perf_counter() - t0)
                losses.append(float(loss))
            key = "compiled" if compiled else "eager"
            row[key] = {"losses": losses, "step_s_first": times[0], "step_s": statistics.median(times[1:] or times)}
            if dev.type == "cuda":
                row[key]["max_memory_allocated_B"] = torch.cuda.max_memory_allocated(dev)
        out["schedules"][name] = row
        print(_summary(name, row), flush=True)
    return out


def _summary(name: str, row: dict[str, Any]) -> str:
    e = row.get("eager", {})
    c = row.get("compiled")
    text = (f"{name:17s} stages {row['stages']}  predicted pipelined step {row['predicted_step_s'] * 1e3:8.2f} ms  "
            f"one-process step eager {e.get('step_s', math.nan) * 1e3:8.2f} ms")
    if isinstance(c, dict):
        text += f"  compiled {c['step_s'] * 1e3:8.2f} ms (first {c['step_s_first']:.1f} s)"
    elif c:
        text += f"  compiled: {c}"
    text += f"  loss {e.get('losses', [math.nan])[-1]:.4f}"
    for r in row.get("per_stage", []):
        text += (f"\n    stage {r['stage']}: fwd {r['fwd_meas_s'] * 1e3:.3f} ms (pred {r['fwd_pred_s'] * 1e3:.3f}), "
                 f"bwd {r['bwd_meas_s'] * 1e3:.3f} ms (pred {r['bwd_pred_s'] * 1e3:.3f}), "
                 f"activations x{r['inflight']} {r['act_meas_B'] / 2**20:.1f} MiB (pred {r['act_pred_B'] / 2**20:.1f})")
    return text


def calibration(args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    """Measure and fit this device's efficiency curves, write the profile beside ``--out``, and
    print each timed kernel against the shipped profile's and the calibrated profile's price."""
    measured = measure_curves(dev, budget_s=args.calibrate_budget)
    spec = fit_curves(measured, base=default_base(measured))
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "calibrated_profile.json")
    spec.save(path)
    if get_device(path) != spec:  # what partition(device=path) prices on
        raise AssertionError(f"{path} does not load back as the profile written")
    shipped = get_device(device_profile(dev))
    rows = [{"kernel": what, "measured_s": m, "shipped_s": s_, "calibrated_s": c}
            for (what, m, s_), (_, _, c) in zip(compare(shipped, measured), compare(spec, measured))]
    e = spec.efficiency
    assert e is not None
    print(f"calibration: {measured.device}, {measured.wall_s:.0f} s measuring, wrote {path}\n"
          f"  fitted: gemm_max {e.gemm_max:.3f} k_half {e.gemm_k_half:.0f}, attention {e.attn_fwd:.3f} / "
          f"{e.attn_bwd:.3f} seq_half {e.attn_seq_half:.0f}, bandwidth {spec.mem_bandwidth * e.mem / 1e9:.0f} GB/s, "
          f"launch {e.launch_s * 1e6:.2f} us", flush=True)
    for r in rows:
        print(f"    {r['kernel']:40s} measured {r['measured_s'] * 1e6:10.1f} us  shipped {shipped.name} "
              f"{r['shipped_s'] / r['measured_s']:5.2f}x  calibrated {r['calibrated_s'] / r['measured_s']:5.2f}x")
    return {"profile": path, "calibrated": spec.to_dict(), "shipped": shipped.name, "kernels": rows}


def profiles_per_stage(args: argparse.Namespace, dev: torch.device, calibrated: str) -> dict[str, Any]:
    """The 1f1b Llama planned on the shipped profile and on the calibrated one: each stage's
    measured forward / backward against both plans' predictions."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                      hidden_dim=args.dim * 8 // 3 // 64 * 64 or 64, max_seq_len=args.seq)
    model = Llama(cfg).to(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    out: dict[str, Any] = {}
    for label, profile in (("shipped", device_profile(dev)), ("calibrated", calibrated)):
        pipe = partition(model, n_gpus=args.ranks, example_inputs=(x,), schedule="1f1b", n_microbatches=args.m,
                         device=profile, cut_at="layers.*")
        out[label] = {"profile": pipe.plan.device.get("name"), "cuts": [st.nodes[-1] for st in pipe.plan.stages],
                      "per_stage": per_stage(pipe, x, dev)}
    for a, b in zip(out["shipped"]["per_stage"], out["calibrated"]["per_stage"]):
        print(f"  stage {a['stage']}: fwd {a['fwd_meas_s'] * 1e3:.3f} ms, predicted {out['shipped']['profile']} "
              f"{a['fwd_pred_s'] * 1e3:.3f} / calibrated {b['fwd_pred_s'] * 1e3:.3f} (measured on its plan "
              f"{b['fwd_meas_s'] * 1e3:.3f}); bwd {a['bwd_meas_s'] * 1e3:.3f} ms, predicted {a['bwd_pred_s'] * 1e3:.3f} "
              f"/ {b['bwd_pred_s'] * 1e3:.3f} ({b['bwd_meas_s'] * 1e3:.3f})", flush=True)
    out["same_cuts"] = out["shipped"]["cuts"] == out["calibrated"]["cuts"]
    return out


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.proj(self.norm(h))


class Chain(nn.Module):
    def __init__(self, width: int, n: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(n))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            h = b(h)
        return h


def _rank(rank: int, world: int, pipe: Any, name: str, x: torch.Tensor, y: torch.Tensor, on_gpu: bool) -> dict:
    dev = f"cuda:{rank}" if on_gpu else "cpu"
    stage = pipe.build_stage(rank, dev)
    opt = stage.optimizer(torch.optim.AdamW, lr=1e-4)
    runner = stage.runner(name, loss_fn=F.mse_loss, p2p="auto" if on_gpu else "ordered")
    times, losses = [], []
    for _ in range(2):
        stage.zero_grad()
        t0 = time.perf_counter()
        loss = runner.step(x.to(dev) if stage.is_first else None, target=y.to(dev) if stage.is_last else None)
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(None if loss is None else float(loss))
        opt.step()
    sent = [b for _, _, b in runner.interpreter.sent]
    return {"rank": rank, "step_s": times, "losses": losses, "largest_message_B": max(sent, default=0)}


def part2(args: argparse.Namespace, world: int, on_gpu: bool) -> dict[str, Any]:
    width, tokens = (8192, 4096) if not args.smoke else (64, 32)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    out: dict[str, Any] = {"world": world, "message_B": tokens * width * (2 if on_gpu else 4), "schedules": {}}
    for name in ("1f1b", "zbv"):
        torch.manual_seed(0)
        n_blocks = 2 * world * (2 if name == "zbv" else 1)
        model = Chain(width, n_blocks).to(dtype)
        m = 2 * world
        x = torch.randn(m, tokens, width, dtype=dtype)
        y = torch.randn(m, tokens, width, dtype=dtype)
        kw = {"virtual_stages": 2} if name == "zbv" else {}
        pipe = partition(model, n_gpus=world, example_inputs=(x,), schedule=name, n_microbatches=m,
                         cut_at="blocks.*", device="h100-sxm", **kw)
        t0 = time.perf_counter()
        res = spawn(_rank, world, pipe, name, x, y, on_gpu, backend="nccl" if on_gpu else "gloo",
                    timeout_s=args.timeout)
        out["schedules"][name] = {"wall_s": time.perf_counter() - t0, "ranks": res}
        print(f"NCCL path {name} on {world} {'GPUs' if on_gpu else 'gloo ranks'}: completed, step times "
              f"{[round(t, 3) for r in res for t in r['step_s']]} s, largest message "
              f"{max(r['largest_message_B'] for r in res) / 2**20:.1f} MiB", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (what CI runs)")
    ap.add_argument("--quick", action="store_true", help="a smaller model on the GPU")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--all-stage-rows", action="store_true", help="per-stage timing for every schedule")
    ap.add_argument("--compile", default="1f1b,interleaved-1f1b", help="schedules also run compiled")
    ap.add_argument("--calibrate-budget", type=float, default=None,
                    help="seconds the calibration measures (default: 180 on a GPU, 1 with --smoke); 0 skips it")
    args = ap.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu and not args.smoke:
        ap.error("no CUDA device: run with --smoke for the CPU check")
    big = dict(dim=2048, layers=8, heads=16, vocab=32000, seq=2048, batch=8, m=8, ranks=4)
    small = dict(dim=1024, layers=8, heads=8, vocab=32000, seq=1024, batch=8, m=8, ranks=4)
    tiny = dict(dim=64, layers=8, heads=4, vocab=256, seq=16, batch=8, m=4, ranks=2)
    for k, v in (tiny if args.smoke else small if args.quick else big).items():
        setattr(args, k, v)
    args.compile = args.compile.split(",")
    dev = torch.device("cuda:0" if on_gpu else "cpu")
    t0 = time.perf_counter()
    result: dict[str, Any] = {}
    # The multi-GPU part first: the ranks are forked, which needs CUDA untouched in this process.
    n_gpu = torch.cuda.device_count() if on_gpu else 2
    if n_gpu >= 2:
        result["part2"] = part2(args, min(n_gpu, 4) if on_gpu else 2, on_gpu)
    else:
        result["part2"] = "skipped: one GPU"
        print("NCCL path: skipped (one GPU)", flush=True)
    if args.calibrate_budget is None:
        args.calibrate_budget = 1.0 if args.smoke else 180.0
    if args.calibrate_budget > 0:  # after the forked ranks (it initialises CUDA here), before part 1
        result["calibration"] = calibration(args, dev)
    result["part1"] = part1(args, dev)
    if args.calibrate_budget > 0:
        print("per stage, measured against the shipped and the calibrated profile (1f1b):", flush=True)
        result["calibration"]["per_stage"] = profiles_per_stage(args, dev, result["calibration"]["profile"])
    result["wall_s"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {args.out} in {result['wall_s']:.0f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
