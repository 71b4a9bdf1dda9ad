"""scripts/kernel_report.py: the static sm_90a report of the decode kernels. CI runs --quick (the Triton int4 op at
M = 1: its shrink and base kernels, ~10 s on 2 CPU cores when Triton's cache is cold) and checks the report's
structure and that its numbers are plausible; the hot-loop finder and the fast-path choice are checked on small
hand-written SASS. Skips with the script's reason where Triton's CUDA backend, its tools or nvcc are missing."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "kernel_report.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("kernel_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # stdlib imports only: no kernel module is imported here
    return module


report_module = _load_script()


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernel_report")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest turns the interpreter on
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if proc.returncode == report_module.EXIT_SKIPPED:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stem = out / "kernel_report-sm90a-static-quick"
    return json.loads(stem.with_suffix(".json").read_text()), stem.with_suffix(".md").read_text()


def test_report_says_it_is_a_static_estimate(quick_report):
    report, md = quick_report
    assert report["header"]["kind"] == "static estimate, not a measurement"
    assert "STATIC ESTIMATE, NOT A MEASUREMENT" in report["header"]["statement"]
    assert "static estimate, not a measurement" in md.splitlines()[0]
    model = report["header"]["device_model"]
    assert (model["sms"], model["schedulers_per_sm"], model["dram_bytes_per_s"]) == (132, 4, 3.0e12)
    assert set(model["sources"]) >= {"sms", "schedulers_per_sm", "clock_ghz", "dram_bytes_per_s", "launch_us"}


def test_quick_case_numbers_are_plausible(quick_report):
    report, _ = quick_report
    (case,) = report["cases"]
    assert (case["op"], case["backend"], case["M"], case["rank"]) == ("quant_lowrank_matmul", "triton", 1, 128)
    names = [k["kernel"] for k in case["kernels"]]
    assert names == ["_quant_lowrank_shrink_kernel", "_quant_lowrank_matmul_kernel"]
    # 4096^2 int4 codes + g128 bf16 scales and zeros + r = 128 bf16 V, U + x, y
    assert case["dram_bytes"] == 4096 * 4096 // 2 + 2 * 4096 * 32 * 2 + 2 * 128 * 4096 * 2 + 2 * 4096 * 2
    assert case["byte_floor_us"] == pytest.approx(case["dram_bytes"] / 3.0e12 * 1e6)
    assert case["lower_bound_us"] >= case["byte_floor_us"] + 1.0 - 1e-9  # + one launch
    assert case["lower_bound_us"] >= case["issue_floor_us"] + 1.0 - 1e-9
    assert case["target_us"] == 6.0
    for k in case["kernels"]:
        loop = k["hot_loop"]
        assert 0 < k["registers"] <= 255 and k["spill_bytes_per_thread"] == 0
        assert k["shared_memory_per_block"] >= 1024  # sm_90 reserves 1 KB per block
        assert sum(loop["classes"].values()) == loop["instructions"] == sum(loop["opcodes"].values())
        assert set(loop["classes"]) == set(report_module.CLASSES)
        assert loop["classes"]["global_load"] > 0 and loop["classes"]["fp_math"] > 0
        assert 0 < loop["instructions"] <= loop["region_instructions"] < loop["function_instructions"]
        assert not loop["whole_function"] and loop["loops_in_function"] >= 1
        assert k["loads_cover_weights"]
        assert 1 <= k["occupancy"]["blocks_per_sm"] <= 32
        assert 1 <= k["resident_blocks_per_sm"] <= k["occupancy"]["blocks_per_sm"]
        assert k["issue_slots_per_weight_element"] == pytest.approx(
            loop["instructions"] / k["weight_elements_per_thread_iteration"]
        )
        assert k["issue_us"] >= k["issue_us_chip"] > 0
    base = case["kernels"][1]
    # The base GEMV: (BLOCK_N = 16) x (BLOCK_KW = 64 words x 8 codes) per K-step over 128 threads = 64 codes each;
    # the loop dequantises every code (at least one fp32 op per code) and cannot take fewer slots than that.
    assert base["weight_elements_per_thread_iteration"] == 64
    assert base["hot_loop"]["classes"]["fp_math"] >= 64
    assert 2 <= base["issue_slots_per_weight_element"] <= 40
    assert base["weight_elements"] == 4096 * 4096
    assert base["launch"]["blocks"] == 256  # 4096 rows / BLOCK_N 16: the plan the launcher picks for 132 SMs


def test_markdown_has_the_table_and_the_issue_checks(quick_report):
    report, md = quick_report
    assert "| op | backend | M |" in md and "| quant_lowrank_matmul | triton | 1 |" in md
    assert f"**{report['cases'][0]['lower_bound_us']:.2f}**" in md
    claims = [c["claim"] for c in report["issue_19_counts"]]
    assert any(c.startswith("Triton int4 M = 1: 11.0") for c in claims)
    assert all(c["verdict"] for c in report["issue_19_counts"])


def test_int4_v2_meets_its_issue_budget():
    """Issue 19 part 2's budget, compiled: the v2 kernel (csrc/quant_lowrank_decode_v2.cu, bf16, sm_90a) spends at
    most 4 issue slots per code on its K loop (the fast path plus the group-end branch amortised at g128; the same
    instructions at M = 1 and 16: the mma always computes 16 rows), keeps its 32 KiB of codes in flight per SM (4 of
    5 cp.async stages of 128 outputs x 128 k), streams the codes only by cp.async, does not spill, and is planned as
    32 N tiles x 4 K slices = 128 CTAs at 4096^2 on 132 SMs."""
    if report_module._nvcc() is None:
        pytest.skip("nvcc not found: cannot compile csrc/quant_lowrank_decode_v2.cu")
    launch = report_module._cuda_v2_launch(report_module.Case("quant_lowrank_matmul", "cuda-v2", 1, 128))
    k = report_module.analyse_kernel(launch)
    loop = k["hot_loop"]
    assert (launch.config["tiles"], launch.config["splits"], launch.grid_blocks) == (32, 4, 128)
    assert k["spill_bytes_per_thread"] == 0 and k["weight_elements_per_thread_iteration"] == 128
    assert loop["opcodes"].get("HMMA.16816.F32.BF16", 0) == 32, "2 n16 blocks x 2 n8 tiles x 8 k16 steps of mma"
    assert loop["async_copies"] == 6 == loop["classes"]["global_load"], "4 code + 2 x vectors, all by cp.async"
    assert loop["group_branch"]["group_ends_per_iteration"] == 1.0
    assert 0 < loop["group_branch"]["instructions_per_group_end"] < 96
    assert k["issue_slots_per_weight_element"] <= 4.0, k["issue_slots_per_weight_element"]
    assert k["weight_bytes_requested_per_sm_per_iteration"] == 4 * 128 * 128 / 2


SASS = """
//--------------------- .text.k --------------------------
k:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDG.E.EF.128 R4, desc[UR4][R2.64] ;
        /*0020*/              @!P0 BRA `(.L_x_1) ;
        /*0030*/                   LDG.E.128.CONSTANT R8, desc[UR4][R6.64] ;
        /*0040*/                   BRA `(.L_x_2) ;
