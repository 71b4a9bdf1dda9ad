"""A data-parallel compression job for tests/test_distributed.py: run under `torchrun --nproc-per-node N` (or alone,
N = 1), it compresses a tiny seeded Llama with each case of tests/method_outputs.py named on the command line and,
on process 0, saves every case's report ranks and effective weights (W' = module.to_linear().weight) to --out."""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from method_outputs import CASES, _config, _model, _tokens  # noqa: E402

from lowrank_ops.compress import compress_  # noqa: E402
from lowrank_ops.compress.distributed import init_from_environment  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("cases", nargs="+", choices=list(CASES))
    args = parser.parse_args()
    world = init_from_environment("cpu")
    torch.set_num_threads(1)
    results = {}
    for name in args.cases:
        kind, fields = CASES[name]
        model = _model()
        extra = {}
        if kind == "basis" and fields.get("train_steps", 0) > 0:
            extra = dict(train=_tokens(4, seed=1), heldout=_tokens(2, seed=2))
        report = compress_(model, _config(kind, fields), _tokens(), progress=False, **extra)
        weights = {n: m.to_linear().weight.detach().double() for n, m in model.named_modules()
                   if hasattr(m, "to_linear")}  # fmt: skip
        results[name] = {"ranks": [layer.rank for layer in report.layers], "weights": weights,
                         "world_size": world.size}  # fmt: skip
    if world.is_main:
        torch.save(results, args.out)
    if world.size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
