"""The benchmark machinery: environment header, floors and counts, rotation math, timing, atomic results,
benchmarks/bench_lowrank_matmul.py end to end on a tiny CPU grid (JSON + PNG), and the library part
(`lowrank_ops.benchmarking`, what `lowrank-ops bench-e2e` runs) from a wheel installed outside the repository."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import requires_gpu
from torch.utils.flop_counter import FlopCounterMode

from lowrank_ops import benchmarking as bm
from lowrank_ops.ops.reference import lowrank_matmul_ref

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- header


def test_environment_header_fields():
    header = bm.environment_header()
    for key in ("device", "device_slug", "is_gpu", "torch", "triton", "cuda", "git_sha", "git_dirty", "date_utc"):
        assert key in header, key
    assert header["torch"] == torch.__version__
    assert header["date_utc"].endswith("Z")
    time.strptime(header["date_utc"], "%Y-%m-%dT%H:%M:%SZ")
    host = socket.gethostname()
    if len(host) >= 6:
        assert host not in json.dumps(header), "the header must not carry the host name"
    json.dumps(header, allow_nan=False)  # JSON-able as is


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU labelling")
def test_environment_header_says_cpu():
    header = bm.environment_header()
    assert header["is_gpu"] is False and header["gpu"] is None and header["device_slug"] == "cpu"
    assert header["device"].startswith("CPU only (") and header["cpu"] in header["device"]
    assert header["peaks"]["bandwidth_GBps"] is None  # no floor is claimed for a CPU


def test_git_revision_is_the_callers(monkeypatch):
    monkeypatch.delenv("LOWRANK_OPS_GIT_SHA", raising=False)
    monkeypatch.delenv("LOWRANK_OPS_GIT_DIRTY", raising=False)
    header = bm.environment_header()
    assert header["git_sha"] is None and header["git_dirty"] is None  # the library never asks git
    from lowrank_ops import __version__

    assert header["lowrank_ops"] == __version__
    assert bm.environment_header(git_sha="feed123", git_dirty=True)["git_sha"] == "feed123"
    monkeypatch.setenv("LOWRANK_OPS_GIT_SHA", "abc1234")
    monkeypatch.setenv("LOWRANK_OPS_GIT_DIRTY", "0")
    header = bm.environment_header()
    assert (header["git_sha"], header["git_dirty"]) == ("abc1234", False)
    assert bm.environment_header(git_sha="feed123")["git_sha"] == "feed123"  # the argument wins


def test_harness_reads_the_checkouts_revision(monkeypatch):
    harness = _load("harness", REPO / "benchmarks" / "harness.py")
    monkeypatch.setenv("LOWRANK_OPS_GIT_SHA", "abc1234")
    assert harness.git_revision() == ("abc1234", None)  # for copies of the tree without .git
    monkeypatch.delenv("LOWRANK_OPS_GIT_SHA")
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("no git checkout to read")
    sha, dirty = harness.git_revision()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert sha and head.startswith(sha) and isinstance(dirty, bool)
    assert harness.bench_header()["git_sha"] == sha


@pytest.mark.parametrize(
    "name, slug, bandwidth, measured",
    [
        ("NVIDIA H100 80GB HBM3", "h100", 3000.0, True),
        ("NVIDIA H100 PCIe", "h100-pcie", 2000.0, False),
        ("NVIDIA H200", "h200", 4800.0, False),
        ("NVIDIA GH200 480GB", "gh200", 4000.0, False),
        ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb", None, False),
    ],
)
def test_device_slug_and_peaks(name, slug, bandwidth, measured):
    assert bm.device_slug(name) == slug
    peaks = bm.device_peaks(name)
    assert peaks["bandwidth_GBps"] == bandwidth
    assert peaks["bandwidth_source"].startswith("measured") == measured
    if bandwidth is not None and not measured:
        assert peaks["bandwidth_source"].startswith("spec")
    assert bm.device_slug(name, is_gpu=False) == "cpu"


# -------------------------------------------------------------------------------------- counts and floors


@pytest.mark.parametrize("M, m, n, rank", [(1, 4096, 4096, 256), (3, 40, 24, 7), (17, 96, 200, 24)])
def test_lowrank_cost_matches_tensors_and_flop_counter(M, m, n, rank):
    x, v, u = torch.randn(M, n), torch.randn(rank, n), torch.randn(m, rank)
    with FlopCounterMode(display=False) as counter:
        y = lowrank_matmul_ref(x, v, u)
    cost = bm.lowrank_matmul_cost(M, m, n, rank, itemsize=x.element_size())
    assert cost.flops == counter.get_total_flops() == 2 * M * rank * (m + n)
    assert cost.bytes == sum(t.numel() * t.element_size() for t in (x, v, u, y))
    with_bias = bm.lowrank_matmul_cost(M, m, n, rank, itemsize=2, bias=True)
    assert with_bias.bytes == cost.bytes // 2 + 2 * m and with_bias.flops == cost.flops + M * m


def test_dense_cost_matches_flop_counter():
    x, w = torch.randn(5, 48), torch.randn(40, 48)
    with FlopCounterMode(display=False) as counter:
        y = F.linear(x, w)
    cost = bm.dense_linear_cost(5, 40, 48, itemsize=4)
    assert cost.flops == counter.get_total_flops()
    assert cost.bytes == (x.numel() + w.numel() + y.numel()) * 4


def test_byte_floor_reproduces_design_anchors():
    # docs/FACTS.md: 4096^2, M=1, bf16, r=256 / 1024 -> byte floor 1.25 / 5.0 us (weights at the 3.35 TB/s spec).
    for rank, floor in ((256, 1.25), (1024, 5.0)):
        cost = bm.lowrank_matmul_cost(1, 4096, 4096, rank, itemsize=2)
        assert bm.byte_floor_us(cost.bytes, 3350.0) == pytest.approx(floor, rel=0.01)
    assert bm.byte_floor_us(3e9, 3000.0) == pytest.approx(1000.0)  # 3 GB at 3 TB/s = 1 ms = 1000 us
    assert bm.byte_floor_us(1e6, None) is None
    assert bm.compute_floor_us(2 * 8192**3, 800.0) == pytest.approx(2 * 8192**3 / 800e12 * 1e6)


def test_sets_to_exceed_l2():
    l2 = 50 * 2**20
    dense_4096 = 4096 * 4096 * 2  # 32 MiB: 3 sets are 96 MiB <= 100 MiB, so 4
    assert bm.sets_to_exceed_l2(dense_4096, l2_bytes=l2) == 4
    assert bm.sets_to_exceed_l2(l2, l2_bytes=l2) == 3  # exactly 2 x L2 does not exceed it
    assert bm.sets_to_exceed_l2(10 * l2, l2_bytes=l2) == 2  # never fewer than min_sets
    assert bm.sets_to_exceed_l2(10 * l2, l2_bytes=l2, min_sets=1) == 1
    for nbytes in (1, 1000, 570_000, 4_210_688, 33_554_433, 90_177_536):
        k = bm.sets_to_exceed_l2(nbytes, l2_bytes=l2)
        assert k * nbytes > 2 * l2
        assert k == 2 or (k - 1) * nbytes <= 2 * l2
    if not torch.cuda.is_available():
        assert bm.sets_to_exceed_l2(dense_4096) == 4  # default L2 off a GPU: 50 MiB
    with pytest.raises(ValueError, match="bytes_per_set=0"):
        bm.sets_to_exceed_l2(0)


# ---------------------------------------------------------------------------------------------------- timing


def test_time_op_cpu_rotates_and_summarises():
    calls = []

    def fn(i, delay):
        calls.append(i)
        t_end = time.perf_counter() + delay
        while time.perf_counter() < t_end:
            pass

    result = bm.time_op(fn, make_args=lambda i: (i, 200e-6), n_weight_sets=3, target_ms=5, min_samples=12)
    assert result["method"] == "perf_counter" and result["n_sets"] == 3
    assert result["samples"] >= 12
    assert 200 <= result["p20_us"] <= result["median_us"] <= result["p80_us"]
    assert result["median_us"] < 5000
    assert set(calls) == {0, 1, 2}
    with pytest.raises(ValueError, match="n_weight_sets=0"):
        bm.time_op(fn, make_args=lambda i: (i, 0.0), n_weight_sets=0)


@requires_gpu
def test_time_op_cuda_graph_respects_the_byte_floor():
    m = n = 4096
    cost = bm.dense_linear_cost(1, m, n, itemsize=2)
    k = bm.sets_to_exceed_l2(cost.bytes)
    ws = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(k)]
    xs = [torch.randn(1, n, device="cuda", dtype=torch.bfloat16) for _ in range(k)]
    for use_graph in (True, False):
        result = bm.time_op(F.linear, make_args=lambda i: (xs[i], ws[i]), n_weight_sets=k, use_graph=use_graph)
        assert result["method"] == ("cuda_graph" if use_graph else "cuda_events")
        spec = bm.byte_floor_us(cost.bytes, 4800.0)  # no H100/H200 moves bytes faster than this
        assert spec < result["median_us"] < 1000, result


# ---------------------------------------------------------------------------------------------------- results


def _header(slug="cpu", is_gpu=False):
    return {"device": "test device", "device_slug": slug, "is_gpu": is_gpu, "torch": torch.__version__}


def test_write_results_round_trips(tmp_path):
    rows = [{"provider": "dense", "median_us": 1.5, "p20_us": float("nan"), "dtype": torch.bfloat16}]
    path = bm.write_results(tmp_path / "new", "lowrank_matmul", _header(), rows)
    assert path == tmp_path / "new" / "lowrank_matmul-cpu.json"
    assert path.stat().st_mode & 0o777 == 0o644
    data = bm.read_results(path)
    assert data["header"] == _header()
    assert data["rows"] == [{"provider": "dense", "median_us": 1.5, "p20_us": None, "dtype": "torch.bfloat16"}]
    gpu = bm.write_results(tmp_path, "svd", _header("h100", True), [])
    assert gpu.name == "svd-h100.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "svd-h100.json"]  # no temporary files left


def test_write_results_is_atomic(tmp_path, monkeypatch):
    path = bm.write_results(tmp_path, "bench", _header(), [{"a": 1}])
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(bm.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        bm.write_results(tmp_path, "bench", _header(), [{"a": 2}])
    assert path.read_bytes() == before  # the old file is intact
    assert os.listdir(tmp_path) == [path.name]  # and the temporary file is gone


# ---------------------------------------------------------------------------------------------- bench + plot


def test_bench_lowrank_matmul_quick_end_to_end(tmp_path, capsys):
    bench = _load("bench_lowrank_matmul", REPO / "benchmarks" / "bench_lowrank_matmul.py")

    def argv(ms: str) -> list[str]:
        args = ["--out", str(tmp_path), "--quick", "--shapes", "96x64,40x24", "--ms", ms, "--ranks", "16,32"]
        args += ["--ratios", "0.5", "--target-ms", "1", "--max-sets", "3", "--threads", "1"]
        return args + (["--providers", "dense,torch_two_gemm,lowrank_ops"] if torch.cuda.is_available() else [])

    assert bench.main(argv("1,3")) == 0
    slug = bm.environment_header()["device_slug"]
    path = tmp_path / f"lowrank_matmul-{slug}.json"
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = bm.read_results(path)
    header, rows = data["header"], data["rows"]
    assert header["bench"] == "lowrank_matmul" and header["dtype"] == "bf16"
    providers = {r["provider"] for r in rows}
    assert providers == {"dense", "torch_two_gemm", "lowrank_ops"}
    # 96x64: ranks {32 (ratio 0.5 -> 2 x 16), 16}; 40x24: rank 32 >= min(m, n) is skipped, ratio 0.5 -> 16.
    assert header["grid"]["ranks"] == {"96x64": [16, 32], "40x24": [16]}
    assert len(rows) == 2 * 2 + (2 + 1) * 2 * 2  # dense per (shape, M) + (ranks x M x 2 low-rank providers)
    for r in rows:
        assert r["error"] is None and r["median_us"] > 0 and r["rel_err"] < 2e-2
        assert r["p20_us"] <= r["median_us"] <= r["p80_us"]
        cost = (
            bm.dense_linear_cost(r["M"], r["m"], r["n"], 2)
            if r["rank"] is None
            else bm.lowrank_matmul_cost(r["M"], r["m"], r["n"], r["rank"], 2)
        )
        assert (r["bytes"], r["flops"]) == (cost.bytes, cost.flops)
        assert r["GBps"] == pytest.approx(cost.bytes / r["median_us"] / 1e3)
    if not torch.cuda.is_available():
        assert header["device"].startswith("CPU only") and header["cpu_threads"] == 1
        assert all(r["backend"] == "torch" and r["method"] == "perf_counter" for r in rows)
        assert "CPU ONLY" in capsys.readouterr().out
    assert torch.get_num_threads() >= 1

    # --merge keeps the rows of the first run and adds the new ones
    assert bench.main([*argv("2"), "--merge", "--no-plot"]) == 0
    merged = bm.read_results(path)
    assert sorted({r["M"] for r in merged["rows"]}) == [1, 2, 3]
    assert len(merged["header"]["merged_runs"]) == 1


def test_bench_refuses_triton_on_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    bench = _load("bench_lowrank_matmul", REPO / "benchmarks" / "bench_lowrank_matmul.py")
    with pytest.raises(SystemExit, match="needs a GPU"):
        bench.main(["--out", str(tmp_path), "--providers", "lowrank_ops_triton"])


def test_plot_cli_with_param_ratio_axis_and_error_rows(tmp_path):
    plot = _load("lowrank_ops_plot", REPO / "benchmarks" / "plot.py")
    rows = [
        {"provider": p, "m": 64, "n": 32, "M": M, "param_ratio": ratio, "median_us": t, "p20_us": t, "p80_us": t}
        for p, t0 in (("a", 10.0), ("b", 20.0))
        for M in (1, 16)
        for ratio, t in ((0.2, t0), (0.5, 2 * t0))
    ]
    rows.append({"provider": "a", "m": 64, "n": 32, "M": 1, "param_ratio": 0.9, "median_us": None, "error": "x"})
    header = {**_header(), "device": "CPU only (test)", "plot": {"x": "param_ratio"}}
    path = bm.write_results(tmp_path, "fake", header, rows)
    assert plot.main([str(path), "--out", str(tmp_path / "out.png")]) == 0
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------ from a wheel

# Run in a child process from a wheel unpacked outside the repository: the checkout's paths and the editable
# install's finder are removed first, so every lowrank_ops module must come from the wheel.
WHEEL_CHILD = r"""
import json, sys
from pathlib import Path

