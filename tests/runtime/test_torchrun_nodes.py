"""Two "nodes" x 2 ranks on this host, launched as on a cluster: two torchrun processes
(``--nnodes 2 --node-rank 0/1``, c10d rendezvous), running ``partitioner.examples.train_dp``
(2 replicas x 2 pipeline stages, ``gpus_per_node=2``); every rank ends with the parameters
one process gets training the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from partitioner.examples import train_dp
from partitioner.runtime.launch import free_port
from tests.runtime.helpers import ATOL, RTOL

TIMEOUT_S = 240


def _reference(steps: int, lr: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    import argparse

    model, x, y = train_dp.build(argparse.Namespace(batch=8))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = train_dp.loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}


def test_two_torchrun_nodes_train_like_one_process(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "pp-dp-test",
           "--max-restarts", "0", "-m", "partitioner.examples.train_dp",
           "--gpus-per-node", "2", "--steps", "3", "--out", str(tmp_path)]
    procs = [subprocess.Popen(cmd[:5] + ["--node-rank", str(k)] + cmd[5:], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for k in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)[-4000:]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    want_losses, want = _reference(3, 0.1)
    assert {(r["dp"], r["pp"]) for r in results} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    last = [r["losses"] for r in results if r["losses"]]
    assert len(last) == 2
    assert [(a + b) / 2 for a, b in zip(*last)] == pytest.approx(want_losses, rel=1e-5)
    for r in results:
        assert r["params"]
        for name, value in r["params"].items():
            torch.testing.assert_close(value, want[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    assert "replica 1" in "".join(outs)
