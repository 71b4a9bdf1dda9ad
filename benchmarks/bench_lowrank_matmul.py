"""Benchmark y = (x V^T) U^T: dense F.linear vs torch two-GEMM vs the lowrank_ops op.

    python benchmarks/bench_lowrank_matmul.py --out benchmarks/results [--quick] [--dtype bf16]

Grid: W shapes m x n (out x in) 4096x4096, 11008x4096, 4096x11008 (Llama-2-7B), 5504x2048, 3424x1024; ranks
from param ratios 0.9 / 0.8 / 0.5 (`lowrank_ops.rank.rank_for_param_ratio`, aligned to 16) plus 64, 128,
256, 512, 1024 (ranks >= min(m, n) skipped); M in {1, 4, 16, 128, 2048} rows of x.

Providers:
- dense: F.linear(x, W) with W (m, n): what the low-rank layer replaces (one row per shape and M, no rank).
- torch_two_gemm: `lowrank_matmul_ref` (the test reference, two plain matmuls): stock PyTorch.
- lowrank_ops: torch.ops.lowrank_ops.lowrank_matmul with the AUTO backend (the row's `backend` says which
  one it chose).
- lowrank_ops_triton: the same op forced onto the Triton backend (GPU only).
- lowrank_ops_cuda: the same op forced onto the CUDA backend (csrc/ decode kernels; GPU with the extension built,
  M <= 16 only: other rows carry the reason in `error`). Dropped, with the reason printed, where it cannot run.

Timing (`lowrank_ops.benchmarking.time_op`): on a GPU, each configuration rotates over enough independent
copies of the weights and activations to exceed 2 x L2 and is timed as CUDA-graph replays with CUDA events;
rows report median / p20 / p80 microseconds per call. Bytes are the fewest the op must move (weights,
x and y once each, the (M, r) intermediate not counted); flops are 2 M r (m + n) for the low-rank op and
2 M m n for dense. `pct_of_byte_floor` = byte floor / median x 100 (100 = at the floor). Each output is
checked against a float64 reference on the first argument set (`rel_err`).

On a machine without a GPU it runs only the torch paths (dense, torch_two_gemm and lowrank_ops, whose AUTO
backend is torch there) on a reduced grid, and the device name, file name and plot title say CPU.
Results: `<out>/lowrank_matmul-<device>.json` (+ .png), rewritten atomically after every shape.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: harness.py, plot.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from harness import (  # noqa: E402
    add_common_bench_args,
    bench_header,
    cpu_threads,
    drop_unavailable_cuda_provider,
    fill_grid,
    finish_bench,
    float_list,
    kernel_bench_header,
    load_previous_rows,
    measure_row,
    resolve_common_args,
    shape_list,
)

import lowrank_ops  # noqa: E402, F401  (registers torch.ops.lowrank_ops.*)
from lowrank_ops.benchmarking import (  # noqa: E402
    dense_linear_cost,
    int_list,
    lowrank_matmul_cost,
    sets_to_exceed_l2,
    write_results,
)
from lowrank_ops.ops.reference import lowrank_matmul_ref  # noqa: E402
from lowrank_ops.rank import param_ratio, rank_for_param_ratio  # noqa: E402

BENCH = "lowrank_matmul"
OP = "lowrank_matmul"

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (5504, 2048), (3424, 1024))
RATIOS = (0.9, 0.8, 0.5)
FIXED_RANKS = (64, 128, 256, 512, 1024)
MS = (1, 4, 16, 128, 2048)
PROVIDERS = ("dense", "torch_two_gemm", "lowrank_ops", "lowrank_ops_triton", "lowrank_ops_cuda")

# --quick on a GPU: the target cells (4096^2 and 11008x4096 at r = 256 / 1024, M = 1..16, 2048).
QUICK_GPU = {"shapes": ((4096, 4096), (11008, 4096)), "ratios": (0.5,), "ranks": (256, 1024), "ms": (1, 4, 16, 2048)}
# Without a GPU (always quick): the two smaller shapes, three M, torch providers only; about a minute on 2 cores.
CPU_GRID = {"shapes": ((5504, 2048), (3424, 1024)), "ratios": RATIOS, "ranks": FIXED_RANKS, "ms": (1, 16, 128)}
CPU_PROVIDERS = ("dense", "torch_two_gemm", "lowrank_ops")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# rel_err vs float64 above this marks the row as an error (a wrong result is not a timing).
MAX_REL_ERR = {"bf16": 2e-2, "fp16": 4e-3, "fp32": 2e-3}
BACKEND_OF = {"lowrank_ops": "auto", "lowrank_ops_triton": "triton", "lowrank_ops_cuda": "cuda"}


def _dense(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _op(x: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return torch.ops.lowrank_ops.lowrank_matmul(x, v, u)


FUNCS = {
    "dense": _dense,
    "torch_two_gemm": lowrank_matmul_ref,
    "lowrank_ops": _op,
    "lowrank_ops_triton": _op,
    "lowrank_ops_cuda": _op,
}


def ranks_for_shape(m: int, n: int, ratios: tuple[float, ...], fixed: tuple[int, ...]) -> list[int]:
    """Ranks from the param ratios (aligned to 16) plus the fixed ones, each < min(m, n), ascending."""
    ranks = {rank_for_param_ratio(m, n, ratio) for ratio in ratios} | set(fixed)
    return sorted(r for r in ranks if 1 <= r < min(m, n))


def _measure(provider, sets, ref, meta, cost, peaks, device, args) -> dict:
    """One row: check the provider's output against float64 on set 0, then time it over the rotated sets."""
    row = {"op": OP, "provider": provider, **meta, "backend": "torch", "error": None}
    # the tensor-core rate in the table is for 16-bit operands; no compute floor is claimed for fp32
    return measure_row(
        row, FUNCS[provider], sets, ref, cost, peaks, args, device=device, backend=BACKEND_OF.get(provider),
        max_rel_err=MAX_REL_ERR[meta["dtype"]], compute_floor=meta["dtype"] in ("bf16", "fp16"),
    )  # fmt: skip


