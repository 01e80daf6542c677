"""A complete pipelined training loop on a Hugging Face Llama, launched by torchrun.

The model is built from a config (nothing downloaded); every process plans it the same way
(planning is deterministic) and builds only its own stage. The loop: AdamW with linear
warm-up then cosine decay, gradient clipping over the whole pipeline, a padded token-mean
loss (labels -100 on padding, ``normalize="tokens"``: the full batch's token mean however
the padding falls in the micro-batches), an evaluation every ``--eval-every`` steps and a
checkpoint every ``--save-every`` steps that ``--resume`` continues from::

    torchrun --nproc-per-node 2 -m partitioner.examples.train_hf --steps 20 --ckpt /tmp/ckpt
    torchrun --nproc-per-node 2 -m partitioner.examples.train_hf --steps 40 --ckpt /tmp/ckpt --resume

On CPUs (gloo) it runs as is; on GPUs each rank takes ``cuda:LOCAL_RANK``. The batches are
synthetic (random tokens, right-padded to random lengths) and a function of the step, so a
resumed run sees the batches the uninterrupted run would.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from partitioner import partition

PAD = 0


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415 - optional extra (transformers, the hf extra)

    torch.manual_seed(args.seed)
    options: dict[str, Any] = dict(  # a dict: attn_implementation is a PretrainedConfig keyword stubs do not list
        num_hidden_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=2 * args.hidden, vocab_size=args.vocab, max_position_embeddings=args.seq, use_cache=False,
        attn_implementation="sdpa", bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD)
    cfg = LlamaConfig(**options)
    return LlamaForCausalLM(cfg)


def batch(step: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s tokens and next-token labels: rows right-padded to random lengths,
    labels -100 on padding (and after each row's last token). Step -1 is the evaluation batch."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=g)
    lengths = torch.randint(2, args.seq + 1, (args.batch,), generator=g)
    pad = torch.arange(args.seq)[None, :] >= lengths[:, None]
    ids[pad] = PAD
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    labels[:, :-1][pad[:, 1:]] = -100
    return ids, labels


def loss_sum(out: Any, labels: torch.Tensor) -> torch.Tensor:
    """Summed over the labels that are not -100: the runner divides by their count."""
    return F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


def lr_lambda(args: argparse.Namespace) -> Any:
    def f(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
    return f


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--steps", type=int, default=20, help="total steps (the cosine's length)")
    ap.add_argument("--stop-at", type=int, default=None, help="stop after this step (a run cut short)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--save-every", type=int, default=0, help="0: never")
    ap.add_argument("--ckpt", default=None, help="checkpoint directory")
    ap.add_argument("--resume", action="store_true", help="continue from --ckpt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="directory: global rank 0 writes log.json (losses, evals, norms)")
    return ap


def plan(args: argparse.Namespace, world: int) -> Any:
    """The model's pipeline over ``world`` ranks, cut evenly between layers."""
    model = build_model(args)
    x, _ = batch(0, args)
    layers = [f"model.layers.{args.layers * k // world}" for k in range(1, world)]
    return partition(model, n_gpus=world, example_inputs={"input_ids": x}, pinned_cuts=layers,
                     schedule=args.schedule, n_microbatches=args.microbatches)


def main(argv: list[str] | None = None, pipe: Any = None) -> None:
    """Plan (unless ``pipe`` is given, as the tests do), build this rank's stage, train."""
    args = parser().parse_args(argv)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    cuda = torch.cuda.is_available()
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(1)
    if pipe is None:
        pipe = plan(args, world)
    stage = pipe.build_stage(rank, device)  # joins the process group torchrun set up
    opt = stage.optimizer(torch.optim.AdamW, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    runner = stage.runner(args.schedule, n_microbatches=args.microbatches, loss_fn=loss_sum,
                          batch_size=args.batch, normalize="tokens")
    log: dict[str, list] = {"loss": [], "norm": [], "eval": [], "lr": []}
    start = 0
    if args.resume:
        stage.load_checkpoint(args.ckpt, opt)
        loop = torch.load(Path(args.ckpt) / "loop.pt", weights_only=False)
        sched.load_state_dict(loop["scheduler"])
        start, log = loop["step"], loop["log"]
    first, last = stage.is_first, stage.is_last
    ex, ey = batch(-1, args)
    for step in range(start, args.stop_at if args.stop_at is not None else args.steps):
        ids, labels = batch(step, args)
        stage.zero_grad()
        loss = runner.step(input_ids=ids if first else None, target=labels if last else None,
                           loss_on_every_rank=True)
        norm = stage.clip_grad_norm_(args.clip)
        log["lr"].append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        log["loss"].append(loss.item())
        log["norm"].append(norm.item())
        if (step + 1) % args.eval_every == 0:
            stage.eval()
            val = runner.eval_step(input_ids=ex if first else None, target=ey if last else None,
                                   loss_on_every_rank=True)
            stage.train()
            log["eval"].append((step + 1, val.item()))
            if rank == 0:
                print(f"step {step + 1}: loss {loss.item():.4f} eval {val.item():.4f} norm {norm.item():.3f}",
                      flush=True)
        if args.ckpt and args.save_every and (step + 1) % args.save_every == 0:
            stage.save_checkpoint(args.ckpt, opt)  # collective, atomic
            if rank == 0:
                torch.save({"step": step + 1, "scheduler": sched.state_dict(), "log": log},
                           Path(args.ckpt) / "loop.pt")
            dist.barrier()
    if args.out and rank == 0:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "log.json").write_text(json.dumps(log))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
