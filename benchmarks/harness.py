"""What the scripts in benchmarks/ share and the installed library does not: the git revision of this checkout, the
argument types and common flags of the kernel benches, --merge, checking and timing one row, and the last write +
table + plot (`plot.py` beside this file, imported, never run by path).

`lowrank_ops.benchmarking` keeps what `lowrank-ops bench-e2e` / `demo` need and works from an installed wheel:
the environment header, timing, floors and results files. This module runs only from a checkout: the bench scripts
put benchmarks/ on sys.path and import it as `harness`; it is the only place that asks git for the revision.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lowrank_ops.benchmarking import (
    L2_BYTES_HOPPER,
    OpCost,
    byte_floor_us,
    compute_floor_us,
    environment_header,
    measure_copy_bandwidth_GBps,
    read_results,
    results_path,
    time_op,
    write_results,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
KERNEL_PLOT = {"x": "rank", "panel_cols": "M", "line": "provider", "shape_keys": ["m", "n"]}


# ------------------------------------------------------------------------------------------------ git revision


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_revision() -> tuple[str | None, bool | None]:
    """(short sha, dirty) of the repository this file lives in; (None, None) without git or a repository.

    $LOWRANK_OPS_GIT_SHA overrides the sha (for machines that get a copy of the tree without .git).
    Dirty means tracked changes or untracked, non-ignored files, not counting benchmarks/results/.
    """
    if sha := os.environ.get("LOWRANK_OPS_GIT_SHA"):
        return sha, None
    sha = _git("rev-parse", "--short=10", "HEAD")
    if sha is None:
        return None, None
    status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    return sha, (None if status is None else bool(status))


def bench_header() -> dict[str, Any]:
    """`environment_header()` with this checkout's git sha and dirty flag (the library never asks git itself)."""
    sha, dirty = git_revision()
    return environment_header(git_sha=sha, git_dirty=dirty)


def export_git_revision() -> None:
    """Put this checkout's revision in $LOWRANK_OPS_GIT_SHA / $LOWRANK_OPS_GIT_DIRTY (unless already set), where
    `environment_header()` reads it, for benches that hand over to library code (bench_e2e.py)."""
    if os.environ.get("LOWRANK_OPS_GIT_SHA"):
        return
    sha, dirty = git_revision()
    if sha is not None:
        os.environ["LOWRANK_OPS_GIT_SHA"] = sha
        if dirty is not None:
            os.environ["LOWRANK_OPS_GIT_DIRTY"] = "1" if dirty else "0"


# ------------------------------------------------------------------------------------------ bench scaffolding


def float_list(text: str) -> tuple[float, ...]:
    """argparse type: '0.9,0.5' -> (0.9, 0.5)."""
    return tuple(float(t) for t in text.split(",") if t.strip())


def shape_list(text: str) -> tuple[tuple[int, int], ...]:
    """argparse type: '4096x11008,4096x4096' -> ((4096, 11008), (4096, 4096)) (M x N, out x in)."""
    shapes = []
    for item in text.split(","):
        m, _, n = item.strip().lower().partition("x")
        if not (m.isdigit() and n.isdigit()):
            raise argparse.ArgumentTypeError(f"--shapes: {item!r} must be MxN (out x in), e.g. 4096x11008")
        shapes.append((int(m), int(n)))
    return tuple(shapes)


