"""Measurement machinery shared by `lowrank-ops bench-e2e`, `lowrank-ops demo` and `benchmarks/bench_*.py`:
environment header, timing, floors, results files.

It works from an installed wheel: it finds no repository root, runs no file by path and never calls git (the git
sha in the header is what the caller supplies, see `environment_header`). What only the bench scripts need (their
common flags, --merge, row checking, the shared plot, the checkout's git revision) is `benchmarks/harness.py`.

Timing (docs/FACTS.md, "How benchmarks time"):

- CUDA: the caller builds `n_weight_sets` independent argument sets (weights and activations) whose total size
  exceeds twice the L2 (`sets_to_exceed_l2`; H100 and H200 have 50 MiB), so consecutive calls never find their
  weights in the cache. `time_op` warms up on a side stream (Triton compiles and autotunes there), captures one
  CUDA graph that calls `fn` over every set (repeated until a replay holds at least `min_calls_per_replay`
  calls), then times back-to-back replays with CUDA events. A sample is one replay's time divided by its number
  of calls; the result is the median and the 20th / 80th percentiles of those per-call times. Inside a graph
  one launch costs ~1 us (docs/FACTS.md), so small-M numbers measure the kernels, not Python and the launch path.
  `use_graph=False` times the same rotation as a plain Python loop between CUDA events (fine for large,
  compute-bound M, where each call runs far longer than its launch).
- CPU: a `time.perf_counter` loop over the same rotated sets after a warm-up, one call per sample. CPU
  numbers carry a CPU device name and slug everywhere; they are never GPU numbers.

Floors: `byte_floor_us` (fewest bytes over the device's bandwidth) and `compute_floor_us` (flops over the
tensor-core rate). `device_peaks` prefers figures measured on this workplace's machines (docs/FACTS.md) over the
datasheet and says which it used.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowrank_ops._version import __version__

L2_BYTES_HOPPER = 50 * 2**20  # H100 / H200 L2: 50 MiB (torch reports L2_cache_size = 52428800 on H100)


# --------------------------------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class DevicePeak:
    """Peak rates of one GPU model. `match` is a substring of torch.cuda.get_device_name (first match wins)."""

    match: str
    slug: str
    spec_bandwidth_GBps: float
    spec_bf16_tflops: float  # dense (no 2:4 sparsity) bf16 tensor-core rate from the datasheet
    measured_bandwidth_GBps: float | None = None
    measured_bf16_tflops: float | None = None
    measured_note: str = ""


# Order matters: more specific names first ("H100 PCIe" before "H100", "GH200" before "H200").
DEVICE_PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak("H100 PCIe", "h100-pcie", 2000.0, 756.0),
    DevicePeak("H100 NVL", "h100-nvl", 3900.0, 835.0),
    DevicePeak("GH200", "gh200", 4000.0, 989.0),
    DevicePeak(
        "H100",
        "h100",
        3350.0,
        989.0,
        measured_bandwidth_GBps=3000.0,
        measured_bf16_tflops=800.0,
        measured_note="docs/FACTS.md, H100 SXM: device-to-device copy 3.0 TB/s (read+write); bf16 GEMM 8192^3 "
        "690-800 TFLOP/s (upper end used, so the floor stays a floor)",
    ),
    DevicePeak("H200", "h200", 4800.0, 989.0),
)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _find_peak(device_name: str) -> DevicePeak | None:
    for peak in DEVICE_PEAKS:
        if peak.match.lower() in device_name.lower():
            return peak
    return None


def device_slug(device_name: str, is_gpu: bool = True) -> str:
    """Short file-name-safe device tag: 'h100', 'h200', 'cpu', else the sanitised GPU name."""
    if not is_gpu:
        return "cpu"
    if (peak := _find_peak(device_name)) is not None:
        return peak.slug
    name = re.sub(r"^nvidia\s+", "", device_name.strip(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def device_peaks(device_name: str | None = None) -> dict[str, Any]:
    """Bandwidth (GB/s) and bf16 rate (TFLOP/s) for the floors, each with its source ('measured: ...' or
    'spec'). Unknown devices and CPUs give None (no floor is claimed)."""
    if device_name is None:
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = _find_peak(device_name)
    if peak is None:
        return {
            "bandwidth_GBps": None,
            "bandwidth_source": f"unknown for {device_name!r}",
            "bf16_tflops": None,
            "bf16_tflops_source": f"unknown for {device_name!r}",
        }

    def pick(measured: float | None, spec: float, what: str) -> tuple[float, str]:
        if measured is not None:
            return measured, f"measured: {peak.measured_note}"
        return spec, f"spec ({peak.match} datasheet {what}); not yet measured on this workplace's machines"

    bw, bw_src = pick(peak.measured_bandwidth_GBps, peak.spec_bandwidth_GBps, "memory bandwidth")
    tf, tf_src = pick(peak.measured_bf16_tflops, peak.spec_bf16_tflops, "dense bf16")
    return {"bandwidth_GBps": bw, "bandwidth_source": bw_src, "bf16_tflops": tf, "bf16_tflops_source": tf_src}


def l2_cache_bytes(device: torch.device | str | None = None) -> int:
    """The CUDA device's L2 size when torch reports it, else 50 MiB (H100 / H200)."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        size = getattr(torch.cuda.get_device_properties(device or torch.cuda.current_device()), "L2_cache_size", 0)
        if size:
            return int(size)
    return L2_BYTES_HOPPER


