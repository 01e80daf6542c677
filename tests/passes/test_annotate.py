"""AnnotateCosts: per-node costs that sum to exactly what FlopCounterMode counts."""

from __future__ import annotations

import time

import pytest
import sympy
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from partitioner.cost_models.cost import BATCH, SEQ, NodeCost
from partitioner.cost_models.flops import register_cpu_flash_attention_flops
from partitioner.passes.annotate import AnnotateCosts, param_users
from partitioner.passes.meta import COST
from partitioner.passes.shape_prop import ShapeProp, default_specs
from tests.fixtures.models import FIXTURES, big_llama_on_meta


def _annotated(model: nn.Module, flat: list[object]) -> fx.GraphModule:
    gm = fx.symbolic_trace(model)
    return AnnotateCosts().run(ShapeProp(inputs=default_specs(flat)).run(gm))


def _total(gm: fx.GraphModule) -> NodeCost:
    return sum((n.meta[COST] for n in gm.graph.nodes), NodeCost())


def _at(expr: sympy.Expr, gm: fx.GraphModule) -> int:
    ex = gm.meta["pp.example"]
    return int(sympy.sympify(expr).subs({BATCH: ex.get("B", 1), SEQ: ex.get("S", 1)}))


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_flops_equal_flop_counter_mode(name: str) -> None:
    """The transparency test of the cost model: forward and backward, every fixture."""
    register_cpu_flash_attention_flops()  # else FlopCounterMode counts CPU SDPA as 0
    f = FIXTURES[name]
    model, args, kwargs = f.build(), f.inputs(), f.kwargs()
    gm = _annotated(model, [*args, *kwargs.values()])
    total = _total(gm)
    with FlopCounterMode(display=False) as fwd:
        out = model(*args, **kwargs)
    loss = sum(o.sum() for o in pytree.tree_leaves(out) if o.is_floating_point())
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    assert _at(total.fwd_flops_fc, gm) == fwd.get_total_flops() > 0
    assert _at(total.bwd_flops_fc, gm) == bwd.get_total_flops() > 0
    # Everything we price includes what FlopCounterMode prices, and more (norms, pointwise).
    assert _at(total.fwd_flops, gm) > _at(total.fwd_flops_fc, gm)


def test_linear_3_to_5_exact() -> None:
    """First layer: no input gradient, so the backward is the weight gradient only."""
    gm = _annotated(nn.Sequential(nn.Linear(3, 5)), [torch.randn(2, 3)])
    lin = next(n for n in gm.graph.nodes if n.op == "call_module").meta[COST]
    assert lin.fwd_flops_fc == 2 * 3 * 5 * BATCH  # = 60 at B=2
    assert lin.bwd_flops_fc == 2 * 3 * 5 * BATCH  # grad_weight = x^T @ grad_out, no grad_input
    assert lin.param_bytes == (15 + 5) * 4
    assert lin.output_bytes == 5 * 4 * BATCH
    assert lin.saved_bytes == 3 * 4 * BATCH  # the input, kept for grad_weight; not the weight
    assert "aten.addmm.default" in lin.ops


def test_second_layer_also_pays_for_its_input_gradient() -> None:
    gm = _annotated(nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 7)), [torch.randn(2, 3)])
    second = next(n for n in gm.graph.nodes if n.target == "1").meta[COST]
    assert second.fwd_flops_fc == 2 * 5 * 7 * BATCH
    assert second.bwd_flops_fc == 2 * (2 * 5 * 7 * BATCH)  # grad_input and grad_weight


