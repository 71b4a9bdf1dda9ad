"""Benchmark the SWSC shared-channel linear y = x W^T + (x V^T) U^T: dense vs naive torch vs the lowrank_ops op.

    python benchmarks/bench_codebook.py --out benchmarks/results [--quick] [--dtype bf16]

W (m x n, out x in) is stored as a codebook of K shared channels plus an int32 index (issue 6):
rows shared, C (K, n) and idx (m,) with W = C[idx]; columns shared, C (m, K) and idx (n,) with W = C[:, idx];
optionally plus a rank-r residual U V. Grid: W shapes 4096x4096, 11008x4096, 4096x11008 (Llama-2-7B); K in
{256, 1024}; r in {0, 128}; M in {1, 16, 128} rows of x; both shared modes (rows first).

Providers:
- dense: F.linear(x, W) with a dense W (m, n): the layer the codebook replaces (K-independent: a dashed line).
- torch_materialise: `codebook_matmul_ref` (the test reference): materialise C[idx] (or C[:, idx]) every call,
  then x W^T plus the residual as two matmuls.
- torch_gather: the op forced onto its torch backend: F.linear(x, C)[:, idx] (rows) or index_add_ segment sums
  then F.linear (columns), the residual by addmm.
- lowrank_ops: torch.ops.lowrank_ops.codebook_matmul with the AUTO backend (the row's `backend` says which).
- lowrank_ops_triton: the same op forced onto the Triton backend (GPU only).

Timing (`lowrank_ops.benchmarking.time_op`): on a GPU, each configuration rotates over enough independent copies
of the weights and activations to exceed 2 x L2 and is timed as CUDA-graph replays with CUDA events; rows report
median / p20 / p80 microseconds per call. Bytes are the fewest the op must move: codebook + index + V, U + x + y
(dense: W + x + y); flops are 2 M K n (rows) or M n + 2 M m K (columns) plus 2 M r (m + n) (dense: 2 M m n).
`pct_of_byte_floor` = byte floor / median x 100. Each output is checked against float64 on the first set.
Plot: one panel row per (mode, shape, rank), one column per M, x = K.

On a machine without a GPU it runs only the torch paths (dense, torch_materialise and lowrank_ops, whose AUTO
backend is torch there) on a reduced grid, and the device name, file name and plot title say CPU.
Results: `<out>/codebook-<device>.json` (+ .png), rewritten atomically after every shape and mode.
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
    fill_grid,
    finish_bench,
    kernel_bench_header,
    load_previous_rows,
    measure_row,
    resolve_common_args,
    shape_list,
)

import lowrank_ops  # noqa: E402, F401  (registers torch.ops.lowrank_ops.*)
from lowrank_ops.benchmarking import OpCost, dense_linear_cost, int_list, sets_to_exceed_l2, write_results  # noqa: E402
from lowrank_ops.ops.reference import codebook_matmul_ref  # noqa: E402

BENCH = "codebook"
OP = "codebook_matmul"

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
KS = (256, 1024)
RANKS = (0, 128)
MS = (1, 16, 128)
MODES = ("rows", "columns")
PROVIDERS = ("dense", "torch_materialise", "torch_gather", "lowrank_ops", "lowrank_ops_triton")

# --quick on a GPU: the headline shape at decode sizes, both modes.
QUICK_GPU = {"shapes": ((4096, 4096),), "ks": KS, "ranks": RANKS, "ms": (1, 16), "modes": MODES}
# Without a GPU (always quick): one smaller shape, torch providers only; about a minute on 2 cores.
CPU_GRID = {"shapes": ((2048, 2048),), "ks": KS, "ranks": RANKS, "ms": MS, "modes": MODES}
CPU_PROVIDERS = ("dense", "torch_materialise", "lowrank_ops")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_REL_ERR = {"bf16": 2e-2, "fp16": 4e-3, "fp32": 2e-3}  # rel_err vs float64 above this marks an error row
BACKEND_OF = {"torch_gather": "torch", "lowrank_ops": "auto", "lowrank_ops_triton": "triton"}
PLOT = {"x": "K", "panel_cols": "M", "line": "provider", "shape_keys": ["panel"]}


def codebook_matmul_cost(shared: str, M: int, m: int, n: int, K: int, rank: int, itemsize: int) -> OpCost:
    """Codebook + int32 index + V, U + x + y, each once; flops of the shared part (the gather and the segment
    sum's adds as listed in the module docstring) and of the residual."""
    rows = shared == "rows"
    weights = (K * n if rows else m * K) + rank * (m + n)
    nbytes = (weights + M * n + M * m) * itemsize + 4 * (m if rows else n)
    flops = (2 * M * K * n if rows else M * n + 2 * M * m * K) + 2 * M * rank * (m + n)
    return OpCost(bytes=nbytes, flops=flops)


def _dense(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def _materialise(x, c, idx, v, u, shared):
    return codebook_matmul_ref(x, c, idx, v, u, None, shared)


def _op(x, c, idx, v, u, shared):
    return torch.ops.lowrank_ops.codebook_matmul(x, c, idx, v, u, None, shared)


FUNCS = {
    "dense": _dense,
    "torch_materialise": _materialise,
    "torch_gather": _op,
    "lowrank_ops": _op,
    "lowrank_ops_triton": _op,
}


def _measure(provider, sets, ref, meta, cost, peaks, device, args) -> dict:
    """One row: check the provider's output against float64 on set 0, then time it over the rotated sets."""
    row = {"op": OP, "provider": provider, **meta, "backend": "torch", "error": None}
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

    def randn(shape, scale=1.0):
        return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)  # never zeros (METHOD.md)

    def sets_for(nbytes: int) -> int:
        return max(1, min(sets_to_exceed_l2(nbytes, l2_bytes=header["l2_bytes_for_rotation"]), args.max_sets))

    def keep(new: dict) -> None:
        key = _row_key(new)
        rows[:] = [r for r in rows if _row_key(r) != key]
        rows.append(new)

    codebook_providers = [p for p in args.providers if p != "dense"]
    for m, n in args.shapes:
        for shared in args.modes:
            t_part = time.perf_counter()
            for rank in [r for r in args.ranks if r <= min(m, n)]:
                panel = f"{shared}-shared {m}x{n} r={rank}"
                for M in args.ms:
                    meta = {"shared": shared, "m": m, "n": n, "rank": rank, "M": M, "dtype": args.dtype}
                    meta["panel"] = panel
                    if "dense" in args.providers:
                        cost = dense_linear_cost(M, m, n, itemsize)
                        k = sets_for(cost.bytes)
                        sets = [(randn((M, n)), randn((m, n), n**-0.5)) for _ in range(k)]
                        ref = sets[0][0].double() @ sets[0][1].double().T
                        keep(_measure("dense", sets, ref, {**meta, "K": None}, cost, peaks, device, args))
                        del sets, ref
                    for K in [K for K in args.ks if K <= (m if shared == "rows" else n)] if codebook_providers else []:
                        cost = codebook_matmul_cost(shared, M, m, n, K, rank, itemsize)
                        k = sets_for(cost.bytes)
                        sets = []
                        for _ in range(k):
                            if shared == "rows":
                                c = randn((K, n), n**-0.5)
                                idx = torch.randint(0, K, (m,), device=device, dtype=torch.int32)
                            else:
                                c = randn((m, K), n**-0.5)
                                idx = torch.randint(0, K, (n,), device=device, dtype=torch.int32)
                            v = randn((rank, n), n**-0.5) if rank else None
                            u = randn((m, rank), rank**-0.5) if rank else None
                            sets.append((randn((M, n)), c, idx, v, u, shared))
                        x0, c0, idx0, v0, u0, _ = sets[0]
                        d = lambda t: None if t is None else t.double()  # noqa: E731
                        ref = codebook_matmul_ref(d(x0), d(c0), idx0, d(v0), d(u0), None, shared)
                        for provider in codebook_providers:
                            keep(_measure(provider, sets, ref, {**meta, "K": K}, cost, peaks, device, args))
                        del sets, ref
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            path = write_results(out_dir, BENCH, header, rows)
            print(f"{m}x{n} {shared}-shared: {time.perf_counter() - t_part:.1f} s -> {path}", flush=True)
    return rows


def _row_key(row: dict) -> tuple:
    keys = ("provider", "shared", "m", "n", "K", "rank", "M", "dtype")
    return tuple(row.get(k) for k in keys)


def format_table(header: dict, rows: list[dict]) -> str:
    """One line per (mode, shape, rank, M, K): every provider's median us, and lowrank_ops' backend and % of
    the byte floor; the dense layer of the same (mode, shape, rank, M) on every K's line."""
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]

    def key(r: dict) -> tuple:
        return r["shared"], r["m"], r["n"], r["rank"], r["M"], r["dtype"]

    dense = {key(r): r for r in rows if r["provider"] == "dense"}
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["provider"] != "dense":
            cells.setdefault((*key(r), r["K"]), {})[r["provider"]] = r
    if not cells:
        cells = {(*key, None): {} for key in dense}
    label = "CPU ONLY, not GPU numbers" if not header["is_gpu"] else "GPU"
    names = {"torch_materialise": "materialise", "torch_gather": "gather", "lowrank_ops_triton": "lr_triton"}
    head = f"{'mode':7} {'m x n':>11} {'rank':>4} {'M':>4} {'K':>5} |"
    head += "".join(f" {names.get(p, p):>11}" for p in providers) + " | backend  %floor"
    lines = [f"{BENCH} on {header['device']} ({label}); median us per call", head, "-" * len(head)]

    def us(r):
        if r is None:
            return f" {'':>11}"
        return f" {'ERROR':>11}" if r.get("median_us") is None else f" {r['median_us']:11.1f}"

    order = {mode: i for i, mode in enumerate(MODES)}
    for cell, by_p in sorted(cells.items(), key=lambda kv: (order[kv[0][0]], *kv[0][1:6], kv[0][6] or 0)):
        shared, m, n, rank, M, _, K = cell
        line = f"{shared:7} {f'{m}x{n}':>11} {rank:>4} {M:>4} {K if K is not None else '-':>5} |"
        line += "".join(us(dense.get(cell[:6])) if p == "dense" else us(by_p.get(p)) for p in providers)
        op = by_p.get("lowrank_ops") or {}
        pct = op.get("pct_of_byte_floor")
        line += f" | {op.get('backend', ''):7} " + ("" if pct is None else f"{pct:6.1f}")
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced grid (always on without a GPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--shapes", type=shape_list, default=None, help="MxN,... (out x in)")
    p.add_argument("--ks", type=int_list, default=None, help="codebook sizes, e.g. 256,1024")
    p.add_argument("--ranks", type=int_list, default=None, help="residual ranks, e.g. 0,128 (0: no residual)")
    p.add_argument("--ms", type=int_list, default=None, help="rows of x, e.g. 1,16,128")
    p.add_argument("--modes", default=None, help="comma list from rows,columns (default both, rows first)")
    add_common_bench_args(p, BENCH, PROVIDERS)
    return p.parse_args(argv)


def resolve_grid(args: argparse.Namespace, is_gpu: bool) -> argparse.Namespace:
    if args.modes is not None:
        args.modes = tuple(mode.strip() for mode in args.modes.split(",") if mode.strip())
        if unknown := sorted(set(args.modes) - set(MODES)):
            raise SystemExit(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    full = {"shapes": SHAPES, "ks": KS, "ranks": RANKS, "ms": MS, "modes": MODES}
    fill_grid(args, is_gpu, full, QUICK_GPU, CPU_GRID)
    return resolve_common_args(args, is_gpu, PROVIDERS, CPU_PROVIDERS)


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
        rotation="argument sets (codebook, index, V, U, x; dense: W, x) rotated until their total exceeds 2 x L2",
        definitions={
            "bytes": "fewest bytes moved: codebook + int32 index + V, U + x + y, each once (dense: W + x + y)",
            "flops": "rows: 2 M K n; columns: M n + 2 M m K; plus 2 M r (m + n); dense: 2 M m n",
            "pct_of_byte_floor": "byte_floor_us / median_us * 100 (100 = at the floor)",
            "rel_err": "||y - y64|| / ||y64|| against float64 on the first argument set",
        },
        cpu_note="CPU only: torch providers on a reduced grid; these are not GPU numbers",
        dtype=args.dtype,
        providers=list(args.providers),
        grid={
            "shapes_mxn": [list(s) for s in args.shapes],
            "ks": list(args.ks),
            "ranks": list(args.ranks),
            "ms": list(args.ms),
            "modes": list(args.modes),
            "quick": args.quick,
        },
    )
    header["plot"] = dict(PLOT)  # panels per (mode, shape, rank), x = K, dense as a dashed line
    args.previous_rows = load_previous_rows(args.out, BENCH, header, args.merge)
    print(f"{BENCH}: {header['device']} | torch {header['torch']} | {args.dtype} | {args.providers}", flush=True)
    rows = run(args, header)
    return finish_bench(args.out, BENCH, header, rows, format_table(header, rows), t0, plot=not args.no_plot)


if __name__ == "__main__":
    raise SystemExit(main())
