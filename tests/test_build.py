"""Packaging and the optional C++/CUDA build path (issue 2 §1, issue 9 §2).

- The wheel ships `kernels/` as `lowrank_ops.kernels` and nothing top-level besides `lowrank_ops`; in a checkout,
  `import kernels` from the root gets Hugging Face's package, not that directory.
- Every csrc/*.cu compiles with plain nvcc for sm_90a and sm_80 (no torch, no GPU needed) with no register spills,
  and no kernel file includes torch; csrc/bindings.cpp passes a syntax-only g++ check against torch's headers.
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
# The images setup.py builds by default: Hopper (PDL, the target) and Ampere (the same kernels in plain stream order).
ARCHS = ("sm_90a", "sm_80")
GENCODES = ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"]
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
    assert re.search(r"^lowrank-ops\s*=\s*lowrank_ops\.cli:entry$", entry_points, re.MULTILINE), entry_points

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


def _hugging_face_kernels_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_checkout_root_does_not_shadow_hugging_face_kernels():
    """Python started in the checkout's root has `kernels/` first on sys.path; transformers >= 5 imports Hugging
    Face's `kernels` when a Llama loads. Where that package is installed the import must get it, not lowrank-ops'
    directory (which broke the README's snippets when run from the root: ImportError: cannot import name
    'CUDAProperties'); where it is not, transformers' probe must still find nothing to use, and the Llama loads."""
    code = ("import os, kernels\n"
            "print(os.path.dirname(os.path.abspath(kernels.__file__)))\n"
            "import transformers.models.llama.modeling_llama\n")  # fmt: skip
    result = _run([sys.executable, "-c", code], cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    where = Path(result.stdout.strip().splitlines()[0])
    assert (where != REPO / "kernels") == _hugging_face_kernels_installed(), where


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


def test_setup_builds_the_tested_architectures():
    assert f'"{" ".join(GENCODES)}"' not in (REPO / "setup.py").read_text()  # one flag per gencode, not one string
    assert all(flag in (REPO / "setup.py").read_text() for flag in GENCODES)


def test_cuda_sources_compile_for_sm90a_and_sm80(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH, in $CUDA_HOME or /usr/local/cuda: cannot compile-check csrc/*.cu")
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, f"no .cu files in {CSRC}"

    def compile_one(src: Path) -> subprocess.CompletedProcess:
        # -Xptxas -v reports each entry function compiled, proving device code was built for each architecture.
        cmd = [nvcc, "-std=c++17", *GENCODES, "-Werror", "all-warnings", "-Xptxas", "-v", f"-I{CSRC}", "-c", src,
               "-o", tmp_path / f"{src.stem}.o"]  # fmt: skip
        return _run(cmd, timeout=600)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = dict(zip(sources, pool.map(compile_one, sources), strict=True))
    failed = {s.name: (p.stdout + p.stderr)[-3000:] for s, p in results.items() if p.returncode != 0}
    assert not failed, "nvcc failed:\n" + "\n".join(f"--- {name}\n{log}" for name, log in failed.items())
    ptxas = "".join(p.stdout + p.stderr for p in results.values())
    kernels = ptxas_report(ptxas)
    for arch in ARCHS:
        built = [k for k in kernels if k.endswith(f"[{arch}]")]
        assert any("lowrank_expand_kernel" in k for k in built) and any("quant_lowrank_kernel" in k for k in built), (
            f"no decode kernels were compiled for {arch}:\n{ptxas[-3000:]}"
        )
    # A spill moves registers to local memory (DRAM through L1): for a byte-bound decode kernel, extra bytes per thread.
    spills = {k: r for k, r in kernels.items() if r["spill_stores"] or r["spill_loads"]}
    assert not spills, f"kernels spill registers: {spills}"
    print("\n".join(f"{k}: {r}" for k, r in sorted(kernels.items())))  # pytest -s shows the resource table


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def ptxas_report(log: str) -> dict[str, dict[str, int]]:
    """Per entry function and architecture ("<mangled name> [sm_90a]") of `nvcc -Xptxas -v` output: registers,
    static shared memory, stack frame and spill bytes."""
    report: dict[str, dict[str, int]] = {}
    name = None
    for line in log.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            name = f"{m.group(1)} [{m.group(2)}]"
            report[name] = {"registers": 0, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}
        elif name and (m := _PTXAS_SPILLS.search(line)):
            report[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif name and (m := _PTXAS_USED.search(line)):
            report[name].update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return report


def test_ptxas_report_parses_spills():
    log = (
        "ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90a'\n"
        "ptxas info    : Function properties for _Z1kPf\n"
        "    8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem\n"
    )
    assert ptxas_report(log) == {
        "_Z1kPf [sm_90a]": {"registers": 255, "smem": 1024, "stack": 8, "spill_stores": 4, "spill_loads": 8}
    }


# csrc/bindings.cpp against the headers of the installed torch: `g++ -fsyntax-only`, no linking (a CUDA extension
# cannot link against the CPU wheel). The CPU wheel ships c10/cuda/*.h but not the one header torch's CMake
# generates for CUDA builds, c10/cuda/impl/cuda_cmake_macros.h (a single #define); the test writes that line.
CUDA_CMAKE_MACROS = "#define C10_CUDA_BUILD_SHARED_LIBS\n"


def test_bindings_compile_against_torch_headers(tmp_path):
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    torch_inc = [Path(p) for p in include_paths()]
    cuda_home = Path(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda")
    missing = [
        what
        for what, ok in (
            ("a C++ compiler (g++ / c++)", cxx is not None),
            ("torch's c10/cuda/CUDAGuard.h", any((p / "c10" / "cuda" / "CUDAGuard.h").exists() for p in torch_inc)),
            (f"cuda_runtime_api.h under {cuda_home}/include", (cuda_home / "include" / "cuda_runtime_api.h").exists()),
        )
        if not ok
    ]
    if missing:
        pytest.skip(f"cannot syntax-check csrc/bindings.cpp: missing {', '.join(missing)}")
    shim = tmp_path / "shim"
    generated = shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not any((p / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in torch_inc):
        generated.parent.mkdir(parents=True)
        generated.write_text(CUDA_CMAKE_MACROS)
    # Third-party headers as -isystem (their own warnings are not ours); C++20 as torch 2.13's headers require.
    system = [*torch_inc, Path(sysconfig.get_paths()["include"]), cuda_home / "include", shim]
    defines = ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", *defines,
           *(f"-isystem{p}" for p in system), f"-I{CSRC}", CSRC / "bindings.cpp"]  # fmt: skip
    proc = _run(cmd, timeout=600)
    assert proc.returncode == 0, f"g++ -fsyntax-only csrc/bindings.cpp failed:\n{proc.stderr[-4000:]}"


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
