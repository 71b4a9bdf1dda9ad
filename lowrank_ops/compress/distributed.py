"""Data-parallel compression with torch.distributed: what each process of `torchrun --nproc-per-node N -m lowrank_ops
compress ...` does differently from a single process.

- Calibration windows are sharded (process k takes windows k, k + N, ...); each process accumulates the statistics of
  its shard and the sums (mean |x| numerators, Grams, token counts) are added with one all_reduce per distinct
  statistics object: the statistics equal the single-process ones up to the order of float64 additions.
- A method's global step (`select`: allocation, scores, k-means) runs on process 0 and its result is broadcast, so
  every process fits against one plan whatever the numerics of its device.
- Layer fits are spread over the processes by cost (the SVD of an (m, n) layer costs ~ m n min(m, n): longest job
  first onto the least-loaded process); each process fits its own layers, then every fitted module is broadcast from
  its owner, so every process holds the same compressed model (sequential mode needs it for the next layer's inputs).
- The last step (`finish`: re-learning, folding) and everything after it -- evaluation, saving -- run on process 0.

One process (no process group) is the world of size 1: every function here is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from lowrank_ops.modules import CompressedLinear
from lowrank_ops.surgery import linear_weight, replace_module


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> World:
        """The initialised default process group, or the world of one process."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, windows: torch.Tensor | None) -> torch.Tensor | None:
        """This process's calibration windows: rows rank, rank + size, ..."""
        if windows is None or self.size == 1:
            return windows
        if windows.shape[0] < self.size:
            raise ValueError(f"compress_: {windows.shape[0]} calibration windows cannot be shared by {self.size} "
                             "processes (one window each at least): give more calibration tokens")  # fmt: skip
        return windows[self.rank :: self.size]

    def all_reduce_statistics(self, stats: dict) -> None:
        """Sum every distinct statistics object of `stats` (name -> InputStatistics, shared objects once) over the
        processes, in place, in the order of the names (the same on every process)."""
        if self.size == 1:
            return
        seen: set[int] = set()
        for name in sorted(stats):
            item = stats[name]
            if id(item) in seen:
                continue
            seen.add(id(item))
            counts = torch.tensor([item._token_count, item._n_updates], dtype=torch.float64)
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(item._abs_sum)
            if item.track_gram:
                torch.distributed.all_reduce(item._gram)
            item._token_count, item._n_updates = (int(v) for v in counts.tolist())

    def broadcast(self, value, src: int = 0):
        """`value` of process `src` on every process (pickled; any Python object holding tensors)."""
        if self.size == 1:
            return value
        box = [value if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def owners(self, modules: list[nn.Module]) -> list[int]:
        """The process that fits each module: longest job first onto the least-loaded process (ties: lowest rank)."""
        if self.size == 1:
            return [0] * len(modules)
        costs = []
        for module in modules:
            m, n = linear_weight(module).shape
            costs.append(m * n * min(m, n))
        load = [0] * self.size
        owner = [0] * len(modules)
        for index in sorted(range(len(modules)), key=lambda i: (-costs[i], i)):
            rank = min(range(self.size), key=lambda r: (load[r], r))
            owner[index] = rank
            load[rank] += costs[index]
        return owner

    def share_module(self, model: nn.Module, name: str, owner: int, row):
        """After `owner` fitted layer `name`: its module (manifest entry + tensors) and report row on every process.
        Returns the row."""
        if self.size == 1:
            return row
        payload = None
        if self.rank == owner:
            module = model.get_submodule(name)
            if isinstance(module, CompressedLinear):
                state = {key: value.detach().cpu() for key, value in module.state_dict().items()}
                payload = (module.manifest_entry(), state)
        row, payload = self.broadcast((row, payload), src=owner)
        if self.rank != owner and payload is not None:
            entry, state = payload
            device = linear_weight(model.get_submodule(name)).device
            with torch.device("meta"):
                module = CompressedLinear.from_manifest(name, entry)
            module.load_state_dict(state, assign=True)
            replace_module(model, name, module.to(device))
        return row


def init_from_environment(device: str) -> World:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): gloo on CPU, NCCL on CUDA (each
    process on cuda:LOCAL_RANK). Without those variables, the world of one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not torch.distributed.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return World.current()