.L_x_1:
        /*0050*/                   LDG.E.U16.CONSTANT R8, desc[UR4][R6.64] ;
        /*0060*/                   LDG.E.U16.CONSTANT R9, desc[UR4][R6.64+0x2] ;
        /*0070*/                   LDG.E.U16.CONSTANT R10, desc[UR4][R6.64+0x4] ;
        /*0080*/                   LDG.E.U16.CONSTANT R11, desc[UR4][R6.64+0x6] ;
        /*0090*/                   LDG.E.U16.CONSTANT R12, desc[UR4][R6.64+0x8] ;
        /*00a0*/                   LDG.E.U16.CONSTANT R13, desc[UR4][R6.64+0xa] ;
        /*00b0*/                   LDG.E.U16.CONSTANT R14, desc[UR4][R6.64+0xc] ;
        /*00c0*/                   LDG.E.U16.CONSTANT R15, desc[UR4][R6.64+0xe] ;
.L_x_2:
        /*00d0*/                   FFMA R20, R4, R8, R20 ;
.L_x_3:
        /*00e0*/                   IADD3 R2, R2, 0x10, RZ ;
        /*00f0*/                   ISETP.GE.AND P1, PT, R2, R3, PT ;
        /*0100*/              @!P1 BRA `(.L_x_3) ;
        /*0110*/              @!P1 BRA `(.L_x_0) ;
        /*0120*/                   EXIT ;
.L_x_4:
        /*0130*/                   BRA `(.L_x_4);
"""


def test_hot_loop_is_the_largest_innermost_region_and_its_fast_path():
    (instrs, labels) = report_module.parse_sass(SASS)["k"]
    loop = report_module.find_hot_loop(instrs, labels)
    # Regions: [.L_x_0, 0x110] (outer) and [.L_x_3, 0x100] (inner); the self-branch at 0x130 is no loop.
    assert (loop.loops_found, loop.innermost) == (2, 1)
    assert (instrs[loop.start].addr, instrs[loop.end].addr) == (0xE0, 0x100)
    # Outer loop on its own: the fast path takes the 16-byte x load, not the eight 2-byte loads.
    outer = report_module.Loop(1, len(instrs) - 3, 2, 1)
    path = [instrs[i].addr for i in report_module.hot_path(instrs, labels, outer)]
    assert 0x30 in path and 0x50 not in path and path[-1] == 0x110
    stats_classes = {report_module.classify(instrs[i].opcode) for i in report_module.hot_path(instrs, labels, outer)}
    assert {"global_load", "fp_math", "int_logic", "other"} == stats_classes


def test_classes_and_widths():
    assert report_module.classify("HMMA.16816.F32.BF16") == "tensor_core"
    assert report_module.classify("LDSM.16.MT88.4") == "shared_load"
    assert report_module.classify("STSM.16.M88") == "shared_store"
    assert report_module.classify("LDGSTS.E.BYPASS.128") == "global_load"
    assert report_module.classify("UIADD3") == "int_logic"
    assert report_module.classify("F2FP.BF16.F32.PACK_AB") == "conversion"
    assert report_module.classify("BAR.SYNC.DEFER_BLOCKING") == "barrier"
    assert report_module.classify("SHFL.BFLY") == "shuffle"
    assert report_module.classify("BRA") == "other"
    assert [report_module.access_bytes(op) for op in ("LDG.E.128", "LDG.E", "LDG.E.U16.CONSTANT", "LDS.64")] == [
        16, 4, 2, 8,
    ]  # fmt: skip


def test_occupancy_limits():
    occ = report_module.occupancy(registers=162, smem_per_block=5120, threads=128)
    assert occ["limited_by"] == "registers" and occ["blocks_per_sm"] == 3  # 168 regs x 32 -> 5376 per warp -> 12 warps
    occ = report_module.occupancy(registers=32, smem_per_block=75 * 1024, threads=128)
    assert occ["limited_by"] == "shared_memory" and occ["blocks_per_sm"] == 3