def plot_results(json_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> Path:
    """Draw a results file with benchmarks/plot.py (imported here so that matplotlib loads only when plotting)."""
    from plot import plot_results as draw

    return draw(json_path, png_path)


def add_common_bench_args(parser: Any, bench: str, providers: Sequence[str]) -> None:
    """The flags the kernel benches share: --out, --providers, --merge, --target-ms, --max-sets, --threads,
    --no-graph, --no-plot (see `resolve_common_args`)."""
    p = parser
    p.add_argument("--out", required=True, help=f"directory for {bench}-<device>.json and .png")
    p.add_argument("--providers", default=None, help=f"comma list from {','.join(providers)}")
    p.add_argument("--merge", action="store_true", help="keep rows of an existing results file for this device")
    p.add_argument("--target-ms", type=float, default=None, help="timing budget per row (default 60 GPU, 40 CPU)")
    p.add_argument("--max-sets", type=int, default=512, help="cap on rotated argument sets (real shapes need <= 200)")
    p.add_argument("--threads", type=int, default=1, help="CPU only: torch.set_num_threads (default 1)")
    p.add_argument("--no-graph", action="store_true", help="time plain launches between CUDA events")
    p.add_argument("--no-plot", action="store_true")


def fill_grid(args: Any, is_gpu: bool, full: dict, quick_gpu: dict | None, cpu: dict) -> None:
    """Grid options the user left unset (None) take the grid's values: `cpu` without a GPU (a CPU run is always
    --quick), else `quick_gpu` for --quick (when the bench has one) or `full`. Values become tuples."""
    quick = getattr(args, "quick", False)  # benches without a quick GPU grid have no --quick
    if not is_gpu:
        if hasattr(args, "quick"):
            args.quick = True
        grid = cpu
    else:
        grid = quick_gpu if quick and quick_gpu is not None else full
    for key, values in grid.items():
        if getattr(args, key) is None:
            setattr(args, key, tuple(values))


def resolve_common_args(args: Any, is_gpu: bool, providers: Sequence[str], cpu_providers: Sequence[str]) -> Any:
    """Parse --providers (default: all, or `cpu_providers` without a GPU; Triton is refused on the CPU, whose
    interpreter is no timing) and default --target-ms to 60 (GPU) / 40 (CPU). Returns `args`."""
    if args.providers is None:
        args.providers = tuple(providers) if is_gpu else tuple(cpu_providers)
    else:
        args.providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
        unknown = sorted(set(args.providers) - set(providers))
        if unknown:
            raise SystemExit(f"--providers: unknown {unknown}; choose from {list(providers)}")
        if not is_gpu and "lowrank_ops_triton" in args.providers:
            raise SystemExit("--providers: lowrank_ops_triton needs a GPU (the CPU Triton interpreter is no timing)")
    if args.target_ms is None:
        args.target_ms = 60.0 if is_gpu else 40.0
    return args


def drop_unavailable_cuda_provider(args: Any, op: str) -> Any:
    """Remove the `lowrank_ops_cuda` provider from args.providers, printing why, where the CUDA backend cannot run
    `op` (no GPU, or the extension lowrank_ops._C not built). Returns `args`."""
    from lowrank_ops.backends import cuda_unavailable_reason

    if "lowrank_ops_cuda" in args.providers:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if (reason := cuda_unavailable_reason(op, device)) is not None:
            print(f"provider lowrank_ops_cuda skipped: {reason}", flush=True)
            args.providers = tuple(p for p in args.providers if p != "lowrank_ops_cuda")
    return args


class cpu_threads:  # noqa: N801  (used as a context manager, like torch's no_grad)
    """Without a GPU, run the block with torch.set_num_threads(n) (then restore it). One thread by default in
    the benches: on the shared 2-core dev machines, torch's 2 OpenMP threads next to any other busy process
    turned every call into multiples of an 8 ms scheduler slice (bf16 F.linear, M=1)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.saved = torch.get_num_threads()

    def __enter__(self) -> None:
        if not torch.cuda.is_available():
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.saved)


def kernel_bench_header(
    header: dict[str, Any], args: Any, bench: str, *, rotation: str, definitions: dict, cpu_note: str, **fields: Any
) -> dict[str, Any]:
    """Add a kernel bench's fields to `environment_header()`'s `header` (in place, and returned): bench,
    `fields` (dtype, providers, grid, ...), l2_bytes_for_rotation, timing (method, target, `rotation`, max_sets),
    `definitions`, plot; then the device-to-device copy bandwidth measured now (GPU) or `cpu_note` (CPU)."""
    is_gpu = header["is_gpu"]
    header.update(
        bench=bench,
        **fields,
        l2_bytes_for_rotation=header["gpu"]["l2_bytes"] if header["gpu"] else L2_BYTES_HOPPER,
        timing={
            "method": ("cuda_graph" if not args.no_graph else "cuda_events") if is_gpu else "perf_counter",
            "target_ms_per_row": args.target_ms,
            "rotation": rotation,
            "max_sets": args.max_sets,
        },
        definitions=definitions,
        plot=dict(KERNEL_PLOT),
    )
    if is_gpu:
        header["copy_bandwidth_measured_now_GBps"] = round(measure_copy_bandwidth_GBps("cuda"), 1)
    else:
        header["note"] = cpu_note
    return header


def load_previous_rows(out_dir: str | os.PathLike, bench: str, header: dict[str, Any], merge: bool) -> list[dict]:
    """With `merge` and an existing results file for this device: its rows, and its run (git sha, dirty, date,
    grid) appended to `header["merged_runs"]`. Otherwise []."""
    path = results_path(out_dir, bench, header)
    if not (merge and path.exists()):
        return []
    old = read_results(path)
    header["merged_runs"] = old["header"].get("merged_runs", []) + [
        {k: old["header"].get(k) for k in ("git_sha", "git_dirty", "date_utc", "grid")}
    ]
    return old["rows"]


def finish_bench(
    out_dir: str | os.PathLike, bench: str, header: dict, rows: list[dict], table: str, t0: float, plot: bool = True
) -> int:
    """Write the results, print `table`, the path and (with `plot`) the PNG drawn next to it, and a summary
    line; 1 if any row has an error, else 0."""
    path = write_results(out_dir, bench, header, rows)
    print(table)
    print(f"results: {path}")
    if plot:
        print(f"plot:    {plot_results(path, path.with_suffix('.png'))}")
    errors = [r for r in rows if r.get("error")]
    print(f"{len(rows)} rows, {len(errors)} errors, {time.perf_counter() - t0:.1f} s")
    return 1 if errors else 0


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64 (`ref` is the float64 reference)."""
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def row_metrics(timing: dict, cost: OpCost, peaks: dict, compute_floor: bool = True) -> dict:
    """`timing` plus bytes, flops, GB/s, TFLOP/s, byte floor and % of it, and the compute floor (None where
    `compute_floor` is False: the tensor-core rate in `peaks` is for 16-bit operands)."""
    median = timing["median_us"]
    floor = byte_floor_us(cost.bytes, peaks["bandwidth_GBps"])
    return {
        **timing,
        "bytes": cost.bytes,
        "flops": cost.flops,
        "GBps": cost.bytes / (median * 1e3),
        "TFLOPs": cost.flops / (median * 1e6),
        "byte_floor_us": floor,
        "pct_of_byte_floor": None if floor is None else 100.0 * floor / median,
        "compute_floor_us": compute_floor_us(cost.flops, peaks["bf16_tflops"]) if compute_floor else None,
    }


def measure_row(
    row: dict,
    fn: Callable[..., Any],
    sets: list[tuple],
    ref: torch.Tensor,
    cost: OpCost,
    peaks: dict,
    args: Any,
    *,
    device: torch.device,
    backend: str | None,
    max_rel_err: float,
    compute_floor: bool = True,
) -> dict:
    """Fill one kernel-bench `row` (op, provider, m, n, rank, M, backend, ... already set): under
    `use_backend(backend)` (when given; the row's backend becomes the one selected for its op and M), check
    `fn(*sets[0])` against the float64 `ref` (rel_err above `max_rel_err` is an error), then time `fn` over
    the rotated `sets` (`time_op`, --no-graph / --target-ms from `args`) and add `row_metrics` and
    working_set_bytes. An exception becomes the row's `error` (printed; one bad cell must not lose the others).
    Returns `row`."""
    from lowrank_ops.backends import select_backend, use_backend

    ctx = use_backend(backend) if backend else contextlib.nullcontext()
    try:
        with ctx:
            if backend:
                row["backend"] = select_backend(row["op"], device, row["M"]).value
            out = fn(*sets[0])
            row["rel_err"] = err = rel_err(out, ref)
            del out
            if not err <= max_rel_err:
                raise RuntimeError(f"rel_err {err:.3e} vs float64 exceeds {max_rel_err:.0e}")
            timing = time_op(
                fn,
                make_args=lambda i: sets[i],
                n_weight_sets=len(sets),
                device=device,
                use_graph=not args.no_graph,
                target_ms=args.target_ms,
            )
        row.update(row_metrics(timing, cost, peaks, compute_floor))
        row["working_set_bytes"] = len(sets) * cost.bytes  # < 2 x L2 only where --max-sets capped the rotation
    except Exception as exc:
        row.update(median_us=None, error=f"{type(exc).__name__}: {exc}")
        print(
            f"  ERROR {row['provider']} m={row['m']} n={row['n']} r={row['rank']} M={row['M']}: {row['error']}",
            file=sys.stderr,
            flush=True,
        )
    return row
