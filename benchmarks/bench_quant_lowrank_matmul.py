"""Benchmark y = dequant(W_hat) x + U (V^T x): dense, torch int4, torch dequantise-then-GEMM and lowrank_ops.

    python benchmarks/bench_quant_lowrank_matmul.py --out benchmarks/results [--bits 4] [--dtype bf16]

Grid (GPU): W shapes m x n (out x in) 4096x4096, 11008x4096, 4096x11008 (Llama-2-7B), group size 128, ranks
64 and 128, M in {1, 16, 64, 2048} rows of x; --shapes / --ranks / --ms / --group-size override it (issue 5
lists r = 32..256 and M = 1..256 too).

Providers (rank-independent ones have rank = null and are drawn as horizontal lines):
- dense: F.linear(x, W) with W = W_hat in x's dtype: the layer the quantized one replaces.
- torch_int4: torch.ops.aten._weight_int4pack_mm (tinygemm, the kernel torchao's int4 weight-only uses) on the
  same codes, scales and zero points (tinygemm's zero is (8 - z) s in bf16), no residual. Skipped, with the
  reason in the row, where the device has no such kernel (CPU builds, or bits != 4).
- torch_int4_residual: torch_int4 plus the unfused residual F.linear(F.linear(x, V), U) added to it.
- torch_dequant_gemm: `quant_lowrank_matmul_ref`, the test reference: dequantise in torch, then the GEMMs.
- lowrank_ops: torch.ops.lowrank_ops.quant_lowrank_matmul with the AUTO backend (row's `backend` says which).
- lowrank_ops_base: the same op without a residual (v = u = None): "fused without residual".
- lowrank_ops_triton: the op forced onto the Triton backend (GPU only).
- lowrank_ops_cuda: the op forced onto the CUDA backend (csrc/ decode kernels; GPU with the extension built,
  M <= 16 only: other rows carry the reason in `error`). Dropped, with the reason printed, where it cannot run.
- lowrank_ops_cuda_v2: the int4 kernel v2 (csrc/quant_lowrank_decode_v2.cu, docs/INT4_V2.md) on the same weight
  converted to layout v2 (`quant_format.to_layout_v2`), through the private op quant_lowrank_matmul_v2_cuda; never
  measured before its first GPU run, and not in AUTO until then. Dropped where the extension lacks the op.

Timing, rotation beyond L2, CUDA graphs and the JSON / PNG format are those of `lowrank_ops.benchmarking` and
benchmarks/plot.py (see benchmarks/bench_lowrank_matmul.py). Bytes are the fewest the op must move: packed
codes, scales and zeros, V and U, x and y once each (dense: W, x, y); flops 2 M m n + 2 M r (m + n).
Every output is checked against float64 on the first argument set (`rel_err`).

Without a GPU it runs the torch paths on a tiny grid, and the device name, file name and plot title say CPU.
Results: `<out>/quant_lowrank_matmul-<device>.json` (+ .png), rewritten atomically after every shape.
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
    kernel_bench_header,
    load_previous_rows,
    measure_row,
    resolve_common_args,
    shape_list,
)

import lowrank_ops  # noqa: E402, F401  (registers torch.ops.lowrank_ops.*)
from lowrank_ops.benchmarking import OpCost, dense_linear_cost, int_list, sets_to_exceed_l2, write_results  # noqa: E402
from lowrank_ops.ops.reference import quant_lowrank_matmul_ref  # noqa: E402
from lowrank_ops.quant_format import (  # noqa: E402
    dequantize_packed,
    num_groups,
    pack,
    packed_width,
    to_layout_v2,
    unpack_codes,
)

BENCH = "quant_lowrank_matmul"
OP = "quant_lowrank_matmul"

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
RANKS = (64, 128)
MS = (1, 16, 64, 2048)
GROUP_SIZE = 128
PROVIDERS = (
    "dense",
    "torch_int4",
    "torch_int4_residual",
    "torch_dequant_gemm",
    "lowrank_ops",
    "lowrank_ops_base",
    "lowrank_ops_triton",
    "lowrank_ops_cuda",
    "lowrank_ops_cuda_v2",
)
BASE_ONLY = ("dense", "torch_int4", "lowrank_ops_base")  # rank-independent rows
# Without a GPU: one small shape, two ranks, torch providers only (the Triton interpreter is no timing).
CPU_GRID = {"shapes": ((2048, 1024),), "ranks": (32, 64), "ms": (1, 16, 64)}
GPU_ONLY = ("lowrank_ops_triton", "lowrank_ops_cuda", "lowrank_ops_cuda_v2")
CPU_PROVIDERS = tuple(p for p in PROVIDERS if p not in GPU_ONLY)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_REL_ERR = {"bf16": 2e-2, "fp16": 4e-3}  # rel_err vs float64 above this marks the row as an error
BACKEND_OF = {
    "lowrank_ops": "auto",
    "lowrank_ops_base": "auto",
    "lowrank_ops_triton": "triton",
    "lowrank_ops_cuda": "cuda",
}
INT4_INNER_K_TILES = 8  # torchao's default for _convert_weight_to_int4pack


def quant_lowrank_matmul_cost(M: int, m: int, n: int, rank: int, bits: int, group_size: int, itemsize: int) -> OpCost:
    """Packed codes + scales and zeros (x's dtype) + V, U + x + y, each once; flops of base and residual."""
    word_bytes = 4 if bits <= 4 else 1
    nbytes = m * packed_width(n, bits) * word_bytes + 2 * m * num_groups(n, group_size) * itemsize
    nbytes += (rank * (m + n) + M * n + M * m) * itemsize
    return OpCost(bytes=nbytes, flops=2 * M * m * n + 2 * M * rank * (m + n))


# ---------------------------------------------------------------------------------------------------- providers


def _int4_unavailable_reason(device: torch.device, bits: int) -> str | None:
    """None when aten._weight_int4pack_mm runs on `device`, else why not (tried on a tiny problem)."""
    if bits != 4:
        return f"aten._weight_int4pack_mm is 4-bit only (bits={bits})"
    try:
        codes = torch.randint(0, 16, (64, 256), dtype=torch.int32, device=device)
        packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8)
        sz = torch.ones(2, 64, 2, dtype=torch.bfloat16, device=device)
        torch.ops.aten._weight_int4pack_mm(torch.randn(2, 256, dtype=torch.bfloat16, device=device), packed, 128, sz)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"aten._weight_int4pack_mm is unavailable on {device.type} in torch {torch.__version__}: " + (
            f"{type(exc).__name__}: {first[:160]}"
        )
    return None


