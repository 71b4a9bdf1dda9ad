"""Data-parallel compression (lowrank_ops.compress.distributed): a 2-process gloo job (torchrun) gives the ranks and,
within float32 rounding, the weights of one process; the helpers that split the work."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from method_outputs import CASES, _config, _model, _tokens
from torch import nn

from lowrank_ops.compress import compress_
from lowrank_ops.compress.distributed import World

JOB = Path(__file__).with_name("jobs") / "distributed_compress.py"
JOB_CASES = ["whiten-loss", "whiten-uniform-sequential", "eora-int4-g16", "swsc-columns-eora",
             "basis-whiten-fisher-trained"]  # fmt: skip
# Statistics summed over processes differ from one process's by the order of float64 additions (~1e-16); the float32
# decompositions downstream amplify that to ~1e-7 relative (measured: 1e-9 to 4e-7 over these cases).
WEIGHT_RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process(name: str) -> tuple[list, dict[str, torch.Tensor]]:
    kind, fields = CASES[name]
    model = _model()
    extra = dict(train=_tokens(4, seed=1), heldout=_tokens(2, seed=2)) if fields.get("train_steps", 0) else {}
    report = compress_(model, _config(kind, fields), _tokens(), progress=False, **extra)
    weights = {n: m.to_linear().weight.detach().double() for n, m in model.named_modules() if hasattr(m, "to_linear")}
    return [layer.rank for layer in report.layers], weights


def test_two_gloo_processes_compress_like_one(tmp_path):
    out = tmp_path / "two.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), str(JOB), "--out", str(out), *JOB_CASES]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = torch.load(out)
    for name in JOB_CASES:
        ranks, weights = _single_process(name)
        assert two[name]["world_size"] == 2
        assert two[name]["ranks"] == ranks, name
        assert two[name]["weights"].keys() == weights.keys()
        for layer, weight in weights.items():
            error = (two[name]["weights"][layer] - weight).norm() / weight.norm()
            assert error <= WEIGHT_RTOL, f"{name} {layer}: {error:.2e}"


def test_work_is_split_by_cost_and_windows_by_stride():
    layers = [nn.Linear(64, 64), nn.Linear(64, 256), nn.Linear(256, 64), nn.Linear(16, 16)]
    assert World().owners(layers) == [0, 0, 0, 0]
    owners = World(0, 2).owners(layers)
    assert owners[1] != owners[2]  # the two large layers go to different processes
    windows = torch.arange(10).view(5, 2)
    assert World(1, 2).shard(windows).tolist() == [[2, 3], [6, 7]]
    assert World(0, 1).shard(windows) is windows
    with pytest.raises(ValueError, match="3 calibration windows cannot be shared by 4 processes"):
        World(0, 4).shard(windows[:3])