def run(args: argparse.Namespace, header: dict) -> list[dict]:
    device = torch.device("cuda" if header["is_gpu"] else "cpu")
    dtype = DTYPES[args.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    peaks = header["peaks"]
    out_dir = Path(args.out)
    rows: list[dict] = list(args.previous_rows)
    torch.manual_seed(0)

    def fill(pool: list[torch.Tensor], k: int, shape: tuple[int, int], scale: float = 1.0) -> None:
        """Grow `pool` to k independent random tensors (never zeros: METHOD.md)."""
        while len(pool) < k:
            pool.append((torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype))

    def sets_for(nbytes: int) -> int:
        n = sets_to_exceed_l2(nbytes, l2_bytes=header["l2_bytes_for_rotation"])
        return max(1, min(n, args.max_sets))

    def keep(new: dict) -> None:
        key = _row_key(new)
        rows[:] = [r for r in rows if _row_key(r) != key]
        rows.append(new)

    for m, n in args.shapes:
        t_shape = time.perf_counter()
        ranks = ranks_for_shape(m, n, args.ratios, args.ranks)
        xs: dict[int, list[torch.Tensor]] = {M: [] for M in args.ms}
        if "dense" in args.providers:
            ws: list[torch.Tensor] = []
            for M in args.ms:
                cost = dense_linear_cost(M, m, n, itemsize)
                k = sets_for(cost.bytes)
                fill(ws, k, (m, n), scale=n**-0.5)
                fill(xs[M], k, (M, n))
                sets = [(xs[M][i], ws[i]) for i in range(k)]
                ref = xs[M][0].double() @ ws[0].double().T
                meta = {"m": m, "n": n, "rank": None, "M": M, "dtype": args.dtype, "param_ratio": 1.0}
                keep(_measure("dense", sets, ref, meta, cost, peaks, device, args))
            del ws, sets, ref
        lowrank = [p for p in args.providers if p != "dense"]
        for rank in ranks if lowrank else []:
            vs: list[torch.Tensor] = []
            us: list[torch.Tensor] = []
            for M in args.ms:
                cost = lowrank_matmul_cost(M, m, n, rank, itemsize)
                k = sets_for(cost.bytes)
                fill(vs, k, (rank, n), scale=n**-0.5)
                fill(us, k, (m, rank), scale=rank**-0.5)
                fill(xs[M], k, (M, n))
                sets = [(xs[M][i], vs[i], us[i]) for i in range(k)]
                ref = lowrank_matmul_ref(xs[M][0].double(), vs[0].double(), us[0].double())
                meta = {
                    "m": m,
                    "n": n,
                    "rank": rank,
                    "M": M,
                    "dtype": args.dtype,
                    "param_ratio": round(param_ratio(m, n, rank), 4),
                }
                for provider in lowrank:
                    keep(_measure(provider, sets, ref, meta, cost, peaks, device, args))
            del vs, us, sets, ref
        del xs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        path = write_results(out_dir, BENCH, header, rows)
        print(f"{m}x{n}: ranks {ranks}, {time.perf_counter() - t_shape:.1f} s -> {path}", flush=True)
    return rows


def _row_key(row: dict) -> tuple:
    return (row.get("provider"), row.get("m"), row.get("n"), row.get("rank"), row.get("M"), row.get("dtype"))


def format_table(header: dict, rows: list[dict]) -> str:
    """One line per (shape, rank, M): every provider's median us, and lowrank_ops' backend and % of floor."""
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    dense = {(r["m"], r["n"], r["M"], r["dtype"]): r for r in rows if r["provider"] == "dense"}
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["provider"] != "dense":
            cells.setdefault((r["m"], r["n"], r["rank"], r["M"], r["dtype"]), {})[r["provider"]] = r
    if not cells:  # dense only
        cells = {(m, n, None, M, dt): {} for (m, n, M, dt) in dense}
    label = "CPU ONLY, not GPU numbers" if not header["is_gpu"] else "GPU"
    names = {
        "torch_two_gemm": "two_gemm",
        "lowrank_ops": "lowrank_ops",
        "lowrank_ops_triton": "lr_triton",
        "lowrank_ops_cuda": "lr_cuda",
    }
    head = (
        f"{'m x n':>11} {'rank':>5} {'ratio':>6} {'M':>5} |"
        + "".join(f" {names.get(p, p):>11}" for p in providers)
        + " | backend    GB/s  %floor"
    )
    lines = [f"{BENCH} on {header['device']} ({label}); median us per call", head, "-" * len(head)]

    def us(r):
        if r is None:
            return f"{'':>11}"
        return f" {'ERROR':>11}" if r.get("median_us") is None else f" {r['median_us']:11.1f}"

    for (m, n, rank, M, dt), by_p in sorted(
        cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3], kv[0][2] or 0)
    ):
        d = dense.get((m, n, M, dt))
        line = f"{f'{m}x{n}':>11} {rank if rank is not None else '-':>5} "
        ratio = next((r["param_ratio"] for r in by_p.values()), 1.0)
        line += f"{ratio:6.3f} {M:>5} |"
        line += "".join(us(d) if p == "dense" else us(by_p.get(p)) for p in providers)
        op = by_p.get("lowrank_ops") or {}
        gbps, pct = op.get("GBps"), op.get("pct_of_byte_floor")
        line += f" | {op.get('backend', ''):7} {'' if gbps is None else f'{gbps:7.1f}':>7} "
        line += "" if pct is None else f"{pct:6.1f}"
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced grid (always on without a GPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    # Grid overrides (split a long GPU run across calls with --merge; tiny grids for tests).
    p.add_argument("--shapes", type=shape_list, default=None, help="MxN,... (out x in)")
    p.add_argument("--ms", type=int_list, default=None, help="rows of x, e.g. 1,16,2048")
    p.add_argument("--ranks", type=int_list, default=None, help="fixed ranks (default 64,128,256,512,1024)")
    p.add_argument("--ratios", type=float_list, default=None, help="param ratios kept (default 0.9,0.8,0.5)")
    add_common_bench_args(p, BENCH, PROVIDERS)
    return p.parse_args(argv)


def resolve_grid(args: argparse.Namespace, is_gpu: bool) -> argparse.Namespace:
    full = {"shapes": SHAPES, "ratios": RATIOS, "ranks": FIXED_RANKS, "ms": MS}
    fill_grid(args, is_gpu, full, QUICK_GPU, CPU_GRID)
    return drop_unavailable_cuda_provider(resolve_common_args(args, is_gpu, PROVIDERS, CPU_PROVIDERS), OP)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with cpu_threads(args.threads):  # one thread on the CPU by default, see `cpu_threads`
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    header = bench_header()
    args = resolve_grid(args, header["is_gpu"])
    kernel_bench_header(
        header,
        args,
        BENCH,
        rotation="argument sets (weights, x) rotated until their total exceeds 2 x L2",
        definitions={
            "bytes": "fewest bytes moved: weights + x + y, each once (the (M, r) intermediate not counted)",
            "flops": "lowrank: 2 M r (m + n); dense: 2 M m n",
            "pct_of_byte_floor": "byte_floor_us / median_us * 100 (100 = at the floor)",
            "rel_err": "||y - y64|| / ||y64|| against float64 on the first argument set",
        },
        cpu_note="CPU only: torch providers on a reduced grid; these are not GPU numbers",
        dtype=args.dtype,
        providers=list(args.providers),
        grid={
            "shapes_mxn": [list(s) for s in args.shapes],
            "ratios": list(args.ratios),
            "fixed_ranks": list(args.ranks),
            "ms": list(args.ms),
            "ranks": {f"{m}x{n}": ranks_for_shape(m, n, args.ratios, args.ranks) for m, n in args.shapes},
            "quick": args.quick,
        },
    )
    args.previous_rows = load_previous_rows(args.out, BENCH, header, args.merge)
    print(
        f"{BENCH}: {header['device']} | torch {header['torch']} | {args.dtype} | providers {args.providers}", flush=True
    )
    rows = run(args, header)
    return finish_bench(args.out, BENCH, header, rows, format_table(header, rows), t0, plot=not args.no_plot)


if __name__ == "__main__":
    raise SystemExit(main())