# ---------------------------------------------------------------------------------------------------- header


def _module_version(name: str) -> str | None:
    try:
        return getattr(__import__(name), "__version__", "unknown")
    except Exception:
        return None


def _env_dirty() -> bool | None:
    value = os.environ.get("LOWRANK_OPS_GIT_DIRTY", "").strip().lower()
    return {"1": True, "true": True, "0": False, "false": False}.get(value)


def environment_header(git_sha: str | None = None, git_dirty: bool | None = None) -> dict[str, Any]:
    """What a results file needs to be read later: device (GPU name, or 'CPU only (<model>)'), is_gpu,
    device_slug, versions (torch, triton, CUDA, Python, lowrank_ops), git sha and dirty flag, UTC date, and the
    peak figures used for floors. No host name.

    The library never asks git (an installed wheel has no repository): the sha and dirty flag are what the caller
    passes (benchmarks/harness.py reads them from its checkout), else $LOWRANK_OPS_GIT_SHA and
    $LOWRANK_OPS_GIT_DIRTY (1 / 0), else None; `lowrank_ops` (the package version) identifies the code either way.
    """
    is_gpu = torch.cuda.is_available()
    gpu = None
    if is_gpu:
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        name = torch.cuda.get_device_name(index)
        gpu = {
            "name": name,
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_bytes": l2_cache_bytes(),
        }
        device = name
    else:
        device = f"CPU only ({cpu_model()})"
    if git_sha is None:
        git_sha = os.environ.get("LOWRANK_OPS_GIT_SHA") or None
        if git_dirty is None:
            git_dirty = _env_dirty()
    return {
        "device": device,
        "device_slug": device_slug(device, is_gpu),
        "is_gpu": is_gpu,
        "gpu": gpu,
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _module_version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "lowrank_ops": __version__,
        "git_sha": git_sha,
        "git_dirty": git_dirty,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "peaks": device_peaks(device if is_gpu else "cpu"),
    }


# ------------------------------------------------------------------------------------------- bytes and flops


@dataclass(frozen=True)
class OpCost:
    """Fewest bytes an op must move through device memory (each input read once, each output written once)
    and the floating-point operations it must do (a multiply-add counts 2)."""

    bytes: int
    flops: int


