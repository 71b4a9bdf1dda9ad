"""scripts/check_sm90_compile.py: the shipped Triton kernels compile for sm_90a (H100) without a GPU, within an H100
block's shared memory and without register spills. CI runs the --quick subset (32 kernels of the three ops, about
15 s cold on 2 CPU cores); the full check (~140 kernels, ~2 min cold) runs by hand:
python scripts/check_sm90_compile.py."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "check_sm90_compile.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("check_sm90_compile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # stdlib imports only: no kernel module is imported here
    return module


check = _load_script()


@pytest.fixture(scope="module")
def quick_report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest turns the interpreter on
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--verbose"], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    if proc.returncode == check.EXIT_SKIPPED:
        pytest.skip(proc.stdout.strip())
    return proc


def test_quick_subset_fits_an_h100_block_without_spills(quick_report):
    assert quick_report.returncode == 0, quick_report.stdout + quick_report.stderr
    lines = quick_report.stdout.splitlines()
    for kernel in (
        "_lowrank_matmul_kernel",
        "_quant_lowrank_shrink_kernel",
        "_quant_lowrank_matmul_kernel",
        "_codebook_shrink_kernel",
        "_codebook_expand_kernel",
    ):
        assert any(kernel in line and line.endswith(" ok") for line in lines), f"{kernel} was not compiled"
    assert "0 failing" in lines[-1]


def test_quick_subset_sees_an_h100(quick_report):
    """The launchers chose as on a 132-SM sm_90 GPU: split-K for 264 programs, PDL, 3xTF32 for fp32 activations
    (the interpreter would have split into 4 and multiplied in IEEE fp32)."""
    lines = quick_report.stdout.splitlines()
    lowrank_m1 = [line for line in lines if line.startswith("lowrank_matmul") and " bfloat16 M=1 " in line]
    assert "grid=(8, 1, 16)" in lowrank_m1[0]  # r = 128: 8 row blocks x 16 slices = 128 programs
    fp32_dot = [line for line in lines if line.startswith("lowrank_matmul") and " float32 M=16 " in line]
    assert fp32_dot and all("DOT_PRECISION=tf32x3" in line for line in fp32_dot)
    bf16_dot = [line for line in lines if line.startswith("lowrank_matmul") and " bfloat16 M=16 " in line]
    assert bf16_dot and all("DOT_PRECISION=tf32 " in line for line in bf16_dot)


def test_limits_flag_oversized_shared_memory_and_spills():
    assert check.Resources(shared=check.SMEM_LIMIT, registers=255, local=0).problems() == []
    assert "shared memory" in check.Resources(shared=check.SMEM_LIMIT + 1, registers=80, local=0).problems()[0]
    assert "local memory" in check.Resources(shared=0, registers=255, local=8).problems()[0]
