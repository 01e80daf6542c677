"""ShapeProp: fake propagation symbolic in B/S, on every fixture, meta models, export graphs."""

from __future__ import annotations

import warnings

import pytest
import sympy
import torch
from torch import fx, nn
from torch.export import Dim

from partitioner.cost_models.cost import BATCH, SEQ
from partitioner.passes.base import InputSpec, TensorDesc
from partitioner.passes.meta import DESC, MODULE, VAL
from partitioner.passes.shape_prop import ShapeProp, ShapePropError, default_specs
from tests.fixtures.models import FIXTURES, big_llama_on_meta


def _flat(name: str) -> tuple[nn.Module, list[object]]:
    f = FIXTURES[name]
    return f.build(), [*f.inputs(), *f.kwargs().values()]


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_fixture_propagates_symbolically(name: str) -> None:
    model, flat = _flat(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = ShapeProp(inputs=default_specs(flat)).run(fx.symbolic_trace(model))
    assert gm.meta["pp.symbolic"] is True
    assert set(gm.meta["pp.symbols"].values()) <= {BATCH, SEQ}
    assert gm.meta["pp.example"]["B"] == flat[0].shape[0]  # type: ignore[attr-defined]
    for node in gm.graph.nodes:
        assert VAL in node.meta and DESC in node.meta and MODULE in node.meta, node.format_node()
    # Shape propagation touches no real weight (nor batch-norm running stats).
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # The output's symbolic shapes, at the example sizes, are the real output's shapes.
    real = torch.utils._pytree.tree_leaves(model(*flat))
    out = next(n for n in gm.graph.nodes if n.op == "output").meta[DESC]
    descs = [d for d in torch.utils._pytree.tree_leaves(out, is_leaf=lambda x: isinstance(x, TensorDesc))]
    ex = {BATCH: gm.meta["pp.example"]["B"], SEQ: gm.meta["pp.example"].get("S", 1)}
    assert [tuple(int(s.subs(ex)) for s in d.shape) for d in descs] == [tuple(t.shape) for t in real]
    assert all(d.shape[0] == BATCH for d in descs)  # no size was pinned to the example batch


def test_descs_of_ints_and_modules() -> None:
    model, flat = _flat("gpt")
    gm = ShapeProp(inputs=default_specs(flat)).run(fx.symbolic_trace(model))
    nodes = {n.name: n for n in gm.graph.nodes}
    assert nodes["size"].meta[DESC] == SEQ  # idx.size(1) is the sequence symbol, not s1
    assert isinstance(nodes["size"].meta[VAL], torch.SymInt)
    assert nodes["transformer_h_0_attn_c_attn"].meta[MODULE] == "transformer.h.0.attn.c_attn"
    sdpa = next(n for n in gm.graph.nodes if n.target is torch._C._nn.scaled_dot_product_attention)
    assert sdpa.meta[MODULE] == "transformer.h.0.attn"
    assert sdpa.meta[DESC] == TensorDesc((BATCH, sympy.Integer(2), SEQ, sympy.Integer(16)), torch.float32, True)


def test_meta_llama_keeps_requires_grad_and_never_materializes() -> None:
    model, args = big_llama_on_meta()
    gm = ShapeProp(inputs=default_specs(args)).run(fx.symbolic_trace(model))
    out = next(n for n in gm.graph.nodes if n.op == "output").meta[DESC]
    assert out == TensorDesc((BATCH, SEQ, sympy.Integer(32000)), torch.float32, True)
    emb = next(n for n in gm.graph.nodes if n.target == "tok_embeddings")
    # fakes live on the CPU whatever device the model object is on: pricing must not depend
    # on it (meta runs the math kernels, a CPU target prices the CPU's), and nothing is allocated
    assert emb.meta[VAL].device.type == "cpu"
    assert all(p.is_meta for p in model.parameters())


class _PinsBatch(nn.Module):
    """``view(8, -1)`` guards B*4 == 32: B is pinned to 8, so symbolic costs would lie."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(8, -1) * 2


def test_guard_on_batch_falls_back_to_static_shapes_with_a_warning() -> None:
    gm = fx.symbolic_trace(_PinsBatch())
    with pytest.warns(UserWarning, match=r"symbolic shape propagation failed at .*view"):
        ShapeProp(inputs=default_specs([torch.randn(8, 4)])).run(gm)
    assert gm.meta["pp.symbolic"] is False and gm.meta["pp.symbols"] == {}
    assert next(n for n in gm.graph.nodes if n.name == "mul").meta[DESC].shape == (8, 4)


def test_failure_with_static_shapes_names_the_node() -> None:
    model, _ = _flat("mlp")
    bad = InputSpec("x", "tensor", (8, 31), "float32", ((0, "B"),))  # the MLP wants 32 features
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ShapePropError, match=r"failed at node .*layers_0.*even static shapes fail") as info:
            ShapeProp(inputs=(bad,)).run(fx.symbolic_trace(model))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_wrong_number_of_specs_and_unknown_dtype() -> None:
    gm = fx.symbolic_trace(_flat("mlp")[0])
    with pytest.raises(ShapePropError, match=r"got 0 InputSpecs for 1 placeholders"):
        ShapeProp(inputs=()).run(gm)
    with pytest.raises(ShapePropError, match=r"unknown dtype 'float33'"):
        ShapeProp(inputs=(InputSpec("x", "tensor", (8, 32), "float33", ()),)).run(gm)


def test_torch_export_graph_with_dotted_get_attr_params() -> None:
    model, flat = _flat("gpt")
    dims = ({0: Dim("B", min=2, max=64), 1: Dim("S", min=2, max=16)},)
    gm = torch.export.export(model, tuple(flat), dynamic_shapes=dims, strict=False).module()
    ShapeProp(inputs=default_specs(flat)).run(gm)
    assert gm.meta["pp.symbolic"] is True
    w = next(n for n in gm.graph.nodes if n.target == "transformer.h.0.attn.c_attn.weight")
    assert w.meta[DESC] == TensorDesc((sympy.Integer(96), sympy.Integer(32)), torch.float32, True)
    assert w.meta[MODULE] == "transformer.h.0.attn.c_attn"
    lin = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    assert lin.meta[MODULE] == "transformer.h.0.attn.c_attn"
    assert lin.meta[DESC].shape == (BATCH, SEQ, 96)


def test_shown_descs_print_exactly_as_repr() -> None:
    """The structural keys print each size once per process (``_show_desc``); the text must be
    ``repr``'s, or two different shapes could share a key (and one fake value)."""
    from partitioner.passes.shape_prop import _show_desc

    descs = [TensorDesc((BATCH, sympy.Integer(64)), torch.float32, True), TensorDesc((), torch.int64, False),
             TensorDesc((BATCH * SEQ,), torch.bfloat16, False), (TensorDesc((BATCH,), torch.float32, True),),
             [TensorDesc((SEQ, 2 * BATCH + 1), torch.float16, True), sympy.Integer(3)], (), [], BATCH + 1,
             None, 3, True, "x", {"a": TensorDesc((BATCH,), torch.float32, False)}]
    for d in descs:
        assert _show_desc(d) == repr(d)
    assert _show_desc(TensorDesc((BATCH, 64), torch.float32, True)) != _show_desc(
        TensorDesc((BATCH, 65), torch.float32, True))


@pytest.mark.parametrize("where", ["cpu", "meta"])
def test_parameter_fakes_match_the_parameters_and_keep_ties(where: str) -> None:
    """Parameter fakes are made from meta tensors directly: same shape, strides, dtype and
    grad flag as the real tensor, on the fakes' device, one storage each, one fake per tie."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from partitioner.passes.shape_prop import fake_params

    with torch.device(where):
        model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 4))
    model[2].weight.requires_grad_(False)
    model.register_buffer("table", torch.ones(3, 5, device=where).t())  # non-contiguous strides
    model.tied = nn.Linear(6, 4)
    model.tied.weight = model[2].weight
    mode = FakeTensorMode()
    fakes = fake_params(model, mode, "cpu")  # type: ignore[arg-type]  # reads the named tensors only
    real = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    assert fakes.keys() == real.keys() and len(real) == 9
    for name, t in real.items():
        f = fakes[name]
        assert isinstance(f, FakeTensor) and f.fake_mode is mode and f.device.type == "cpu"
        assert (f.shape, f.stride(), f.dtype, f.requires_grad) == (t.shape, t.stride(), t.dtype, t.requires_grad)
    assert fakes["tied.weight"] is fakes["2.weight"]
    storages = {f.untyped_storage()._cdata for n, f in fakes.items() if n != "tied.weight"}
    assert len(storages) == len(fakes) - 1
    half = fake_params(model, FakeTensorMode(), "cpu", torch.bfloat16)  # type: ignore[arg-type]
    assert half["0.weight"].dtype == torch.bfloat16 and half["0.weight"].requires_grad


class _PadsShifted(nn.Module):
    """``F.pad(x[:, 1:], ...)`` (MobileBERT's shifted embeddings): aten.constant_pad_nd's C++
    kernel reads sizes as ints, which pinned B and S unless run through the Python dispatcher."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x[:, 1:], [0, 0, 0, 1, 0, 0], value=0.0) * 2


def test_pad_keeps_batch_and_sequence_symbolic() -> None:
    x = torch.randn(2, 8, 4)
    spec = InputSpec("x", "tensor", (2, 8, 4), "float32", ((0, "B"), (1, "S")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        gm = ShapeProp(inputs=(spec,)).run(fx.symbolic_trace(_PadsShifted()))
    assert gm.meta["pp.symbolic"] is True
    out = next(n for n in gm.graph.nodes if n.op == "output").meta[DESC]
    assert out == TensorDesc((BATCH, SEQ, sympy.Integer(4)), torch.float32, False)
    assert tuple(_PadsShifted()(x).shape) == (2, 8, 4)


class _PinsSequence(nn.Module):
    """``view(b, 8, ...)``: a capture that fixed S (Funnel, RecurrentGemma do) pins S only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], 8, -1) * 2


def test_a_guard_on_the_sequence_only_keeps_the_batch_symbolic() -> None:
    spec = InputSpec("x", "tensor", (2, 8, 4), "float32", ((0, "B"), (1, "S")))
    with pytest.warns(UserWarning, match=r"static example sizes \{'S': 8\} \(B stays symbolic\)"):
        gm = ShapeProp(inputs=(spec,)).run(fx.symbolic_trace(_PinsSequence()))
    assert gm.meta["pp.symbolic"] is False and set(gm.meta["pp.symbols"].values()) == {BATCH}
    assert next(n for n in gm.graph.nodes if n.name == "mul").meta[DESC].shape == (BATCH, 8, 4)
