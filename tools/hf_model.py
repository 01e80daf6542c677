"""``hf:<model>``: a Hugging Face causal LM built from its config alone, for planning.

The model is built on the meta device (``AutoModelForCausalLM.from_config`` under
``torch.device("meta")``): no weights are read or allocated, so a 405B model plans on a
laptop. The config comes from a local ``config.json``, a local folder holding one, or (where
the hub is reachable) a model id. The example inputs are ``input_ids`` and ``labels`` of
``batch x seq`` tokens, so the plan prices the loss (fp32 over the vocabulary) with the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from partitioner.tools.loading import ToolError

__all__ = ["HF_PREFIX", "is_hf_spec", "load_hf", "model_flops"]

HF_PREFIX = "hf:"


def is_hf_spec(spec: str) -> bool:
    return spec.startswith(HF_PREFIX)


def _config(where: str) -> Any:
    from transformers import AutoConfig  # noqa: PLC0415 - optional extra (transformers, the hf extra)

    path = Path(where)
    try:
        if path.is_file():
            if path.suffix != ".json":
                raise ToolError(f"hf:{where}: give a config.json, a folder holding one, or a model id")
            return AutoConfig.from_pretrained(str(path.parent)) if path.name == "config.json" else \
                AutoConfig.from_pretrained(str(path))
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ToolError(f"hf:{where}: the folder has no config.json")
            return AutoConfig.from_pretrained(str(path))
        if os.environ.get("HF_HUB_OFFLINE") == "1" or where.startswith((".", "/")):
            raise ToolError(f"hf:{where}: no such file or folder, and the hub is offline (HF_HUB_OFFLINE=1): "
                            "give a local config.json or a folder holding one")
        return AutoConfig.from_pretrained(where)
    except ToolError:
        raise
    except Exception as e:  # transformers' own messages name the missing key or file
        raise ToolError(f"hf:{where}: cannot read the config: {type(e).__name__}: {' '.join(str(e).split())}") from e


def load_hf(spec: str, seq: int, batch: int) -> tuple[Any, dict[str, Any]]:
    """``(model on the meta device, {"input_ids", "labels"} of batch x seq meta tensors)``."""
    if seq < 1 or batch < 1:
        raise ToolError(f"--seq and --batch must be >= 1, got --seq {seq} --batch {batch}")
    import torch  # noqa: PLC0415 - CLI start-up (torch loads only when a model is built)
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - optional extra (transformers, the hf extra)

    where = spec[len(HF_PREFIX):]
    if not where:
        raise ToolError("hf: names no model; write hf:path/to/config.json, hf:path/to/folder or hf:org/model")
    config = _config(where)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq > limit:
        raise ToolError(f"--seq {seq} is longer than the model's max_position_embeddings ({limit})")
    if getattr(config, "use_cache", None) is not None:
        config.use_cache = False  # training: no key/value cache among the outputs
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    except Exception as e:
        raise ToolError(f"hf:{where}: cannot build {type(config).__name__} as a causal LM: "
                        f"{type(e).__name__}: {' '.join(str(e).split())}") from e
    model.train()
    ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
    return model, {"input_ids": ids, "labels": ids.clone()}


def model_flops(plan: Any) -> float:
    """FLOPs of one training step (forward + backward of every micro-batch on every replica),
    from the plan's per-stage FLOPs at its micro-batch size (``Plan.cost_at``)."""
    p = plan.prediction
    per_micro = sum(c["fwd_flops"] + c["bwd_flops"] for c in plan.cost_at(p.microbatch_size))
    return float(per_micro) * p.n_microbatches * max(1, plan.mesh.dp)
