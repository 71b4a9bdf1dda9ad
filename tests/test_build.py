"""Packaging and the optional C++/CUDA build path (issue 2 §1, issue 9 §2).

- The wheel ships `kernels/` as `lowrank_ops.kernels` and nothing top-level besides `lowrank_ops`.
- Every csrc/*.cu compiles with plain nvcc for sm_90a (no torch, no GPU needed), and no kernel file includes torch.
- setup.py's decision to build or skip the extension says why, and LOWRANK_OPS_BUILD_CUDA=1 makes a skip an error.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
# Everything in the work tree that is not source: copying it would be slow (.venv) or would leak build outputs.
NOT_SOURCE = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache",
    ".hypothesis", "*.so",
)  # fmt: skip
SM90A = "-gencode=arch=compute_90a,code=sm_90a"
TORCH_INCLUDE = re.compile(r"^\s*#\s*include\s*[<\"](torch|ATen|c10|pybind11|Python\.h)", re.MULTILINE)


def _run(cmd, *, env=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _expected_wheel_sources(src: Path) -> set[str]:
    """Wheel paths of every .py in the package trees: lowrank_ops/** as is, kernels/** under lowrank_ops/kernels/."""
    expected = {p.relative_to(src).as_posix() for p in (src / "lowrank_ops").rglob("*.py")}
    kernels = src / "kernels"
    return expected | {f"lowrank_ops/kernels/{p.relative_to(kernels).as_posix()}" for p in kernels.rglob("*.py")}


def test_wheel_file_list(tmp_path):
    # Build from a copy: setup.py writes build/ and *.egg-info next to itself, and must not leave them in the repo.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)
    wheelhouse = tmp_path / "wheelhouse"
    env = {**os.environ, "LOWRANK_OPS_BUILD_CUDA": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-v"]
    proc = _run([*pip_wheel, "-w", wheelhouse, src], env=env)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "LOWRANK_OPS_BUILD_CUDA=0" in proc.stdout + proc.stderr, "setup.py did not say why it skipped the extension"

    (wheel,) = wheelhouse.glob("*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), f"{wheel.name}: without the extension the wheel must be pure"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        zf.extractall(tmp_path / "site")

    for required in (
        "lowrank_ops/__init__.py",
        "lowrank_ops/kernels/__init__.py",
        "lowrank_ops/kernels/lowrank_matmul.py",
        "lowrank_ops/ops/lowrank_matmul.py",
        "lowrank_ops/modules/__init__.py",
        "lowrank_ops/data/wikipedia/articles.jsonl.gz",
        "lowrank_ops/data/wikipedia/ATTRIBUTION.md",
    ):
        assert required in names, f"{required} missing from {wheel.name}"
    # A subpackage missing from setup.py's package list would import from the repo but not from the wheel.
    missing = sorted(_expected_wheel_sources(src) - names)
    assert not missing, f"source files missing from the wheel (add their package to setup.py PACKAGES): {missing}"

    top_level = {n.split("/")[0] for n in names}
    assert top_level == {"lowrank_ops", dist_info}, f"unexpected top-level entries: {top_level - {dist_info}}"
    assert not [n for n in names if n.endswith((".pyc", ".so"))]
    assert re.search(r"^lowrank-ops\s*=\s*lowrank_ops\.cli:main$", entry_points, re.MULTILINE), entry_points

    # Installed, kernels resolve as lowrank_ops.kernels, from the wheel's files (cwd away from the repo's kernels/).
    site = tmp_path / "site"
    probe = "import lowrank_ops.kernels.lowrank_matmul as k; print(k.__file__)"
    proc = _run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(site)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()).is_relative_to(site / "lowrank_ops" / "kernels"), proc.stdout


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    return shutil.which("nvcc") or (str(candidate) if candidate.exists() else None)


def _kernel_files() -> list[Path]:
    """csrc files that must stay torch-free: everything except the binding file(s)."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cu", ".cuh", ".h"))


def test_cuda_sources_are_torch_free_and_listed_in_setup():
    files = _kernel_files()
    assert any(p.suffix == ".cu" for p in files), f"no .cu files in {CSRC}"
    offenders = [f"{p.name}: {m.group(0).strip()}" for p in files for m in TORCH_INCLUDE.finditer(p.read_text())]
    assert not offenders, f"kernel files must not include torch/pybind11 headers (only bindings.cpp may): {offenders}"

    # Every .cu is compiled into the extension, and every listed source exists.
    tree = ast.parse((REPO / "setup.py").read_text())
    (sources,) = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CUDA_SOURCES" for t in node.targets)
    ]
    assert all((REPO / s).is_file() for s in sources), f"setup.py CUDA_SOURCES lists missing files: {sources}"
    unlisted = [p.relative_to(REPO).as_posix() for p in sorted(CSRC.glob("*.cu"))]
    unlisted = [s for s in unlisted if s not in sources]
    assert not unlisted, f"csrc .cu files not in setup.py CUDA_SOURCES (they would never be built): {unlisted}"


def test_cuda_sources_compile_for_sm90a(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH, in $CUDA_HOME or /usr/local/cuda: cannot compile-check csrc/*.cu")
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, f"no .cu files in {CSRC}"

    def compile_one(src: Path) -> subprocess.CompletedProcess:
        # -Xptxas -v reports each entry function compiled, proving device code was built for sm_90a.
        cmd = [nvcc, "-std=c++17", SM90A, "-Werror", "all-warnings", "-Xptxas", "-v", f"-I{CSRC}", "-c", src,
               "-o", tmp_path / f"{src.stem}.o"]  # fmt: skip
        return _run(cmd, timeout=600)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = dict(zip(sources, pool.map(compile_one, sources), strict=True))
    failed = {s.name: (p.stdout + p.stderr)[-3000:] for s, p in results.items() if p.returncode != 0}
    assert not failed, "nvcc failed:\n" + "\n".join(f"--- {name}\n{log}" for name, log in failed.items())
    ptxas = "".join(p.stdout + p.stderr for p in results.values())
    assert "for 'sm_90a'" in ptxas, f"no device code was compiled for sm_90a:\n{ptxas[-3000:]}"


# --- setup.py's decision -------------------------------------------------------------------------------------------
# setup.py --name runs the decision (it is module-level code) and prints the skip reason on stderr without building.
# Fake `torch` packages on PYTHONPATH reach every branch on any machine, CUDA or not.

_FAKE_CPP_EXTENSION = """
CUDA_HOME = None
class BuildExtension:
    pass
def CUDAExtension(*args, **kwargs):
    raise AssertionError("the test expected setup.py to skip the extension")
"""
_FAKE_TORCH = {
    "cpu": 'class version:\n    cuda = None\n__version__ = "2.13.0+fakecpu"\n',
    "cuda": 'class version:\n    cuda = "13.0"\n__version__ = "2.11.0+fakecu130"\n',
    "broken": 'raise ImportError("simulated broken torch")\n',
}


def _setup_name(env_overrides: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LOWRANK_OPS_BUILD_CUDA"}
    return _run([sys.executable, "setup.py", "--name"], env={**env, **env_overrides}, cwd=REPO, timeout=120)


@pytest.mark.parametrize(
    ("fake_torch", "switch", "reason"),
    [
        ("cpu", None, "torch 2.13.0+fakecpu has no CUDA support"),
        ("broken", None, "torch is not importable in the build environment (simulated broken torch)"),
        ("cuda", None, "nvcc not found on PATH or in CUDA_HOME"),
        ("cuda", "0", "LOWRANK_OPS_BUILD_CUDA=0"),
    ],
)
def test_setup_says_why_it_skips(tmp_path, fake_torch, switch, reason):
    pkg = tmp_path / "fake" / "torch"
    (pkg / "utils").mkdir(parents=True)
    (pkg / "__init__.py").write_text(_FAKE_TORCH[fake_torch])
    (pkg / "utils" / "__init__.py").write_text("")
    (pkg / "utils" / "cpp_extension.py").write_text(_FAKE_CPP_EXTENSION)
    (tmp_path / "bin").mkdir()  # PATH without nvcc
    env = {"PYTHONPATH": str(tmp_path / "fake"), "PATH": str(tmp_path / "bin")}

    proc = _setup_name(env if switch is None else {**env, "LOWRANK_OPS_BUILD_CUDA": switch})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "lowrank-ops"
    assert f"skipping the optional CUDA extension: {reason}" in proc.stderr, proc.stderr[-3000:]

    if switch is None:  # the same reason with the build forced on: an error, not a skip
        forced = _setup_name({**env, "LOWRANK_OPS_BUILD_CUDA": "1"})
        assert forced.returncode != 0
        assert f"LOWRANK_OPS_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}" in forced.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA: setup.py builds the extension here")
def test_setup_skips_cuda_without_cuda_torch():
    proc = _setup_name({})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"torch {torch.__version__} has no CUDA support" in proc.stderr, proc.stderr[-3000:]

    forced = _setup_name({"LOWRANK_OPS_BUILD_CUDA": "1"})
    assert forced.returncode != 0, "LOWRANK_OPS_BUILD_CUDA=1 with a CPU-only torch must fail"
    assert "LOWRANK_OPS_BUILD_CUDA=1 but the CUDA extension cannot be built" in forced.stderr
    assert "has no CUDA support" in forced.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_extension_device_info_and_self_check():
    from lowrank_ops import _C_loader

    ext = _C_loader.extension()
    if ext is None:
        pytest.skip(_C_loader.extension_unavailable_reason())
    index = torch.cuda.current_device()
    info = ext.device_info(index)
    props = torch.cuda.get_device_properties(index)
    assert info["name"] == props.name
    assert info["compute_capability"] == (props.major, props.minor)
    assert info["sm_count"] == props.multi_processor_count
    assert info["l2_cache_bytes"] == props.L2_cache_size
    assert info["shared_memory_per_block_optin"] >= info["shared_memory_per_block"] > 0
    assert info["shared_memory_per_sm"] >= info["shared_memory_per_block_optin"]
    ext.self_check(index)
    with pytest.raises(ValueError, match="out of range"):
        ext.device_info(torch.cuda.device_count())