repo, site = Path(sys.argv[1]), Path(sys.argv[2])
sources = [repo / d for d in ("lowrank_ops", "kernels", "benchmarks", "tests")]


def from_checkout(path):
    path = Path(path).resolve()
    return path == repo or any(path.is_relative_to(s) for s in sources)


sys.path[:] = [p for p in sys.path if not from_checkout(p or ".")]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowrank_ops
from lowrank_ops import demo  # noqa: F401  (lowrank-ops demo imports the same names)
from lowrank_ops.benchmarking import environment_header, sets_to_exceed_l2
from lowrank_ops.cli import main

assert Path(lowrank_ops.__file__).resolve().is_relative_to(site), lowrank_ops.__file__
torch.manual_seed(0)
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LlamaForCausalLM(config).save_pretrained("tiny")
rc = main(["bench-e2e", "--model", "tiny", "--out", "results", "--variants", "dense", "--no-layer-share",
           "--prompt-lens", "8", "--decode-batches", "1", "--decode-prompt", "6", "--new-tokens", "3",
           "--target-ms", "1"])
assert sets_to_exceed_l2(1 << 20) >= 2
checkout = sorted(m.__name__ for m in list(sys.modules.values()) if from_checkout(getattr(m, "__file__", None) or "/"))
print("CHILD", json.dumps({"rc": rc, "checkout_modules": checkout, "header_sha": environment_header()["git_sha"]}))
"""


def test_library_part_works_from_a_wheel_outside_the_repo(tmp_path):
    """`lowrank-ops bench-e2e` (environment header, timing, results, plot) from a wheel built here and unpacked in a
    temporary directory: no repository on sys.path, a working directory outside it, and a `git` that records any
    call (the library must not shell out to git or look for benchmarks/plot.py)."""
    src = tmp_path / "src"  # only what the wheel is built from (setup.py writes build/ next to itself)
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(REPO / name, src / name)
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    for name in ("lowrank_ops", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=junk)
    env = {**os.environ, "LOWRANK_OPS_BUILD_CUDA": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    proc = subprocess.run([*pip_wheel, "-w", tmp_path / "wheelhouse", src], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    (wheel,) = (tmp_path / "wheelhouse").glob("*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)

    fake_bin, git_log = tmp_path / "bin", tmp_path / "git-called"
    fake_bin.mkdir()
    (fake_bin / "git").write_text(f'#!/bin/sh\necho "$@" >> "{git_log}"\nexit 1\n')
    (fake_bin / "git").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "child.py").write_text(WHEEL_CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOWRANK_OPS_GIT_", "PYTHON"))}
    env.update(PYTHONPATH=str(site), PATH=f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, tmp_path / "child.py", REPO.resolve(), site.resolve()], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.rsplit("CHILD ", 1)[1])
    assert result["rc"] == 0 and result["checkout_modules"] == [], result
    assert result["header_sha"] is None  # no sha supplied: none invented, and git was never asked
    assert not git_log.exists(), f"git was called: {git_log.read_text()}"

    path = work / "results" / "e2e-tiny-cpu.json"
    header = bm.read_results(path)["header"]
    assert header["bench"] == "e2e" and header["device_slug"] == "cpu" and header["git_sha"] is None
    assert header["lowrank_ops"] == __import__("lowrank_ops").__version__
    assert "| dense |" in path.with_suffix(".md").read_text()
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot skipped" not in proc.stdout
