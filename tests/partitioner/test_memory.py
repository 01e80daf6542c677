"""Memory as a training run holds it (issue: static memory, precision, deduplicated
activations, attention priced for the target): predictions against what autograd keeps."""

from __future__ import annotations

import pytest
import sympy
import torch

from partitioner import partition, poly
from partitioner.memory import bytes_per_param, find_blocks, measure_saved
from tests.hf.models import CASES

hf = pytest.importorskip("transformers")


def _saved(plan, stage: int, batch: int, seq: int) -> int:
    return int(poly.evaluate(poly.from_text(plan.stages[stage].cost.saved_bytes), batch, seq))


def _logits(out):
    return out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, dict) else out[0]


@pytest.mark.parametrize(("precision", "optimizer", "expected"), [
    ("fp32", "adam", 16), ("bf16-mixed", "adam", 16), ("fp16-mixed", "adamw", 16), ("bf16", "adam", 8),
    ("fp32", "sgd", 8), ("bf16-mixed", "sgd", 8), ("bf16-mixed", "none", 4), ("fp32", "none", 8),
    ("fp32", "momentum", 12), ("bf16", "momentum", 6),
])
def test_bytes_per_parameter_table(precision: str, optimizer: str, expected: int) -> None:
    assert bytes_per_param(precision, optimizer) == expected


def test_blocks_are_the_outermost_module_lists() -> None:
    paths = ["embed", "model.layers.0.attn", "model.layers.0.mlp.up", "model.layers.1.attn", "norm", "lm_head"]
    assert find_blocks(paths) == ("model.layers.*",)
    t5 = ["encoder.block.0.layer.0", "encoder.block.1.layer.0", "decoder.block.0.layer.1", "decoder.block.1"]
    assert find_blocks(t5) == ("decoder.block.*", "encoder.block.*")
    assert find_blocks(["fc1", "fc2"]) == ()


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "t5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_stage_predicts_what_autograd_keeps(name: str, dtype: torch.dtype) -> None:
    """The plan's saved_bytes equals the storages autograd keeps (each once, no parameters),
    measured with saved_tensors_hooks on the eager model, on the CPU target."""
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build(2).to(dtype)
    inputs = case.inputs(2, 32)
    measured, _ = measure_saved(lambda: model(**inputs), exclude=list(model.parameters()))
    pipe = partition(model, n_gpus=1, example_inputs=inputs, device="cpu", n_microbatches=1, recompute="none")
    predicted = _saved(pipe.plan, 0, 2, 32)
    assert predicted == pytest.approx(measured, rel=0.10), (predicted, measured)


def test_each_stage_predicts_what_its_module_keeps() -> None:
    """Per stage of a 2-stage plan: the stage module's saved storages (a received boundary
    tensor counted once on the receiving stage)."""
    case = CASES["llama"]
    torch.manual_seed(0)
    model = case.build(2)
    inputs = case.inputs(2, 32)
    pipe = partition(model, n_gpus=2, example_inputs=inputs, device="cpu", n_microbatches=1, recompute="none")
    values = pipe.flatten_inputs((), inputs)
    params = list(model.parameters())
    for i, stage in enumerate(pipe.stages):
        if i:  # received as the runtime receives them: fresh tensors, grad as the plan says
            grads = [v.requires_grad for v in pipe.plan.boundaries[i - 1].values]
            values = [v.detach().requires_grad_(g) if isinstance(v, torch.Tensor) else v for v, g in zip(values, grads)]
        measured, out = measure_saved(lambda: stage(*values), exclude=params)
        assert _saved(pipe.plan, i, 2, 32) == pytest.approx(measured, rel=0.10)
        values = list(out) if isinstance(out, (tuple, list)) else [out]


def test_static_memory_counts_weights_on_the_export_route_by_optimizer() -> None:
    """torch.export puts weights on get_attr nodes: they must still be static memory, and the
    optimizer must change it (none < sgd < adam)."""
    case = CASES["llama"]
    model = case.build(2)
    inputs = case.inputs(2, 16)
    n_params = sum(p.numel() for p in model.parameters())
    static = {}
    for opt in ("none", "sgd", "adam"):
        pipe = partition(model, n_gpus=2, example_inputs=inputs, device="cpu", optimizer=opt)
        assert pipe.plan.capture == "export"
        static[opt] = sum(st.cost.static_bytes for st in pipe.plan.stages)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert static["none"] == pytest.approx(8 * n_params + buffers, rel=0.01)
    assert static["sgd"] == static["none"]  # fp32 SGD: weights + grads, no state
    assert static["adam"] == pytest.approx(16 * n_params + buffers, rel=0.01)


