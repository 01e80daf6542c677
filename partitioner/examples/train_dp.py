"""Pipeline x data parallelism across nodes, launched by torchrun (README, "Many nodes").

Every process plans the same model (planning is deterministic), builds only its own stage
and trains a few steps; with ``--out`` each rank saves its losses and parameters there.
On two nodes of two GPUs each::

    # on node 0 (HOST is node 0's address), and the same with --node-rank 1 on node 1
    torchrun --nnodes 2 --nproc-per-node 2 --node-rank 0 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 --rdzv-id demo -m partitioner.examples.train_dp --gpus-per-node 2

On CPUs (gloo) it runs as is; on GPUs each rank takes ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from partitioner import partition
from partitioner.examples.gpt import gpt_example


def data(batch: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, seq), generator=g), torch.randint(0, vocab, (batch, seq), generator=g)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model, _ = gpt_example(batch=args.batch, seq=16, n_layer=4, n_embd=32, n_head=2, vocab_size=128, block_size=16)
    x, y = data(args.batch, 16, 128)
    return model, x, y


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", type=int, default=2, help="data-parallel replicas (default 2)")
    ap.add_argument("--gpus-per-node", type=int, default=None)
    ap.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--out", default=None, help="directory: each rank writes rank<R>.pt (losses, parameters)")
    args = ap.parse_args(argv)
    world = int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(1)
    model, x, y = build(args)
    pipe = partition(model, n_gpus=world, data_parallel=args.dp, example_inputs=(x,), n_microbatches=2,
                     gpus_per_node=args.gpus_per_node, pinned_cuts=["transformer.h.2"] if world // args.dp == 2 else ())
    rank = int(os.environ["RANK"])
    stage = pipe.build_stage(rank, device)  # joins the process group torchrun set up
    opt = stage.optimizer(torch.optim.SGD, lr=args.lr)
    runner = stage.runner(pipe.plan.prediction.schedule, loss_fn=loss_fn)
    losses = []
    for step in range(args.steps):
        stage.zero_grad()
        loss = runner.step(x if stage.is_first else None, target=y if stage.is_last else None)
        opt.step()
        if loss is not None:
            losses.append(loss.item())
            print(f"rank {rank} (replica {stage.dp_rank}, pipeline rank {stage.pp_rank}) step {step + 1}: "
                  f"loss {losses[-1]:.6f}", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        torch.save({"dp": stage.dp_rank, "pp": stage.pp_rank, "dims": list(pipe.plan.mesh.dims), "losses": losses,
                    "params": {n: p.detach().cpu() for n, p in stage.named_parameters(remove_duplicate=False)}},
                   Path(args.out) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