def test_costs_are_symbolic_linear_in_b_and_attention_quadratic_in_s() -> None:
    f = FIXTURES["gpt"]
    gm = _annotated(f.build(), list(f.inputs()))
    total = _total(gm)
    for field in ("fwd_flops", "bwd_flops", "fwd_flops_fc", "bwd_flops_fc", "saved_bytes", "output_bytes"):
        assert sympy.degree(sympy.expand(getattr(total, field)), BATCH) == 1, field
    # Matmul work scales exactly with the batch. (Not all work does: the position-embedding
    # gradient and the arange of positions are per sequence position, whatever the batch.)
    for field in ("fwd_flops_fc", "bwd_flops_fc"):
        expr = getattr(total, field)
        assert sympy.expand(expr.subs(BATCH, 2 * BATCH) - 2 * expr) == 0, field
    sdpa = next(n for n in gm.graph.nodes if n.target is torch._C._nn.scaled_dot_product_attention)
    assert sympy.degree(sdpa.meta[COST].fwd_flops_fc, SEQ) == 2
    # b * h * (2 * s * s * d) twice (scores and scores @ v): sdpa_flop_count in torch.
    assert sympy.expand(sdpa.meta[COST].fwd_flops_fc) == 2 * (2 * BATCH * 2 * SEQ**2 * 16)


def test_tied_weights_are_counted_once_and_users_are_listed() -> None:
    f = FIXTURES["gpt"]
    model = f.build()
    gm = _annotated(model, list(f.inputs()))
    unique = sum(p.numel() * p.element_size() for p in model.parameters())  # dedups the tie
    assert _total(gm).param_bytes == unique
    users = param_users(gm)
    assert users["lm_head"] == ("lm_head.weight",)
    assert users["transformer_wte"] == ("transformer.wte.weight",)
    assert next(n for n in gm.graph.nodes if n.name == "lm_head").meta[COST].param_bytes == 0


def test_buffers_are_priced_apart_from_parameters() -> None:
    f = FIXTURES["cnn"]
    gm = _annotated(f.build(), list(f.inputs()))
    bn = next(n for n in gm.graph.nodes if n.target == "features.1").meta[COST]
    assert bn.param_bytes == 2 * 8 * 4 and bn.buffer_bytes == 2 * 8 * 4 + 8  # + num_batches_tracked


def test_7b_llama_on_meta_annotates_fast() -> None:
    model, args = big_llama_on_meta()
    start = time.perf_counter()
    gm = _annotated(model, list(args))
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"shape-prop + annotate took {elapsed:.1f}s"  # ~5 s on 2 cores
    total = _total(gm)
    assert total.param_bytes == 4 * sum(p.numel() for p in model.parameters())
    # 2 FLOPs per parameter per token for the matmuls (not the embedding lookup), plus attention.
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "tok_" not in n)
    attn = 32 * 2 * (2 * BATCH * 32 * SEQ**2 * 128)
    assert sympy.expand(total.fwd_flops_fc - attn) == 2 * n_matmul * BATCH * SEQ