def _to_tinygemm(packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(int4pack weight, scales_and_zeros (G, m, 2) bf16) computing the same W_hat: tinygemm dequantises
    (q - 8) s + zero, so zero = (8 - z) s (rounded to bf16, a rounding the fp32 kernels do not have)."""
    codes = unpack_codes(packed).to(torch.int32)
    weight = torch.ops.aten._convert_weight_to_int4pack(
        (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), INT4_INNER_K_TILES
    )
    s, z = packed.scales.float(), packed.zeros.float()
    scales_and_zeros = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return weight, scales_and_zeros


def _dense(x, w):
    return F.linear(x, w)


def _torch_int4(x, w_int4, sz, group_size):
    return torch.ops.aten._weight_int4pack_mm(x, w_int4, group_size, sz)


def _torch_int4_residual(x, w_int4, sz, group_size, v, u):
    return torch.ops.aten._weight_int4pack_mm(x, w_int4, group_size, sz) + F.linear(F.linear(x, v), u)


def _op(x, q, s, z, v, u, bits, group_size):
    return torch.ops.lowrank_ops.quant_lowrank_matmul(x, q, s, z, v, u, None, bits, group_size)


def _op_v2(x, q, s, z, v, u, m, group_size):
    return torch.ops.lowrank_ops.quant_lowrank_matmul_v2_cuda(x, q, s, z, v, u, None, m, group_size)


def _reference(x, q, s, z, v, u, bits, group_size):
    return quant_lowrank_matmul_ref(x, q, s, z, v, u, None, bits, group_size)


FUNCS = {
    "dense": _dense,
    "torch_int4": _torch_int4,
    "torch_int4_residual": _torch_int4_residual,
    "torch_dequant_gemm": _reference,
    "lowrank_ops": _op,
    "lowrank_ops_base": _op,
    "lowrank_ops_triton": _op,
    "lowrank_ops_cuda": _op,
    "lowrank_ops_cuda_v2": _op_v2,
}


# ------------------------------------------------------------------------------------------------------ runner


def _measure(provider, sets, ref, meta, cost, peaks, device, args, skip_reason=None) -> dict:
    """One row: check the provider against float64 on set 0, then time it over the rotated sets."""
    row = {"op": OP, "provider": provider, **meta, "backend": "torch", "error": None, "skipped": skip_reason}
    if skip_reason is not None:
        row["median_us"] = None
        return row
    return measure_row(
        row, FUNCS[provider], sets, ref, cost, peaks, args, device=device, backend=BACKEND_OF.get(provider),
        max_rel_err=MAX_REL_ERR[meta["dtype"]],
    )  # fmt: skip


def _row_key(row: dict) -> tuple:
    keys = ("provider", "m", "n", "rank", "M", "dtype", "bits", "group_size")
    return tuple(row.get(k) for k in keys)


def run(args: argparse.Namespace, header: dict) -> list[dict]:
    device = torch.device("cuda" if header["is_gpu"] else "cpu")
    dtype = DTYPES[args.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    peaks, bits, g = header["peaks"], args.bits, args.group_size
    rows: list[dict] = list(args.previous_rows)
    int4_reason = (
        _int4_unavailable_reason(device, bits) if {"torch_int4", "torch_int4_residual"} & set(args.providers) else None
    )
    header["torch_int4"] = int4_reason or "available"
    torch.manual_seed(0)

    def randn(shape, scale=1.0):
        return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)  # never zeros

    def quantized(m, n):
        codes = torch.randint(0, 2**bits, (m, n), device=device, dtype=torch.uint8)
        scales = (0.5 + torch.rand(m, num_groups(n, g), device=device)) * (2.0 / 2**bits) * (3.0 / n) ** 0.5
        zeros = torch.randint(0, 2**bits, scales.shape, device=device).float()
        return pack(codes, scales, zeros, bits, g, dtype)

    def n_sets(nbytes):
        return max(1, min(sets_to_exceed_l2(nbytes, l2_bytes=header["l2_bytes_for_rotation"]), args.max_sets))

    def keep(new):
        key = _row_key(new)
        rows[:] = [r for r in rows if _row_key(r) != key]
        rows.append(new)

    def meta_for(m, n, rank, M):
        return {"m": m, "n": n, "rank": rank, "M": M, "dtype": args.dtype, "bits": bits, "group_size": g}

    for m, n in args.shapes:
        t_shape = time.perf_counter()
        k_max = n_sets(quant_lowrank_matmul_cost(1, m, n, 0, bits, g, itemsize).bytes)  # the smallest working set
        packs = [quantized(m, n) for _ in range(k_max)]
        packs_v2 = [to_layout_v2(p) for p in packs] if "lowrank_ops_cuda_v2" in args.providers else None
        tiny = [_to_tinygemm(p) for p in packs] if int4_reason is None and bits == 4 else None
        xs = {M: [randn((M, n)) for _ in range(k_max)] for M in args.ms}
        for M in args.ms:
            p0, x0 = packs[0], xs[M][0]
            q_args = [(packs[i].qweight, packs[i].scales, packs[i].zeros) for i in range(k_max)]
            # Rank-independent rows: dense, torch int4 alone, lowrank_ops without residual.
            base_cost = quant_lowrank_matmul_cost(M, m, n, 0, bits, g, itemsize)
            k = n_sets(base_cost.bytes)
            base_ref = quant_lowrank_matmul_ref(
                x0.double(), p0.qweight, p0.scales.double(), p0.zeros.double(), None, None, None, bits, g
            )
            for provider in [p for p in args.providers if p in BASE_ONLY]:
                meta = meta_for(m, n, None, M)
                if provider == "dense":
                    cost = dense_linear_cost(M, m, n, itemsize)
                    ws = [dequantize_packed(packs[i]).contiguous() for i in range(n_sets(cost.bytes))]
                    sets = [(xs[M][i], w) for i, w in enumerate(ws)]
                    ref = x0.double() @ ws[0].double().T
                    keep(_measure(provider, sets, ref, meta, cost, peaks, device, args))
                    del ws
                elif provider == "torch_int4":
                    sets = [(xs[M][i], *tiny[i], g) for i in range(k)] if tiny else []
                    keep(_measure(provider, sets, base_ref, meta, base_cost, peaks, device, args, int4_reason))
                else:
                    sets = [(xs[M][i], *q_args[i], None, None, bits, g) for i in range(k)]
                    keep(_measure(provider, sets, base_ref, meta, base_cost, peaks, device, args))
            for rank in [r for r in args.ranks if r < min(m, n)] if rank_providers(args) else []:
                cost = quant_lowrank_matmul_cost(M, m, n, rank, bits, g, itemsize)
                k = n_sets(cost.bytes)
                vs = [randn((rank, n), n**-0.5) for _ in range(k)]
                us = [randn((m, rank), 0.3 * rank**-0.5) for _ in range(k)]  # residual ~0.3 x the base, like EoRA's
                ref = quant_lowrank_matmul_ref(
                    x0.double(), p0.qweight, p0.scales.double(), p0.zeros.double(), vs[0].double(), us[0].double(),
                    None, bits, g,
                )  # fmt: skip
                for provider in rank_providers(args):
                    meta = meta_for(m, n, rank, M)
                    if provider == "torch_int4_residual":
                        sets = [(xs[M][i], *tiny[i], g, vs[i], us[i]) for i in range(k)] if tiny else []
                        keep(_measure(provider, sets, ref, meta, cost, peaks, device, args, int4_reason))
                    elif provider == "lowrank_ops_cuda_v2":
                        sets = [(xs[M][i], packs_v2[i].qweight, packs_v2[i].scales, packs_v2[i].zeros, vs[i], us[i],
                                 m, g) for i in range(k)]  # fmt: skip
                        keep(_measure(provider, sets, ref, meta, cost, peaks, device, args))
                    else:
                        sets = [(xs[M][i], *q_args[i], vs[i], us[i], bits, g) for i in range(k)]
                        keep(_measure(provider, sets, ref, meta, cost, peaks, device, args))
        del packs, packs_v2, tiny, xs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        path = write_results(Path(args.out), BENCH, header, rows)
        print(f"{m}x{n}: {time.perf_counter() - t_shape:.1f} s -> {path}", flush=True)
    return rows


def rank_providers(args) -> list[str]:
    return [p for p in args.providers if p not in BASE_ONLY]


# -------------------------------------------------------------------------------------------------- reporting


def format_table(header: dict, rows: list[dict]) -> str:
    """One line per (shape, M, rank): every provider's median us (rank-independent ones on every line)."""
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    base = {(r["m"], r["n"], r["M"], r["provider"]): r for r in rows if r["provider"] in BASE_ONLY}
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["provider"] not in BASE_ONLY:
            cells.setdefault((r["m"], r["n"], r["M"], r["rank"]), {})[r["provider"]] = r
    if not cells:
        cells = {(m, n, M, None): {} for (m, n, M, _) in base}
    label = "CPU ONLY, not GPU numbers" if not header["is_gpu"] else "GPU"
    names = {
        "torch_int4_residual": "int4+resid",
        "torch_dequant_gemm": "deq+gemm",
        "lowrank_ops": "lowrank_ops",
        "lowrank_ops_base": "lr_ops_base",
        "lowrank_ops_triton": "lr_triton",
        "lowrank_ops_cuda": "lr_cuda",
        "lowrank_ops_cuda_v2": "lr_cuda_v2",
    }
    head = f"{'m x n':>11} {'M':>5} {'rank':>5} |" + "".join(f" {names.get(p, p):>11}" for p in providers)
    head += " | backend  %floor"
    lines = [f"{BENCH} on {header['device']} ({label}); median us per call", head, "-" * len(head)]

    def us(r):
        if r is None:
            return f"{'':>12}"
        if r.get("skipped"):
            return f" {'skip':>11}"
        return f" {'ERROR':>11}" if r.get("median_us") is None else f" {r['median_us']:11.1f}"

    for (m, n, M, rank), by_p in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3] or 0)):
        line = f"{f'{m}x{n}':>11} {M:>5} {rank if rank is not None else '-':>5} |"
        line += "".join(us(base.get((m, n, M, p))) if p in BASE_ONLY else us(by_p.get(p)) for p in providers)
        op = by_p.get("lowrank_ops") or base.get((m, n, M, "lowrank_ops_base")) or {}
        pct = op.get("pct_of_byte_floor")
        line += f" | {op.get('backend', ''):7} " + ("" if pct is None else f"{pct:6.1f}")
        lines.append(line)
    if header.get("torch_int4") not in (None, "available"):
        lines.append(f"torch_int4 skipped: {header['torch_int4']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--bits", type=int, choices=(3, 4, 8), default=4)
    p.add_argument("--group-size", type=int, default=GROUP_SIZE)
    p.add_argument("--shapes", type=shape_list, default=None, help="MxN,... (out x in)")
    p.add_argument("--ms", type=int_list, default=None, help="rows of x, e.g. 1,16,64,2048")
    p.add_argument("--ranks", type=int_list, default=None, help="residual ranks, e.g. 64,128")
    add_common_bench_args(p, BENCH, PROVIDERS)
    return p.parse_args(argv)