def dense_linear_cost(M: int, m: int, n: int, itemsize: int, bias: bool = False) -> OpCost:
    """y (M, m) = x (M, n) W^T (W is (m, n)) [+ b]."""
    nbytes = (m * n + M * n + M * m + (m if bias else 0)) * itemsize
    return OpCost(bytes=nbytes, flops=2 * M * m * n + (M * m if bias else 0))


def lowrank_matmul_cost(M: int, m: int, n: int, rank: int, itemsize: int, bias: bool = False) -> OpCost:
    """y (M, m) = (x V^T) U^T [+ b] with V (r, n), U (m, r). The intermediate (M, r) is not counted: a fused
    kernel keeps it on chip."""
    nbytes = (rank * n + m * rank + M * n + M * m + (m if bias else 0)) * itemsize
    return OpCost(bytes=nbytes, flops=2 * M * rank * (n + m) + (M * m if bias else 0))


def byte_floor_us(nbytes: float, bandwidth_GBps: float | None) -> float | None:
    """Time to move `nbytes` at `bandwidth_GBps` (1 GB = 1e9 bytes), in microseconds; None without a rate."""
    if bandwidth_GBps is None or bandwidth_GBps <= 0:
        return None
    return nbytes / (bandwidth_GBps * 1e3)


def compute_floor_us(flops: float, tflops: float | None) -> float | None:
    """Time to do `flops` at `tflops` TFLOP/s, in microseconds; None without a rate."""
    if tflops is None or tflops <= 0:
        return None
    return flops / (tflops * 1e6)


def sets_to_exceed_l2(bytes_per_set: int, l2_bytes: int | None = None, factor: float = 2.0, min_sets: int = 2) -> int:
    """Fewest argument sets whose total size exceeds `factor` x L2 (default 2 x the device's L2, 50 MiB when
    unknown), and never fewer than `min_sets` (so consecutive calls always use different buffers)."""
    if bytes_per_set <= 0:
        raise ValueError(f"sets_to_exceed_l2: bytes_per_set={bytes_per_set} must be > 0")
    l2 = l2_cache_bytes() if l2_bytes is None else l2_bytes
    return max(min_sets, math.floor(factor * l2 / bytes_per_set) + 1)


# ------------------------------------------------------------------------------------------------------ timing


def _summary(per_call_us: Sequence[float], **extra: Any) -> dict[str, Any]:
    arr = np.asarray(per_call_us, dtype=np.float64)
    p20, p50, p80 = np.percentile(arr, [20, 50, 80])
    return {"median_us": float(p50), "p20_us": float(p20), "p80_us": float(p80), "samples": int(arr.size), **extra}


def _time_cuda(
    fn: Callable[..., Any],
    sets: list[tuple],
    use_graph: bool,
    min_calls_per_replay: int,
    target_ms: float,
    min_samples: int,
    max_samples: int,
    warmup: int,
) -> dict[str, Any]:
    loops = max(1, math.ceil(min_calls_per_replay / len(sets)))
    calls = loops * len(sets)

    def run_all() -> None:
        for _ in range(loops):
            for args in sets:
                fn(*args)

    # Warm up on a side stream (the pattern torch.cuda.graphs documents): Triton compiles and autotunes here,
    # cuBLAS creates its handles and workspaces, so none of it is captured or timed.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for args in sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = None
    if use_graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_all()
        replay = graph.replay
    else:
        replay = run_all
    try:
        for _ in range(warmup):
            replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        estimate_ms = max(start.elapsed_time(end), 1e-3)
        n = int(min(max_samples, max(min_samples, math.ceil(target_ms / estimate_ms))))
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        replay()  # a lead replay keeps the GPU busy while the host enqueues the timed ones
        events[0].record()
        for i in range(n):
            replay()
            events[i + 1].record()
        torch.cuda.synchronize()
        per_call_us = [events[i].elapsed_time(events[i + 1]) * 1e3 / calls for i in range(n)]
    finally:
        del graph
    return _summary(
        per_call_us, method="cuda_graph" if use_graph else "cuda_events", n_sets=len(sets), calls_per_sample=calls
    )