def test_identical_layers_share_one_cost_record_and_different_ones_do_not() -> None:
    """Annotate gives structurally identical nodes with equal parameter bytes one (frozen)
    NodeCost, which pricing times once; a layer of another width, or the first layer (whose
    input needs no gradient), must get its own record with its own figures."""

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.same = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
            self.wide = nn.Linear(16, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for lin in self.same:
                x = torch.relu(lin(x))
            return self.wide(x)

    gm = _annotated(Stack(), [torch.randn(8, 16)])
    cost = {n.name: n.meta[COST] for n in gm.graph.nodes}
    assert cost["same_1"] is cost["same_2"] is cost["same_3"]
    assert cost["relu"] is cost["relu_1"]
    assert cost["same_0"] is not cost["same_1"]  # no input gradient for the first layer
    assert _at(cost["same_0"].bwd_flops, gm) < _at(cost["same_1"].bwd_flops, gm)
    assert cost["wide"] is not cost["same_1"]
    assert _at(cost["wide"].fwd_flops, gm) == 2 * _at(cost["same_1"].fwd_flops, gm)
    assert _at(cost["wide"].param_bytes, gm) == (16 * 32 + 32) * 4 and _at(cost["same_1"].param_bytes, gm) == (
        16 * 16 + 16) * 4


@torch.library.custom_op("pptest::doubled", mutates_args=())
def _doubled(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_doubled.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("pptest::doubled_backward", mutates_args=())
def _doubled_backward(grad: torch.Tensor) -> torch.Tensor:
    return grad * 2


@_doubled_backward.register_fake
def _(grad: torch.Tensor) -> torch.Tensor:
    if any(isinstance(d, torch.SymInt) for d in grad.shape):  # like a meta kernel that reads sizes as ints
        raise RuntimeError("doubled_backward has no kernel for symbolic sizes")
    return torch.empty_like(grad)


_doubled.register_autograd(lambda ctx, grad: _doubled_backward(grad))


class _Doubling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.ops.pptest.doubled(self.a(x)))


def test_a_node_torch_cannot_price_symbolically_falls_back_quietly_and_the_plan_names_it(
        capfd: pytest.CaptureFixture[str]) -> None:
    """The backward's fake kernel refuses symbolic sizes (torch's C++ kernels and the
    Python dispatcher alike): the node is priced at the example's sizes, scaled with B,
    the plan's notes name it, and stderr stays empty."""
    from partitioner import partition
    from partitioner.passes.annotate import FALLBACK

    torch.manual_seed(0)
    model, x = _Doubling(), torch.randn(4, 8)
    capfd.readouterr()
    pipe = partition(model, 2, (x,), device="cpu", link="loopback")
    assert "Traceback" not in capfd.readouterr().err
    torch.testing.assert_close(pipe(x), model(x))
    node = next(n for n in pipe.graph.graph.nodes if "doubled" in str(n.target))
    cost = node.meta[COST]
    assert cost.ops[0].startswith(FALLBACK) and "symbolic sizes" in cost.ops[0]
    # the example's figures (B=4), in proportion to B
    for e in (cost.fwd_bytes_moved, cost.fwd_flops):
        per_sample = sympy.expand(e / BATCH)
        assert not per_sample.free_symbols and per_sample > 0, e
    assert all(BATCH in sympy.sympify(e).free_symbols for e in cost.out_storage)
    note = next(n for n in pipe.plan.notes if n.startswith("cost fallback:"))
    assert node.name in note and "B=4" in note


def test_an_fp32_size_asked_while_pricing_another_precision_stays_four_bytes() -> None:
    """Pricing in bf16/fp16 runs under a retyping mode that makes every float32 tensor in the
    target dtype; a dtype's size read from an allocated tensor there (and cached) priced every
    later fp32 tensor of the process at 2 bytes. Sizes come from the dtype itself."""
    from partitioner.passes import annotate, base
    from partitioner.passes.shape_prop import OnDevice

    with OnDevice(torch.device("meta"), (torch.float32, torch.float16)):
        assert annotate._itemsize(torch.float32) == 4
        assert base.TensorDesc((BATCH, 5), torch.float32, False).nbytes() == 20 * BATCH
    gm = _annotated(nn.Sequential(nn.Linear(3, 5)), [torch.randn(2, 3)])
    assert next(n for n in gm.graph.nodes if n.op == "call_module").meta[COST].output_bytes == 5 * 4 * BATCH


class _MemoryBound(nn.Module):
    """gelu, layer norm and a linear layer: the ops whose dispatch asks each operand's device."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.gelu(x)
        z = self.norm(y).float()  # already float32: .float() returns its input, no kernel
        return self.lin(z).reshape(-1)  # a reshape of a contiguous result: a view


def test_memory_bound_ops_move_their_inputs_and_outputs_once_and_metadata_moves_nothing() -> None:
    """Bytes moved are the tensors a kernel reads and writes, each once: metadata queries
    (a tensor's device, asked by the decompositions of gelu, layer norm and linear; its
    sizes), export's checks and views move none. Charging ``prim.device`` as a read priced
    gelu at 3 passes over its tensor and the linear layer at 4 reads of its weight."""
    gm = _annotated(_MemoryBound(), [torch.randn(2, 4, 16)])
    cost = {n.name: n.meta[COST] for n in gm.graph.nodes}
    act = 4 * 16 * 4 * BATCH  # one [B, 4, 16] float32 tensor
    assert cost["gelu"].fwd_bytes_moved == 2 * act  # read x, write gelu(x)
    stats = 2 * 4 * 4 * BATCH  # layer norm also writes its mean and 1/std, one float per row
    assert cost["norm"].fwd_bytes_moved == 2 * act + stats + 2 * 16 * 4  # + its weight and bias
    assert cost["float_1"].fwd_bytes_moved == 0 and not any("prim." in op for op in cost["float_1"].ops)
    out = 4 * 8 * 4 * BATCH
    assert cost["lin"].fwd_bytes_moved == act + out + (16 * 8 + 8) * 4  # input, output, weight, bias once
    assert cost["reshape"].fwd_bytes_moved == 0
    assert not any("prim." in op for c in cost.values() for op in c.ops)


def test_the_recorder_charges_no_bytes_to_metadata_checks_and_views_only_to_kernels() -> None:
    """Each op the recorder skips or prices at no bytes, called as the dispatcher calls it (export's
    captures record ``_assert_tensor_metadata``; ``reshape`` of a fresh result is ``_unsafe_view``):
    after all of them, one relu's read and write are the only bytes moved."""
    from partitioner.passes.annotate import _Recorder, _Sizes

    rec = _Recorder(_Sizes({}, None))
    x = torch.randn(4, 8)
    with rec:
        torch.ops.prim.device.default(x)
        torch.ops.aten._assert_tensor_metadata.default(x, dtype=x.dtype)
        torch.ops.aten.sym_numel.default(x)
        torch.ops.aten._unsafe_view.default(x, [32])
        torch.ops.aten.new_empty.default(x, [4, 8])
        torch.ops.aten.relu.default(x)
    assert rec.moved == 2 * 32 * 4
    assert "aten.relu.default" in rec.ops and not any(op.startswith(("prim.", "aten._assert")) for op in rec.ops)


def test_write_only_ops_are_charged_their_write_and_copy_its_source_read() -> None:
    """``copy_``, ``fill_`` and ``zero_`` overwrite their destination without reading it: a copy moves
    its source once and its destination once, a fill or a zero its destination once. An in-place
    op that does read its destination (``add_``) still reads and writes it."""
    from partitioner.passes.annotate import _Recorder, _Sizes

    n = 32 * 4  # one [4, 8] float32 tensor
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    cases = [
        (lambda: torch.ops.aten.copy_.default(x, y), 2 * n),
        (lambda: torch.ops.aten.copy.default(x, y), 2 * n),
        (lambda: torch.ops.aten.fill_.Scalar(x, 1.0), n),
        (lambda: torch.ops.aten.fill_.Tensor(x, torch.tensor(1.0)), n + 4),  # + the 0-d value read
        (lambda: torch.ops.aten.fill.Scalar(x, 1.0), n),
        (lambda: torch.ops.aten.zero_.default(x), n),
        (lambda: torch.ops.aten.add_.Tensor(x, y), 3 * n),  # reads both, writes x
    ]
    for call, want in cases:
        rec = _Recorder(_Sizes({}, None))
        with rec:
            call()
        assert rec.moved == want, (rec.ops, rec.moved, want)


def test_a_traced_copy_is_charged_its_source_read_and_destination_write() -> None:
    """A traced ``copy_`` node (into a fresh tensor) is charged the source read and the destination
    write, not also a read of the destination it overwrites (3 passes before)."""

    class Copy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(x).copy_(x)

    gm = _annotated(Copy(), [torch.randn(2, 4, 16)])
    cost = {n.name: n.meta[COST] for n in gm.graph.nodes}
    act = 4 * 16 * 4 * BATCH
    copy = next(c for name, c in cost.items() if "copy" in name)
    assert copy.fwd_bytes_moved == 2 * act, (copy.ops, copy.fwd_bytes_moved)