def resolve_grid(args: argparse.Namespace, is_gpu: bool) -> argparse.Namespace:
    fill_grid(args, is_gpu, {"shapes": SHAPES, "ranks": RANKS, "ms": MS}, None, CPU_GRID)
    args = drop_unavailable_cuda_provider(resolve_common_args(args, is_gpu, PROVIDERS, CPU_PROVIDERS), OP)
    if "lowrank_ops_cuda_v2" in args.providers and (
        "lowrank_ops_cuda" not in args.providers or not hasattr(torch.ops.lowrank_ops, "quant_lowrank_matmul_v2_cuda")
    ):
        print("provider lowrank_ops_cuda_v2 skipped: no CUDA extension with quant_lowrank_matmul_v2_cuda", flush=True)
        args.providers = tuple(p for p in args.providers if p != "lowrank_ops_cuda_v2")
    return args


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
        rotation="argument sets (packed weights, factors, x) rotated until their total exceeds 2 x L2",
        definitions={
            "bytes": "fewest bytes moved: packed codes + scales and zeros + V, U + x + y (dense: W + x + y)",
            "flops": "2 M m n + 2 M r (m + n)",
            "pct_of_byte_floor": "byte_floor_us / median_us * 100 (100 = at the floor)",
            "rel_err": "||y - y64|| / ||y64|| against float64 on the first argument set",
            "skipped": "reason a provider could not run on this device (no timing, not an error)",
        },
        cpu_note="CPU only: torch providers on a tiny grid; these are not GPU numbers",
        dtype=args.dtype,
        bits=args.bits,
        group_size=args.group_size,
        providers=list(args.providers),
        grid={"shapes_mxn": [list(s) for s in args.shapes], "ranks": list(args.ranks), "ms": list(args.ms)},
    )
    args.previous_rows = load_previous_rows(args.out, BENCH, header, args.merge)
    print(f"{BENCH}: {header['device']} | torch {header['torch']} | {args.dtype} int{args.bits} g{args.group_size}")
    rows = run(args, header)
    return finish_bench(args.out, BENCH, header, rows, format_table(header, rows), t0, plot=not args.no_plot)


if __name__ == "__main__":
    raise SystemExit(main())
