"""Messages (issue 9, item 10): each names what is wrong and how to fix it.

* a ``cut_at`` glob that matches no module says so and lists the nearest module paths;
* calling the pipe without an input that was in the example names that input;
* a misspelled example key names ``forward``'s parameters (and the likely one), also when
  ``forward(**kwargs)`` would swallow it;
* a capture that fails with ``use_cache=True`` suggests ``use_cache=False``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from partitioner import PartitionError, partition
from tests.fixtures.models import FIXTURES


def _gpt() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return FIXTURES["gpt"].build(), FIXTURES["gpt"].inputs()


def test_a_cut_at_glob_that_matches_nothing_names_the_nearest_paths() -> None:
    model, args = _gpt()
    with pytest.raises(PartitionError, match=r"cut_at='transformer.blocks.\*' matches no module of this model; "
                                             r"the nearest module paths are transformer.h.\*"):
        partition(model, 2, args, device="cpu", cut_at="transformer.blocks.*")


def test_a_cut_at_glob_that_matches_still_works() -> None:
    model, args = _gpt()
    pipe = partition(model, 2, args, device="cpu", cut_at="transformer.h.*")
    assert all(" | " in c and "[" not in c for c in pipe.plan.cuts)


def test_a_missing_input_names_the_input() -> None:
    torch.manual_seed(0)
    fx = FIXTURES["multi_io"]
    model, kwargs = fx.build(), fx.kwargs()
    pipe = partition(model, 2, kwargs, device="cpu")
    without = {k: v for k, v in kwargs.items() if k != "context"}
    with pytest.raises(PartitionError, match=r"missing a required argument: 'context'"):
        pipe(**without)


def test_a_misspelled_example_key_names_forwards_parameters() -> None:
    torch.manual_seed(0)
    fx = FIXTURES["multi_io"]
    kwargs = fx.kwargs()
    kwargs["contxt"] = kwargs.pop("context")
    with pytest.raises(PartitionError, match=r"example input .contxt. is not a parameter of MultiIO.forward \(its parameters: features, context, scale\); did you mean .context."):
        partition(fx.build(), 2, kwargs, device="cpu")


# Hugging Face: forward(**kwargs) swallows any key; the cache does not export ----------

def _mistral(use_cache: bool) -> torch.nn.Module:
    pytest.importorskip("transformers")
    from tests.hf.zoo import _LLAMA_LIKE, _build

    return _build("MistralConfig", "MistralForCausalLM", **{**_LLAMA_LIKE, "use_cache": use_cache})()


def test_a_misspelled_key_swallowed_by_kwargs_is_caught() -> None:
    model = _mistral(False)
    ids = torch.randint(3, 128, (2, 8))
    with pytest.raises(PartitionError, match=r"example input 'input_id' is not a parameter of MistralForCausalLM.forward "
                                             r"\(its parameters: input_ids, attention_mask.*did you mean 'input_ids'"):
        partition(model, 2, {"input_id": ids}, device="cpu")


def test_a_use_cache_capture_failure_suggests_use_cache_false() -> None:
    model = _mistral(True)
    ids = torch.randint(3, 128, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PartitionError, match=r"cannot capture MistralForCausalLM with use_cache=True \(Hugging "
                                                 r"Face models capture only with use_cache=False"):
            partition(model, 2, {"input_ids": ids}, device="cpu")
        # and the advice works
        pipe = partition(model, 2, {"input_ids": ids, "use_cache": False}, device="cpu")
    torch.testing.assert_close(pipe(input_ids=ids, use_cache=False).logits, model(input_ids=ids, use_cache=False).logits)


def test_vit_blocks_renamed_in_transformers_5_are_suggested() -> None:
    pytest.importorskip("transformers")
    from tests.hf.zoo import ZOO

    case = ZOO["vit"]
    model = case.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PartitionError, match=r"cut_at='vit.encoder.layer.\*' matches no module.*vit.layers.\*"):
            partition(model, 2, case.inputs(), device="cpu", cut_at="vit.encoder.layer.*")


class _BrokenConfig(torch.nn.Module):
    """Fails on its own inputs (a config whose head count does not divide the width, say),
    and branches on data so that neither capture route gets as far as running it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.norm = torch.nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.lin(x))
        if h.sum() > 0:
            h = h * 2
        return h.view(x.shape[0], 3, -1)


def test_a_model_that_fails_eagerly_is_not_reported_as_a_capture_problem() -> None:
    model = _BrokenConfig()  # training mode: a forward would move the batch-norm statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PartitionError, match=r"_BrokenConfig fails on the example inputs when run eagerly, before any "
                                             r"capture: RuntimeError: shape .* is invalid .*check the model's config"):
        partition(model, 2, (torch.randn(4, 8),), device="cpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left as it was


class _FixedBatch(torch.nn.Module):
    """Writes its example's batch into a view: shapes cannot follow the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(self.a(x).view(8, 16))))


def test_a_plan_with_fixed_shapes_says_why_a_smaller_micro_batch_fails() -> None:
    """Symbolic shape propagation fails (the view pins the batch): the plan notes it, and a
    step at micro-batch 4 fails in the stage's forward with that reason and what to do;
    micro-batches of the example's size run."""
    from partitioner.plan import STATIC_SHAPES_NOTE
    from partitioner.runtime.errors import PipelineRuntimeError

    torch.manual_seed(0)
    model, x, y = _FixedBatch(), torch.randn(8, 16), torch.randn(8, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = partition(model, n_gpus=2, example_inputs=(x,), n_microbatches=2, device="cpu")
    assert any(n.startswith(STATIC_SHAPES_NOTE) for n in pipe.plan.notes)
    loss_fn = torch.nn.functional.mse_loss
    with pytest.raises(PipelineRuntimeError, match=r"fixed to its example batch of 8.*micro-batches of 4.*"
                                                   r"n_microbatches=1"):
        pipe.train_step(x, target=y, loss_fn=loss_fn, n_microbatches=2)
    model.zero_grad()
    got = pipe.train_step(x, target=y, loss_fn=loss_fn, n_microbatches=1)
    torch.testing.assert_close(got, loss_fn(model(x), y).detach())