def _time_cpu(
    fn: Callable[..., Any], sets: list[tuple], target_ms: float, min_samples: int, max_samples: int, warmup: int
) -> dict[str, Any]:
    for i in range(max(warmup, 1)):
        fn(*sets[i % len(sets)])
    per_call_us: list[float] = []
    deadline = time.perf_counter() + target_ms / 1e3
    i = 0
    while len(per_call_us) < max_samples and (len(per_call_us) < min_samples or time.perf_counter() < deadline):
        args = sets[i % len(sets)]
        t0 = time.perf_counter()
        fn(*args)
        per_call_us.append((time.perf_counter() - t0) * 1e6)
        i += 1
    return _summary(per_call_us, method="perf_counter", n_sets=len(sets), calls_per_sample=1)


def time_op(
    fn: Callable[..., Any],
    *,
    make_args: Callable[[int], tuple],
    n_weight_sets: int,
    device: torch.device | str | None = None,
    use_graph: bool = True,
    min_calls_per_replay: int = 32,
    target_ms: float = 100.0,
    min_samples: int = 10,
    max_samples: int = 1000,
    warmup: int = 3,
) -> dict[str, Any]:
    """Time `fn(*make_args(i))` rotating over i in range(n_weight_sets); see the module docstring.

    `make_args(i)` returns the i-th argument set (each set its own weight buffers; use `sets_to_exceed_l2`
    for the count). `device` defaults to the device of the first tensor of set 0. Wrap the call in
    `lowrank_ops.backends.use_backend(...)` to force a backend (it is read while the graph is captured).

    Returns {median_us, p20_us, p80_us, samples, method ('cuda_graph' | 'cuda_events' | 'perf_counter'),
    n_sets, calls_per_sample}; the percentiles are over per-call times of the samples.
    """
    if n_weight_sets < 1:
        raise ValueError(f"time_op: n_weight_sets={n_weight_sets} must be >= 1")
    sets = [tuple(make_args(i)) for i in range(n_weight_sets)]
    if device is None:
        first = next((a for a in sets[0] if isinstance(a, torch.Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            return _time_cuda(fn, sets, use_graph, min_calls_per_replay, target_ms, min_samples, max_samples, warmup)
    if device.type == "cpu":
        return _time_cpu(fn, sets, target_ms, min_samples, max_samples, warmup)
    raise ValueError(f"time_op: device type {device.type!r} is not supported (cuda or cpu)")


def measure_copy_bandwidth_GBps(device: torch.device | str = "cuda", nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Median device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del src, dst
    return 2 * nbytes / (float(np.median(times)) * 1e6)


# ----------------------------------------------------------------------------------------------------- results


def results_path(out_dir: str | os.PathLike, bench_name: str, header: dict[str, Any]) -> Path:
    """`<out_dir>/<bench_name>-<device slug>.json`."""
    slug = header.get("device_slug") or device_slug(str(header.get("device", "")), bool(header.get("is_gpu")))
    return Path(out_dir) / f"{bench_name}-{slug}.json"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    return value


def write_results(
    out_dir: str | os.PathLike, bench_name: str, header: dict[str, Any], rows: Sequence[dict[str, Any]]
) -> Path:
    """Write {"header": ..., "rows": [...]} to `results_path(...)` atomically (temporary file in the same
    directory, fsync, os.replace), so an interrupted run never leaves a half-written file. Non-finite floats
    become null. Returns the path."""
    path = results_path(out_dir, bench_name, header)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe({"header": header, "rows": list(rows)}), indent=1, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """The {"header", "rows"} dict of a results file."""
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------- argument types


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: '1,16,64' -> (1, 16, 64)."""
    return tuple(int(t) for t in text.split(",") if t.strip())