def test_a_tied_weight_is_held_by_every_rank_that_uses_it() -> None:
    case = CASES["gpt2"]
    model = case.build(2)
    inputs = case.inputs(2, 16)
    pipe = partition(model, n_gpus=2, example_inputs=inputs, device="cpu", optimizer="sgd")
    assert pipe.plan.tied_parameters
    wte = model.transformer.wte.weight
    for st in pipe.plan.stages:  # embedding on the first, lm_head on the last: both hold it
        assert st.cost.static_bytes >= 8 * wte.numel()
    total = sum(st.cost.static_bytes for st in pipe.plan.stages)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert total == 8 * (sum(p.numel() for p in model.parameters()) + wte.numel()) + buffers


def test_precision_prices_activations_in_the_compute_dtype() -> None:
    case = CASES["llama"]
    model = case.build(2)
    inputs = case.inputs(2, 32)
    fp32 = partition(model, n_gpus=1, example_inputs=inputs, device="cpu", recompute="none")
    mixed = partition(model, n_gpus=1, example_inputs=inputs, device="cpu", recompute="none", precision="bf16-mixed")
    assert fp32.plan.options["precision"] == "fp32" and mixed.plan.options["precision"] == "bf16-mixed"
    ratio = _saved(mixed.plan, 0, 2, 32) / _saved(fp32.plan, 0, 2, 32)
    assert 0.45 < ratio < 0.7  # half, except what stays fp32 (norm statistics, the softmax's log-sum-exp)
    assert mixed.plan.stages[0].cost.static_bytes < fp32.plan.stages[0].cost.static_bytes * 1.01
    bf16_model = case.build(2).to(torch.bfloat16)
    assert partition(bf16_model, n_gpus=1, example_inputs=inputs, device="cpu").plan.options["precision"] == "bf16-mixed"
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        partition(model, n_gpus=1, example_inputs=inputs, precision="fp8")


def test_pricing_does_not_depend_on_the_models_device() -> None:
    """A model built on the meta device and the same model on the CPU give the same plan."""
    case = CASES["llama"]
    torch.manual_seed(0)
    cpu = case.build(2)
    with torch.device("meta"):
        meta = case.build(2)
    inputs = case.inputs(2, 16)

    def priced(plan):  # torch.export numbers nodes differently on meta: compare what was priced
        return ([(st.modules, st.recompute, st.cost.fwd_flops, st.cost.bwd_flops, st.cost.saved_bytes,
                  st.cost.static_bytes, st.cost.memory_bytes, st.parameters) for st in plan.stages],
                [(b.label.split(" [")[0], b.bytes) for b in plan.boundaries], plan.prediction.step_time_s)

    for device in ("cpu", "h100-sxm"):
        a = partition(cpu, n_gpus=2, example_inputs=inputs, device=device).plan
        b = partition(meta, n_gpus=2, example_inputs=inputs, device=device).plan
        assert priced(a)[:2] == priced(b)[:2]
        # the two captures differ by a few data-movement nodes (the meta one moves its rotary
        # table across devices), which shifts the predicted step by < 0.1 %
        assert priced(a)[2] == pytest.approx(priced(b)[2], rel=1e-3)


def test_gpu_attention_keeps_no_sequence_squared_matrix() -> None:
    """On a GPU target SDPA keeps q, k, v, out and the log-sum-exp: no S^2 term in any stage's
    saved bytes. Eager attention (matmul + softmax) really keeps S x S, on either target."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def degree(text: str) -> int:
        expr = poly.from_text(text)
        seq = next(s for s in expr.free_symbols if s.name == "S")
        return sympy.Poly(expr, seq).degree()

    inputs = {"input_ids": torch.randint(0, 256, (2, 64))}
    for impl, want in (("sdpa", 1), ("eager", 2)):
        cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=256, max_position_embeddings=128, use_cache=False,
                          attn_implementation=impl)
        model = LlamaForCausalLM(cfg)
        plan = partition(model, n_gpus=2, example_inputs=inputs, device="h100-sxm").plan
        assert max(degree(st.cost.saved_bytes) for st in plan.stages) == want, impl
