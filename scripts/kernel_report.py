"""Static performance report of the shipped decode kernels for sm_90a (H100): what can be measured without a GPU.

    python scripts/kernel_report.py                  # every variant -> benchmarks/results/kernel_report-sm90a-static.*
    python scripts/kernel_report.py --quick --out D  # two kernels of one shape (tests/test_kernel_report.py)

STATIC ESTIMATE, NOT A MEASUREMENT. Nothing here runs on a GPU. Every figure is read from the compiled code (SASS)
or computed from it with the device model below; the "lower bound" is a floor the kernel cannot beat, not a
prediction of its time. GPU timings come only from benchmarks/bench_*.py on a GPU.

What it does, per variant (op, backend, M, shape; `VARIANTS`), for every kernel the op launches:
1. Compile for sm_90a on this machine. Triton kernels: the real launcher runs on CPU tensors under
   scripts/check_sm90_compile.py's emulation (a 132-SM capability-9.0 device), so the grid, block sizes and split
   counts are the ones the launcher picks on an H100 SXM; every launch is compiled instead of run. CUDA kernels:
   `nvcc -arch=sm_90a -cubin csrc/<file>.cu` (one cubin per file, cached by source hash); the launch plan (grid,
   split count, dynamic shared memory) is recomputed here from the constants parsed out of the .cu source, by the
   same rules as its host code (`_cuda_*_plan`; tests/test_cuda_emulated.py tests those rules on the C++ side).
2. Resources: registers and local memory (spills) from `cuobjdump --dump-resource-usage`; shared memory per block
   = that tool's SHARED (static, including the 1 KB per block that sm_90 reserves: a kernel without __shared__
   reports 1024) + the dynamic shared memory of the launch. Occupancy from registers (allocated per warp in units
   of 256), shared memory (228 KB per SM), threads (2048 per SM) and the 32-blocks limit.
3. Disassemble with nvdisasm and find the hot loop: every backward branch (a BRA whose target lies at or before it,
   not the self-branch that ends a function) closes a region [target, branch]; regions with the same target merge.
   The innermost regions (containing no other region) are the loop bodies the code spends its iterations in; of
   those the hot loop is the one with the most instructions. A kernel with no backward branch is counted whole,
   as one iteration. Counts are static: every instruction of the region counts once per iteration, including
   predicated-off ones and both sides of a branch inside the loop (the compiled K loops here are straight-line).
4. Classify each instruction of the loop by its opcode (`CLASSES`); the classes sum to the loop size.
5. Weight elements per loop iteration and thread: Triton, from the block sizes (BLOCK_N x BLOCK_K weight tile per
   program and K-step; int4: x 8 codes per word) over the program's threads -- Triton 3.6 does not unroll scf.for
   loops, checked by the loop's global-load bytes, which must cover the weight bytes; CUDA, from the evict-first
   16-byte loads in the loop (`LDG.E.EF.128`: the kernels load weights, and only weights, with __ldcs), so any
   unrolling by nvcc is counted.
6. Issue slots per weight element = loop instructions / weight elements per thread and iteration: one SASS
   instruction of a warp takes one issue slot of one of the SM's 4 schedulers (sm_90 issues one warp instruction
   per scheduler and cycle). Total slots of a kernel = loop instructions x warp-iterations (its weight elements,
   times its row blocks, over the elements of one warp-iteration). Only the hot loop is counted: prologues,
   epilogues and other loops are left out, which keeps the figure a lower bound.
7. Time floors (microseconds, H100 SXM, `DEVICE`):
   byte floor  = DRAM bytes of the op (weights, scales / zeros, x, y; split-K partials stay in the 50 MB L2) / 3.0 TB/s
   issue floor = per kernel max(slots / (132 SMs x 4 schedulers x 1.98 GHz), slots of the busiest SM (ceil(blocks /
                 132) blocks) / (min(4, its warps) x 1.98 GHz)); kernels whose hot loop waits for the previous
                 kernel (low-rank and codebook expand) add, concurrent ones (int4 base beside its shrink) share the
                 chip: max(sum of the chip-wide terms, largest per-kernel floor)
   lower bound = max(byte floor, issue floor) + 1 launch (~1 us in a CUDA graph; the second, PDL-chained launch is
                 assumed hidden)
   next to the H100 target of each case (issue 1 for low-rank, issue 5 for int4, issue 6 for the codebook).
   Weight bytes requested per SM per loop iteration (a proxy for bytes in flight) are set against Little's law:
   3.0 TB/s x ~0.8 us (assumed loaded DRAM latency, the figure csrc/lowrank_decode.cu uses) / 132 SMs.

Exit status 0, or 77 (skipped) when Triton's CUDA backend, its bundled tools or nvcc are missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
EXIT_SKIPPED = 77
STATIC_LABEL = "static estimate, not a measurement"

# ---------------------------------------------------------------------------------------------------------------
# The device model: H100 SXM (the project's benchmark GPU). Every figure names its source.

DEVICE = {
    "name": "H100 SXM (sm_90a), modelled",
    "sms": 132,
    "schedulers_per_sm": 4,
    "clock_ghz": 1.98,
    "dram_bytes_per_s": 3.0e12,
    "launch_us": 1.0,
    "dram_latency_us": 0.8,
    "regs_per_sm": 65536,
    "reg_alloc_unit": 256,
    "max_threads_per_sm": 2048,
    "max_blocks_per_sm": 32,
    "smem_per_sm": 233472,
    "sources": {
        "sms": "132 SMs: H100 SXM (H100_SMS in scripts/check_sm90_compile.py, the count the launchers plan for)",
        "schedulers_per_sm": "4 warp schedulers per SM, each issuing one warp instruction per cycle: NVIDIA Hopper "
        "architecture (4 SM sub-partitions)",
        "clock_ghz": "~1.98 GHz: H100 SXM maximum boost clock (NVIDIA spec); sustained clocks under load can be "
        "lower, which only raises the issue floor",
        "dram_bytes_per_s": "3.0 TB/s: measured device-to-device copy on an H100 (docs/FACTS.md), not the 3.35 TB/s "
        "spec",
        "launch_us": "~1 us per kernel launch inside a CUDA graph, measured on an H100 (docs/FACTS.md)",
        "dram_latency_us": "~0.8 us loaded DRAM latency: an assumption (csrc/lowrank_decode.cu uses it), not a "
        "measurement; used only for the bytes-in-flight comparison",
        "limits": "sm_90: 64K registers, 2048 threads, 32 blocks and 228 KB shared memory per SM (CUDA programming "
        "guide, compute capability 9.0)",
    },
}


def issue_rate_per_us() -> float:
    """Issue slots per microsecond on the whole chip."""
    return DEVICE["sms"] * DEVICE["schedulers_per_sm"] * DEVICE["clock_ghz"] * 1e3


def little_bytes_per_sm() -> float:
    """Bytes each SM must keep in flight for the chip to stream DRAM at full bandwidth (Little's law)."""
    return DEVICE["dram_bytes_per_s"] * DEVICE["dram_latency_us"] * 1e-6 / DEVICE["sms"]


# ---------------------------------------------------------------------------------------------------------------
# SASS: parsing, instruction classes, the hot loop.

CLASSES = (
    "global_load",
    "global_store",
    "shared_load",
    "shared_store",
    "fp_math",
    "tensor_core",
    "shuffle",
    "barrier",
    "int_logic",
    "conversion",
    "other",
)
_OPCODE_CLASS = {
    "global_load": {"LDG", "LDGSTS", "LD", "UTMALDG", "UBLKCP"},
    "global_store": {"STG", "ST", "RED", "REDG", "ATOM", "ATOMG", "UTMASTG"},
    "shared_load": {"LDS", "LDSM"},
    "shared_store": {"STS", "STSM", "ATOMS"},
    "fp_math": {"FFMA", "FADD", "FMUL", "FMNMX", "FSEL", "FSETP", "FSWZADD", "HFMA2", "HADD2", "HMUL2", "HMNMX2",
                "HSETP2", "DFMA", "DADD", "DMUL"},  # fmt: skip
    "tensor_core": {"HMMA", "IMMA", "DMMA", "BMMA", "HGMMA", "IGMMA", "QGMMA", "BGMMA"},
    "shuffle": {"SHFL"},
    "barrier": {"BAR", "DEPBAR", "LDGDEPBAR", "MEMBAR", "WARPSYNC", "BSSY", "BSYNC", "SYNCS", "ARRIVES", "ERRBAR"},
    "int_logic": {"IADD3", "IADD", "VIADD", "IMAD", "IMUL", "ISCADD", "LEA", "LOP3", "LOP", "SHF", "SHL", "SHR",
                  "ISETP", "IMNMX", "VIMNMX", "IABS", "SEL", "PRMT", "MOV", "BMSK", "SGXT", "FLO", "POPC", "BREV",
                  "PLOP3", "IDP", "IDP4A", "VABSDIFF", "VABSDIFF4"},  # fmt: skip
    "conversion": {"F2F", "F2I", "I2F", "I2FP", "F2FP", "FRND", "I2I", "I2IP", "F2IP"},
}
_CLASS_OF = {op: cls for cls, ops in _OPCODE_CLASS.items() for op in ops}
# Uniform-datapath integer ops (UIADD3, UMOV, ...) issue like their vector twins; ULDC is a constant load: other.
_UNIFORM_INT = {"U" + op for op in _OPCODE_CLASS["int_logic"]}

_FUNC = re.compile(r"^//-+ \.text\.(\S+) -+$")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclasses.dataclass(frozen=True)
class Instr:
    addr: int
    opcode: str  # full mnemonic with modifiers, e.g. LDG.E.EF.128
    text: str  # the instruction as disassembled, predicate included
    target: str | None  # branch target label

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


def parse_sass(text: str) -> dict[str, tuple[list[Instr], dict[str, int]]]:
    """nvdisasm -c output -> {function: (instructions, {label: index of the instruction it names})}."""
    funcs: dict[str, tuple[list[Instr], dict[str, int]]] = {}
    instrs: list[Instr] | None = None
    labels: dict[str, int] = {}
    for line in text.splitlines():
        if m := _FUNC.match(line.strip()):
            instrs, labels = [], {}
            funcs[m.group(1)] = (instrs, labels)
        elif instrs is None:
            continue
        elif m := _LABEL.match(line.strip()):
            labels[m.group(1)] = len(instrs)
        elif m := _INSTR.match(line):
            body = m.group(2)
            words = body.split()
            if words and words[0].startswith("@"):
                words = words[1:]
            target = _TARGET.search(body)
            instrs.append(Instr(int(m.group(1), 16), words[0] if words else "", body, target and target.group(1)))
    return funcs


def classify(opcode: str) -> str:
    base = opcode.split(".")[0]
    if base in _CLASS_OF:
        return _CLASS_OF[base]
    if base in _UNIFORM_INT:
        return "int_logic"
    return "other"


@dataclasses.dataclass(frozen=True)
class Loop:
    start: int  # index of the first instruction (the branch target)
    end: int  # index of the last backward branch to it (inclusive)
    loops_found: int  # backward-branch regions in the function
    innermost: int  # of which innermost

    @property
    def size(self) -> int:
        return self.end - self.start + 1


def find_hot_loop(instrs: list[Instr], labels: dict[str, int], tensor_core: bool = False) -> Loop | None:
    """The innermost backward-branch region with the most instructions (module docstring, step 3) -- with
    `tensor_core`, the one with the most HMMA first (a kernel whose K loop is straight-line mma code can have a larger
    epilogue loop); None if the function has no loop."""
    regions: dict[int, int] = {}
    for i, ins in enumerate(instrs):
        if ins.base == "BRA" and ins.target in labels:
            t = labels[ins.target]
            if t < i:  # t == i is the self-branch that ends every function, not a loop
                regions[t] = max(regions.get(t, i), i)
    spans = sorted(regions.items())
    inner = [(s, e) for s, e in spans if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in spans)]
    if not inner:
        return None
    def hmma(se):
        return sum(i.base == "HMMA" for i in instrs[se[0] : se[1] + 1]) if tensor_core else 0

    s, e = max(inner, key=lambda se: (hmma(se), se[1] - se[0], -se[0]))
    return Loop(s, e, len(spans), len(inner))


def fragment_path_key(body: list[Instr]) -> tuple[int, int, int]:
    """The fast path of a tensor-core kernel fed by cp.async (the int4 v2 kernel): the most mma (HMMA), then the most
    asynchronous copies (LDGSTS: the 16-byte path, not the scalar fallback), then the fewest instructions -- so the
    once-per-group branches (scaling, the next group's constants) stay off it and are amortised separately."""
    return sum(i.base == "HMMA" for i in body), sum(i.base == "LDGSTS" for i in body), -len(body)


def group_path_key(body: list[Instr]) -> tuple[int, int, int, int, int]:
    """As fragment_path_key, but taking every branch that scales accumulators (FFMA) and loads the next group's scales
    and zeros (LDG): the path on which every k16 step ends a group."""
    return (sum(i.base == "HMMA" for i in body), sum(i.base == "LDGSTS" for i in body),
            sum(i.base == "FFMA" for i in body), sum(i.base == "LDG" for i in body), -len(body))  # fmt: skip


def hot_path(instrs: list[Instr], labels: dict[str, int], loop: Loop, key=None) -> list[int]:
    """Indices of the instructions on the fast path through one iteration of `loop`. Among the paths from its first
    instruction to a backward branch to it: those with the most evict-first (weight) bytes (the CUDA kernels stream
    weights with 16-byte __ldcs, their scalar fallbacks for V and U with plain loads), then the most bytes loaded
    from global and shared memory (every load issued, no early exit: all rows of the tile are computed), then the
    fewest instructions (the 16-byte path, not the masked scalar fallback the CUDA kernels keep for unaligned
    shapes). Forward branches only: the loop is innermost. `key(body)` replaces that ordering (a tuple, larger is
    preferred), e.g. fragment_path_key."""
    s, e = loop.start, loop.end
    targets = set(labels.values())
    leaders = {s} | {i for i in range(s, e + 1) if i in targets}
    leaders |= {i + 1 for i in range(s, e) if instrs[i].base in ("BRA", "BRX", "EXIT", "RET", "JMP")}
    starts = sorted(i for i in leaders if s <= i <= e)
    ends = [b - 1 for b in starts[1:]] + [e]
    block_of = {b: k for k, b in enumerate(starts)}
    best: list[tuple | None] = [None] * len(starts)  # (*key, previous block)

    def cost(k):
        body = instrs[starts[k] : ends[k] + 1]
        if key is not None:
            return key(body)
        weights = sum(access_bytes(i.opcode) for i in body if i.base == "LDG" and ".EF" in i.opcode)
        loaded = sum(access_bytes(i.opcode) for i in body if classify(i.opcode) in ("global_load", "shared_load"))
        return weights, loaded, -len(body)

    best[0] = (*cost(0), -1)
    closing = []
    for k in range(len(starts)):
        if best[k] is None:
            continue
        last = instrs[ends[k]]
        conditional = last.text.startswith("@")
        succ = []
        if last.base == "BRA":
            t = labels.get(last.target)
            if t == s:
                closing.append(k)
            elif t is not None and ends[k] < t <= e:
                succ.append(block_of[t])
            if conditional and k + 1 < len(starts):
                succ.append(k + 1)
        elif last.base in ("EXIT", "RET", "BRX", "JMP") and not conditional:
            pass
        elif k + 1 < len(starts):
            succ.append(k + 1)
        for t in succ:
            cand = (*(a + b for a, b in zip(best[k][:-1], cost(t), strict=True)), k)
            if best[t] is None or cand[:-1] > best[t][:-1]:
                best[t] = cand
    if not closing:
        return list(range(s, e + 1))
    k = max(closing, key=lambda c: best[c][:-1])
    path = []
    while k >= 0:
        path = list(range(starts[k], ends[k] + 1)) + path
        k = best[k][-1]
    return path


_WIDTH = re.compile(r"\.(128|64|32|U16|S16|U8|S8)\b")
_WIDTH_BYTES = {"128": 16, "64": 8, "32": 4, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def access_bytes(opcode: str) -> int:
    """Bytes per thread of one memory instruction (LDG.E.128 -> 16, LDG.E -> 4, LDG.E.U16 -> 2)."""
    m = _WIDTH.search(opcode)
    return _WIDTH_BYTES[m.group(1)] if m else 4


@dataclasses.dataclass
class LoopStats:
    instructions: int  # on the fast path of one iteration (`hot_path`)
    region_instructions: int  # every instruction of the loop region, fallback paths included
    classes: dict[str, int]
    opcodes: dict[str, int]  # full mnemonic -> count
    global_load_bytes: int  # per thread and iteration
    weight_load_bytes: int  # evict-first (__ldcs) loads per thread and iteration: the CUDA kernels' weight loads
    async_copies: int  # LDGSTS (cp.async into shared memory: a software-pipelined loop)
    loops_found: int
    innermost_loops: int
    start_addr: int | None
    whole_function: bool
    function_instructions: int


def loop_stats(instrs: list[Instr], labels: dict[str, int], key=None) -> LoopStats:
    loop = find_hot_loop(instrs, labels, tensor_core=key is not None)
    body = [instrs[i] for i in hot_path(instrs, labels, loop, key)] if loop else [i for i in instrs if i.base != "NOP"]
    classes = Counter({c: 0 for c in CLASSES})
    classes.update(classify(i.opcode) for i in body)
    loads = [i for i in body if classify(i.opcode) == "global_load"]
    return LoopStats(
        instructions=len(body),
        region_instructions=loop.size if loop else len(body),
        classes=dict(classes),
        opcodes=dict(Counter(i.opcode for i in body).most_common()),
        global_load_bytes=sum(access_bytes(i.opcode) for i in loads),
        weight_load_bytes=sum(access_bytes(i.opcode) for i in loads if ".EF" in i.opcode),
        async_copies=sum(i.base == "LDGSTS" for i in body),
        loops_found=loop.loops_found if loop else 0,
        innermost_loops=loop.innermost if loop else 0,
        start_addr=body[0].addr if loop else None,
        whole_function=loop is None,
        function_instructions=len(instrs),
    )


# ---------------------------------------------------------------------------------------------------------------
# Tools.


def _triton_tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def _nvdisasm() -> str:
    return str(Path(_triton_tool("cuobjdump")).with_name("nvdisasm"))


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    return shutil.which("nvcc") or (str(candidate) if candidate.exists() else None)


def toolchain_unavailable_reason(check) -> str | None:
    reason = check.toolchain_unavailable_reason()
    if reason is None and not os.access(_nvdisasm(), os.X_OK):
        reason = f"nvdisasm is missing next to Triton's cuobjdump ({_nvdisasm()})"
    if reason is None and _nvcc() is None:
        reason = "nvcc not found on PATH, in $CUDA_HOME or /usr/local/cuda: cannot compile csrc/*.cu"
    return reason


def disassemble(cubin: bytes) -> dict[str, tuple[list[Instr], dict[str, int]]]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_nvdisasm(), "-c", f.name], check=True, capture_output=True, text=True).stdout
    return parse_sass(out)


_USAGE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """{function: {registers, stack, static_shared, local}} from cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_triton_tool("cuobjdump"), "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
    return {
        m.group(1): dict(registers=int(m.group(2)), stack=int(m.group(3)), static_shared=int(m.group(4)),
                         local=int(m.group(5)))  # fmt: skip
        for m in _USAGE.finditer(out)
    }


# ---------------------------------------------------------------------------------------------------------------
# Occupancy.


def occupancy(registers: int, smem_per_block: int, threads: int) -> dict:
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(registers, 1) * 32 / DEVICE["reg_alloc_unit"]) * DEVICE["reg_alloc_unit"]
    limits = {
        "registers": (DEVICE["regs_per_sm"] // per_warp) // warps,
        "shared_memory": DEVICE["smem_per_sm"] // max(smem_per_block, 1),
        "threads": DEVICE["max_threads_per_sm"] // threads,
        "blocks": DEVICE["max_blocks_per_sm"],
    }
    blocks = min(limits.values())
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps, "limited_by": min(limits, key=limits.get),
            "limits": limits}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Variants: the benchmark cases. bf16 activations (the benchmarks' default), 4096 x 4096.

N_IN = M_OUT = 4096
BF16 = 2
TARGETS = {  # (op, rank or entries) -> (target us, source)
    ("lowrank_matmul", 256): (4.0, "issue 1: 4096^2, r = 256, <= 4 us at M = 1, flat up to M = 16"),
    ("lowrank_matmul", 1024): (8.0, "issue 1: 4096^2, r = 1024, <= 8 us at M = 1, flat up to M = 16"),
    ("quant_lowrank_matmul", 1): (6.0, "issue 5: 4096^2 int4 g128 + r = 128, <= 6 us at M = 1"),
    ("quant_lowrank_matmul", 16): (8.0, "issue 5: 4096^2 int4 g128 + r = 128, <= 8 us at M = 16"),
    ("codebook_matmul", 1): (5.0, "issue 6: 4096^2, K = 1024, r = 128, <= 5 us at M = 1"),
}


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    backend: str  # triton | cuda | cuda-v2 (the int4 kernel v2 on layout v2)
    M: int
    rank: int
    entries: int = 0  # codebook K
    quick: bool = False

    @property
    def label(self) -> str:
        extra = {"lowrank_matmul": f"r={self.rank}", "quant_lowrank_matmul": f"int4 g128 r={self.rank}",
                 "codebook_matmul": f"rows K={self.entries} r={self.rank}"}[self.op]  # fmt: skip
        return f"{self.op} {self.backend} M={self.M} 4096x4096 {extra}"

    def target(self) -> tuple[float | None, str]:
        if self.op == "lowrank_matmul":
            return TARGETS[(self.op, self.rank)]
        if self.op == "quant_lowrank_matmul":
            return TARGETS[(self.op, self.M)]
        if self.M == 1:
            return TARGETS[(self.op, 1)]
        return None, "issue 6: >= 2.5x faster than dense bf16 at M = 1..16 (dense not measured at M = 16): no us target"

    def dram_bytes(self) -> dict[str, int]:
        n, m, r, M = N_IN, M_OUT, self.rank, self.M
        parts = {"x": M * n * BF16, "y": M * m * BF16, "V": r * n * BF16, "U": m * r * BF16}
        if self.op == "quant_lowrank_matmul":
            parts |= {"codes": m * n // 2, "scales_zeros": 2 * m * (n // 128) * BF16}
        if self.op == "codebook_matmul":
            parts |= {"codebook": self.entries * n * BF16, "index": m * 4}
        return parts

    def hot_loops_serial(self) -> bool:
        """True when the second kernel's hot loop waits for the first kernel (gdc_wait / wait_for_producer before
        its K loop); False when it streams beside it (the int4 base kernel waits only in its epilogue)."""
        return self.op != "quant_lowrank_matmul"


VARIANTS = [
    *(Case("lowrank_matmul", b, M, r) for b in ("triton", "cuda") for M in (1, 16) for r in (256, 1024)),
    *(Case("quant_lowrank_matmul", b, M, 128, quick=(b, M) == ("triton", 1))
      for b in ("triton", "cuda", "cuda-v2") for M in (1, 16)),
    *(Case("codebook_matmul", "triton", M, 128, entries=1024) for M in (1, 16)),
]  # fmt: skip


@dataclasses.dataclass
class KernelLaunch:
    """One kernel of a case: what it is, how it is launched, what it streams."""

    name: str
    grid_blocks: int
    threads: int
    dynamic_smem: int
    weight_elements: int  # weight elements one row block of the launch streams through its hot loop
    row_blocks: int  # times the weight is streamed (row blocks of x)
    element_bytes: float  # DRAM bytes per weight element (bf16 2, int4 0.5)
    cubin: bytes
    function: str
    elements_per_thread_iter: float | None  # Triton: from the block sizes; CUDA: None (from the EF loads)
    num_stages: int = 1
    config: dict = dataclasses.field(default_factory=dict)
    # The int4 v2 kernel: its loop's fast path is chosen by fragment_path_key, and the once-per-group scaling branch
    # is added back amortised over `group_k` weights along k per thread-iteration's `stage_k` (see analyse_kernel).
    fragment_loop: bool = False
    stage_k: int = 0
    group_k: int = 0


# ---- Triton: the launchers under scripts/check_sm90_compile.py's emulation.


def _load_check_script():
    spec = importlib.util.spec_from_file_location("check_sm90_compile", REPO / "scripts" / "check_sm90_compile.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _triton_run(case: Case):
    import torch

    def empty(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype)

    def decode_bound(launcher) -> dict:
        """The op passes its decode bound to the launchers that take one (as lowrank_ops.ops does)."""
        from lowrank_ops.backends import DECODE_MAX_M

        return {"decode_max_m": DECODE_MAX_M} if "decode_max_m" in inspect.signature(launcher).parameters else {}

    n, m, r, M = N_IN, M_OUT, case.rank, case.M
    if case.op == "lowrank_matmul":
        from lowrank_ops.kernels.lowrank_matmul import lowrank_matmul_triton

        extra = decode_bound(lowrank_matmul_triton)
        return lambda: lowrank_matmul_triton(empty(M, n), empty(r, n), empty(m, r), None, **extra)
    if case.op == "quant_lowrank_matmul":
        from lowrank_ops.kernels.quant_lowrank_matmul import quant_lowrank_matmul_triton
        from lowrank_ops.quant_format import num_groups, packed_width, qweight_dtype

        def run():
            q = empty(m, packed_width(n, 4), dtype=qweight_dtype(4))
            s, z = empty(m, num_groups(n, 128)), empty(m, num_groups(n, 128))
            return quant_lowrank_matmul_triton(empty(M, n), q, s, z, empty(r, n), empty(m, r), None, 4, 128,
                                               **decode_bound(quant_lowrank_matmul_triton))  # fmt: skip

        return run
    from lowrank_ops.kernels.codebook_matmul import codebook_matmul_triton

    def run():
        index = torch.zeros(m, dtype=torch.int32)
        c, v, u = empty(case.entries, n), empty(r, n), empty(m, r)
        return codebook_matmul_triton(empty(M, n), c, index, v, u, None, "rows", **decode_bound(codebook_matmul_triton))

    return run


def _triton_weights(case: Case, kernel: str, cfg: dict, grid: tuple) -> tuple[int, int, float, float]:
    """(weight elements per row block, row blocks, DRAM bytes per element, weight elements per program and hot-loop
    iteration) of one Triton launch, from the kernel's structure (see each kernel file)."""
    n, m, r = N_IN, M_OUT, case.rank
    row_blocks = grid[1]
    if kernel == "_quant_lowrank_matmul_kernel":  # K loop over BLOCK_KW words of 8 codes for BLOCK_N rows
        return m * n, row_blocks, 0.5, cfg["BLOCK_N"] * cfg["BLOCK_KW"] * 8
    if kernel == "_quant_lowrank_shrink_kernel":  # BLOCK_R rows of V x BLOCK_K columns
        return r * n, row_blocks, BF16, cfg["BLOCK_R"] * cfg["BLOCK_K"]
    per_iter = cfg["BLOCK_N"] * cfg["BLOCK_K"]  # _rows_product / _lowrank_matmul_kernel: (BLOCK_N, BLOCK_K) tiles
    if kernel == "_lowrank_matmul_kernel":  # shrink: rows of V over n; expand: rows of U over r
        return (r * n if cfg["_shrink"] else m * r), row_blocks, BF16, per_iter
    if kernel == "_codebook_shrink_kernel":
        return (case.entries + r) * n, row_blocks, BF16, per_iter
    if kernel == "_codebook_expand_kernel":
        return m * r, row_blocks, BF16, per_iter
    raise ValueError(f"kernel_report: no weight model for Triton kernel {kernel}")


def triton_launches(check, case: Case) -> list[KernelLaunch]:
    from triton.runtime.jit import JITFunction

    records: list[tuple[str, tuple, dict, object]] = []

    def getitem(kernel, grid):
        def compile_only(*args, **kwargs):
            compiled = kernel.warmup(*args, grid=grid, **kwargs)
            cfg = {k: v for k, v in kwargs.items() if k.startswith(("BLOCK_", "SPLIT", "USE_"))}
            records.append((kernel.fn.__name__, tuple(grid), cfg, compiled))

        return compile_only

    original = JITFunction.__getitem__
    with check.emulated_sm90():
        JITFunction.__getitem__ = getitem
        try:
            _triton_run(case)()
        finally:
            JITFunction.__getitem__ = original
    if not records:
        raise RuntimeError("kernel_report: no Triton kernel was compiled (TRITON_INTERPRET=1 at import?)")
    out = []
    for i, (name, grid, cfg, compiled) in enumerate(records):
        if name == "_lowrank_matmul_kernel":
            cfg["_shrink"] = i == 0  # the launcher runs the shrink first, then the expand
        elements, row_blocks, element_bytes, per_program_iter = _triton_weights(case, name, cfg, grid)
        threads = compiled.metadata.num_warps * 32
        blocks = math.prod(grid)
        role = "" if name != "_lowrank_matmul_kernel" else " (shrink)" if cfg["_shrink"] else " (expand)"
        out.append(KernelLaunch(
            name=name + role,
            grid_blocks=blocks, threads=threads, dynamic_smem=compiled.metadata.shared, weight_elements=elements,
            row_blocks=row_blocks, element_bytes=element_bytes, cubin=compiled.asm["cubin"], function=name,
            elements_per_thread_iter=per_program_iter / threads, num_stages=compiled.metadata.num_stages,
            config={"grid": list(grid), **{k: v for k, v in cfg.items() if not k.startswith("_")}},
        ))  # fmt: skip
    return out


# ---- CUDA: nvcc cubins, launch plans recomputed from the sources' constants.

_CONSTANT = re.compile(r"constexpr (?:int|uint32_t) (k\w+) = (\d+)(?:u)?;")
_EXPAND_ROWS = re.compile(r"expand_rows\(int tile\) \{ return tile <= (\d+) \? (\d+) : (\d+); \}")


@functools.cache
def cuda_constants() -> dict[str, int]:
    consts: dict[str, int] = {}
    for name in ("decode_common.cuh", "lowrank_decode.cu", "quant_lowrank_decode.cu", "quant_lowrank_decode_v2.cu"):
        consts |= {k: int(v) for k, v in _CONSTANT.findall((CSRC / name).read_text())}
    m = _EXPAND_ROWS.search((CSRC / "lowrank_decode.cu").read_text())
    needed = {"kWarp", "kVec", "kShrinkThreads", "kShrinkRows", "kShrinkVecs", "kShrinkWarpsPerSm", "kExpandThreads",
              "kExpandBlocksPerSm", "kExpandVecs", "kQuantThreads", "kQuantRows", "kQuantBlocksPerSm", "kV2Threads",
              "kV2BlocksPerWarp", "kV2StageK64", "kV2Stages", "kV2MaxSplits"}  # fmt: skip
    if missing := needed - set(consts) or (set() if m else {"expand_rows"}):
        raise RuntimeError(f"kernel_report: csrc no longer defines {sorted(missing)} as this script reads them; "
                           "update _cuda_*_plan to the new host code")  # fmt: skip
    consts["expand_rows_cut"], consts["expand_rows_small"], consts["expand_rows_large"] = map(int, m.groups())
    return consts


def _row_tile(rows: int) -> int:
    tile = 1
    while tile < rows:
        tile *= 2
    return tile


def _cuda_shrink_plan(n: int, rank: int) -> dict:
    """lowrank_shrink_plan (csrc/lowrank_decode.cu) for DEVICE's SM count."""
    c = cuda_constants()
    chunk = c["kWarp"] * c["kVec"] * c["kShrinkVecs"]
    chunks = -(-n // chunk)
    groups = -(-rank // c["kShrinkRows"])
    want = -(-(c["kShrinkWarpsPerSm"] * DEVICE["sms"]) // groups)
    splits = max(1, min(want, chunks))
    per_slice = -(-chunks // splits)
    splits = -(-chunks // per_slice)
    warps = c["kShrinkThreads"] // c["kWarp"]
    return {"splits": splits, "chunks_per_slice": per_slice, "blocks": -(-(groups * splits) // warps)}


def _cuda_expand_blocks(m: int, tile: int) -> int:
    c = cuda_constants()
    rows = c["expand_rows_small"] if tile <= c["expand_rows_cut"] else c["expand_rows_large"]
    per_block = (c["kExpandThreads"] // c["kWarp"]) * rows
    return min(-(-m // per_block), c["kExpandBlocksPerSm"] * DEVICE["sms"])


def _cuda_quant_blocks(m: int) -> int:
    c = cuda_constants()
    per_block = (c["kQuantThreads"] // c["kWarp"]) * c["kQuantRows"]
    return min(-(-m // per_block), c["kQuantBlocksPerSm"] * DEVICE["sms"])


def _cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "lowrank_ops" / "kernel_report"


def cuda_cubin(source: str) -> bytes:
    """sm_90a cubin of csrc/<source>, cached under ~/.cache/lowrank_ops/kernel_report by the hash of every csrc
    header and source and the nvcc version."""
    nvcc = _nvcc()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256(version.encode() + source.encode())
    for p in sorted(CSRC.iterdir()):
        if p.suffix in (".cu", ".cuh", ".h"):
            digest.update(p.name.encode() + p.read_bytes())
    cached = _cache_dir() / f"{Path(source).stem}-{digest.hexdigest()[:16]}.cubin"
    if cached.exists():
        return cached.read_bytes()
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "k.cubin"
        subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_90a", "-cubin", f"-I{CSRC}", "-o", str(out),
                        str(CSRC / source)], check=True, capture_output=True, text=True)  # fmt: skip
        data = out.read_bytes()
    tmp_path = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_path.write_bytes(data)
    os.replace(tmp_path, cached)  # atomic: a concurrent run reads a whole cubin or none
    return data


def _cuda_function(functions, kernel: str, tile: int) -> str:
    pattern = re.compile(rf"{kernel}I13__nv_bfloat16Li{tile}EE")
    found = [f for f in functions if pattern.search(f)]
    if len(found) != 1:
        raise RuntimeError(f"kernel_report: expected one {kernel}<bf16, {tile}> in the cubin, found {found}")
    return found[0]


def _cuda_v2_launch(case: Case) -> KernelLaunch:
    """The int4 kernel v2 (csrc/quant_lowrank_decode_v2.cu): its split-K plan (v2_split) recomputed for DEVICE."""
    c = cuda_constants()
    n, m = N_IN, M_OUT
    warps = c["kV2Threads"] // 32
    tile_n, x_stride = warps * c["kV2BlocksPerWarp"] * 16, c["kV2StageK64"] * 64 + 8  # kV2TileN, kV2XStride
    tiles, k_blocks = -(-m // tile_n), -(-n // 64)
    best = None
    for s in range(1, min(k_blocks, c["kV2MaxSplits"]) + 1):
        per = -(-k_blocks // s)
        used = -(-k_blocks // per)
        busiest = -(-tiles * used // DEVICE["sms"]) * per
        if best is None or busiest < best[0]:
            best = (busiest, used, per)
    _, splits, per = best
    cubin = cuda_cubin("quant_lowrank_decode_v2.cu")
    group = 128  # the benchmark's g128; the launcher's rule for the aligned variant (quant_lowrank_decode_v2)
    aligned = group % (64 * c["kV2StageK64"]) == 0 and per % c["kV2StageK64"] == 0 and k_blocks % c["kV2StageK64"] == 0
    found = [f for f in _functions_of(cubin) if re.search(rf"quant_v2_kernelI13__nv_bfloat16Lb{int(aligned)}EE", f)]
    if len(found) != 1:
        raise RuntimeError(f"kernel_report: expected one quant_v2_kernel<bf16, {aligned}> in the cubin, found {found}")
    stage_vecs = warps * c["kV2BlocksPerWarp"] * c["kV2StageK64"] * 32 + 16 * x_stride * 2 // 16
    codes_per_thread = c["kV2BlocksPerWarp"] * c["kV2StageK64"] * 32  # one 16-byte vector (32 codes) per (b, kk)
    return KernelLaunch(
        name=f"quant_v2_kernel<bf16, aligned={aligned}>", grid_blocks=tiles * splits, threads=c["kV2Threads"],
        dynamic_smem=16 * stage_vecs * c["kV2Stages"], weight_elements=m * n, row_blocks=1, element_bytes=0.5,
        cubin=cubin, function=found[0], elements_per_thread_iter=codes_per_thread, num_stages=c["kV2Stages"],
        config={"tiles": tiles, "splits": splits, "k64_blocks_per_split": per, "layout": 2, "aligned": aligned,
                "flush_ffma": 8 * c["kV2BlocksPerWarp"]},
        fragment_loop=True, stage_k=64 * c["kV2StageK64"], group_k=group,
    )  # fmt: skip


def cuda_launches(case: Case) -> list[KernelLaunch]:
    c = cuda_constants()
    n, m, r, M = N_IN, M_OUT, case.rank, case.M
    tile = _row_tile(M)
    shrink_cubin = cuda_cubin("lowrank_decode.cu")
    if case.backend == "cuda-v2":
        consumer_blocks, consumer_cubin, consumer = None, None, None
    elif case.op == "lowrank_matmul":
        consumer_blocks, consumer_cubin = _cuda_expand_blocks(m, tile), shrink_cubin
        consumer = ("lowrank_expand_kernel", c["kExpandThreads"], m * r, BF16)
    else:
        consumer_blocks, consumer_cubin = _cuda_quant_blocks(m), cuda_cubin("quant_lowrank_decode.cu")
        consumer = ("quant_lowrank_kernel", c["kQuantThreads"], m * n, 0.5)
    plan = _cuda_shrink_plan(n, r)
    launches = []
    for (kernel, threads, elements, element_bytes), blocks, cubin, smem, cfg in (
        (("lowrank_shrink_kernel", c["kShrinkThreads"], r * n, BF16), plan["blocks"], shrink_cubin, 0, plan),
        *([] if consumer is None else
          [(consumer, consumer_blocks, consumer_cubin, 4 * M * r, {"blocks": consumer_blocks, "partials_read": 1})]),
    ):
        function = _cuda_function(_functions_of(cubin), kernel, tile)
        launches.append(KernelLaunch(
            name=f"{kernel}<bf16, {tile}>", grid_blocks=blocks, threads=threads, dynamic_smem=smem,
            weight_elements=elements, row_blocks=1, element_bytes=element_bytes, cubin=cubin, function=function,
            elements_per_thread_iter=None, config={"M_tile": tile, **cfg},
        ))  # fmt: skip
    if case.backend == "cuda-v2":
        launches.append(_cuda_v2_launch(case))
    return launches


@functools.cache
def _functions_of(cubin: bytes) -> tuple[str, ...]:
    return tuple(resource_usage(cubin))


# ---------------------------------------------------------------------------------------------------------------
# The estimate.


@functools.cache
def _analysed(cubin: bytes):
    return disassemble(cubin), resource_usage(cubin)


def analyse_kernel(launch: KernelLaunch) -> dict:
    funcs, usage = _analysed(launch.cubin)
    instrs, labels = funcs[launch.function]
    res = usage[launch.function]
    stats = loop_stats(instrs, labels, fragment_path_key if launch.fragment_loop else None)
    group_branch = None
    if launch.fragment_loop:
        # The path taking every group-end branch of an iteration (one per k16 step in the general loop, one per
        # stage in the aligned one; counted by their FFMA, flush_ffma each) minus the fast path, per branch, is one
        # group end; a group of group_k weights ends stage_k / group_k times per iteration.
        every = loop_stats(instrs, labels, group_path_key)
        branches = (every.opcodes.get("FFMA", 0) - stats.opcodes.get("FFMA", 0)) / launch.config["flush_ffma"]
        per_group = (every.instructions - stats.instructions) / branches
        ends = launch.stage_k / launch.group_k
        group_branch = {"instructions_per_group_end": per_group, "group_ends_per_iteration": ends,
                        "group_end_branches_per_iteration": branches, "fast_path_instructions": stats.instructions,
                        "every_group_end_path_instructions": every.instructions,
                        "group_size": launch.group_k}  # fmt: skip
        stats = dataclasses.replace(stats, instructions=round(stats.instructions + per_group * ends))
    smem = res["static_shared"] + launch.dynamic_smem
    occ = occupancy(res["registers"], smem, launch.threads)
    warps = launch.threads // 32

    if launch.elements_per_thread_iter is None:  # CUDA: weights are exactly the evict-first loads
        if not stats.weight_load_bytes:
            raise RuntimeError(f"kernel_report: no evict-first (weight) load in the hot loop of {launch.name}")
        per_thread = stats.weight_load_bytes / launch.element_bytes
        how = "evict-first 16-byte loads (LDG.E.EF) in the loop"
    elif launch.fragment_loop:
        per_thread = launch.elements_per_thread_iter
        how = ("layout v2: one 16-byte cp.async vector of 32 codes per (n16 block, k64 block) and lane; instructions: "
               "the fast path plus the group-end branch amortised (hot_loop.group_branch)")  # fmt: skip
    else:
        per_thread = launch.elements_per_thread_iter
        how = "block sizes of the launch (Triton does not unroll the K loop)"
        if stats.whole_function:
            per_thread = launch.weight_elements / (launch.grid_blocks / launch.row_blocks) / launch.threads
            how = "no loop: the program's whole weight tile"
    weight_bytes_thread_iter = per_thread * launch.element_bytes
    warp_iters = launch.weight_elements * launch.row_blocks / (per_thread * 32)
    slots = stats.instructions * warp_iters
    resident = min(occ["blocks_per_sm"], math.ceil(launch.grid_blocks / DEVICE["sms"]))
    busiest_blocks = math.ceil(launch.grid_blocks / DEVICE["sms"])
    busiest_warps = busiest_blocks * warps
    chip_us = slots / issue_rate_per_us()
    busiest_us = (slots / launch.grid_blocks * busiest_blocks) / (
        min(DEVICE["schedulers_per_sm"], busiest_warps) * DEVICE["clock_ghz"] * 1e3
    )
    stages = launch.num_stages - 1 if stats.async_copies else 1
    in_flight = weight_bytes_thread_iter * launch.threads * resident * max(stages, 1)
    return {
        "kernel": launch.name,
        "function": launch.function,
        "launch": {"blocks": launch.grid_blocks, "threads_per_block": launch.threads, **launch.config},
        "registers": res["registers"],
        "spill_bytes_per_thread": res["stack"] + res["local"],
        "shared_memory_per_block": smem,
        "shared_memory_detail": {"static_incl_1KB_reserved": res["static_shared"], "dynamic": launch.dynamic_smem},
        "occupancy": occ,
        "resident_blocks_per_sm": resident,
        "resident_warps_per_sm": resident * warps,
        "hot_loop": {
            "instructions": stats.instructions,
            "region_instructions": stats.region_instructions,
            "classes": stats.classes,
            "opcodes": stats.opcodes,
            "start_address": None if stats.start_addr is None else f"0x{stats.start_addr:04x}",
            "whole_function": stats.whole_function,
            "loops_in_function": stats.loops_found,
            "innermost_loops": stats.innermost_loops,
            "function_instructions": stats.function_instructions,
            "global_load_bytes_per_thread": stats.global_load_bytes,
            "async_copies": stats.async_copies,
            **({"group_branch": group_branch} if group_branch else {}),
        },
        "weight_elements_per_thread_iteration": per_thread,
        "weight_elements_from": how,
        "issue_slots_per_weight_element": stats.instructions / per_thread,
        "weight_elements": launch.weight_elements * launch.row_blocks,
        "issue_slots": slots,
        "issue_us_chip": chip_us,
        "issue_us_busiest_sm": busiest_us,
        "issue_us": max(chip_us, busiest_us),
        "weight_bytes_requested_per_sm_per_iteration": in_flight,
        "loads_cover_weights": stats.global_load_bytes + 1e-9 >= weight_bytes_thread_iter
        or bool(stats.async_copies),
    }


def analyse_case(case: Case, launches: list[KernelLaunch]) -> dict:
    kernels = [analyse_kernel(k) for k in launches]
    parts = case.dram_bytes()
    dram = sum(parts.values())
    byte_us = dram / DEVICE["dram_bytes_per_s"] * 1e6
    if case.hot_loops_serial():
        issue_us = sum(k["issue_us"] for k in kernels)
        issue_rule = "sum of per-kernel floors (the second kernel's hot loop waits for the first)"
    else:
        issue_us = max(sum(k["issue_us_chip"] for k in kernels), max(k["issue_us"] for k in kernels))
        issue_rule = "kernels stream side by side: max(sum of chip-wide floors, largest per-kernel floor)"
    bound = max(byte_us, issue_us) + DEVICE["launch_us"]
    target, source = case.target()
    in_flight = min(k["weight_bytes_requested_per_sm_per_iteration"] for k in kernels)
    return {
        "op": case.op,
        "backend": case.backend,
        "label": case.label,
        "M": case.M,
        "n": N_IN,
        "m": M_OUT,
        "rank": case.rank,
        **({"entries": case.entries} if case.entries else {}),
        "dtype": "bfloat16",
        "dram_bytes": dram,
        "dram_bytes_detail": parts,
        "byte_floor_us": byte_us,
        "issue_floor_us": issue_us,
        "issue_floor_rule": issue_rule,
        "binding_term": "issue" if issue_us > byte_us else "bytes",
        "lower_bound_us": bound,
        "target_us": target,
        "target_source": source,
        "lower_bound_within_target": None if target is None else bound <= target,
        "min_weight_bytes_requested_per_sm": in_flight,
        "kernels": kernels,
    }


# ---------------------------------------------------------------------------------------------------------------
# Issue 19's counts, checked against this run.


def _find(cases: list[dict], op: str, backend: str, M: int, kernel: str) -> dict | None:
    for case in cases:
        if (case["op"], case["backend"], case["M"]) == (op, backend, M):
            for k in case["kernels"]:
                if k["kernel"].startswith(kernel):
                    return k
    return None


def issue_19_checks(cases: list[dict]) -> list[dict]:
    checks = []

    def add(claim, kernel, found, verdict):
        checks.append({"claim": claim, "kernel": kernel, "found": found, "verdict": verdict})

    k = _find(cases, "quant_lowrank_matmul", "triton", 1, "_quant_lowrank_matmul_kernel")
    if k:
        loop, cls = k["hot_loop"], k["hot_loop"]["classes"]
        found = (f"{k['issue_slots_per_weight_element']:.1f} slots per code, {loop['instructions']} instructions for "
                 f"{k['weight_elements_per_thread_iteration']:g} codes per thread, {cls['shared_load']} shared loads, "
                 f"{loop['opcodes'].get('BAR.SYNC.DEFER_BLOCKING', 0)} BAR")  # fmt: skip
        same = (loop["instructions"], cls["shared_load"]) == (704, 82)
        add("Triton int4 M = 1: 11.0 issue slots per code (704 instructions per K-step for 64 codes per thread, 82 "
            "shared-memory loads, 16 barriers)", k["kernel"], found, "reproduced" if same else "differs (see found)")
        slots = k["issue_slots"]
        at_1755 = slots / (DEVICE["sms"] * DEVICE["schedulers_per_sm"] * 1.755e3)
        add("11 slots per code puts the 4096^2 int4 base at >= 6.2 us at M = 1 (132 SMs x 4 x ~1.98 GHz)",
            k["kernel"], f"{slots / 1e6:.2f} M issue slots = {k['issue_us_chip']:.2f} us at 1.98 GHz; "
            f"{at_1755:.2f} us at 1.755 GHz (H100 PCIe boost)",
            "corrected: 6.2 us needs a 1.755 GHz clock; at 1.98 GHz the base kernel's K loop alone is "
            f"{k['issue_us_chip']:.1f} us of issue (the op adds its shrink and one launch)")  # fmt: skip
    k = _find(cases, "quant_lowrank_matmul", "triton", 16, "_quant_lowrank_matmul_kernel")
    if k:
        cls = k["hot_loop"]["classes"]
        found = (f"{k['issue_slots_per_weight_element']:.1f} slots per code, {cls['tensor_core']} HMMA, "
                 f"{cls['shared_store']} shared stores, {k['hot_loop']['opcodes'].get('BAR.SYNC.DEFER_BLOCKING', 0)} "
                 f"BAR, {k['launch']['blocks']} programs of {k['launch']['threads_per_block'] // 32} "
                 "warps")  # fmt: skip
        same = round(k["issue_slots_per_weight_element"], 1) == 12.6 and cls["shared_store"] == 96
        add("Triton int4 M = 16: 12.6 slots per code (HMMA, 96 shared-memory stores and 16 barriers per step; 128 "
            "programs of 4 warps)", k["kernel"], found, "reproduced" if same else "differs (see found)")
    k = _find(cases, "quant_lowrank_matmul", "cuda", 1, "quant_lowrank_kernel")
    if k:
        v, loop = k["issue_slots_per_weight_element"], k["hot_loop"]
        per = k["weight_elements_per_thread_iteration"]
        add("CUDA int4 M = 1: at most 10.4 slots per code", k["kernel"],
            f"the loop region holds {loop['region_instructions']} instructions = "
            f"{loop['region_instructions'] / per:.1f} per code ({per:g} codes per thread), its 16-byte fast path "
            f"{loop['instructions']} = {v:.1f} per code (the rest is the masked scalar fallback for unaligned shapes)",
            "reproduced as an upper bound (whole region); the path the benchmark shapes take is lower"
            if round(loop["region_instructions"] / per, 1) <= 10.4 else "differs: more than 10.4")  # fmt: skip
    k = _find(cases, "quant_lowrank_matmul", "cuda", 16, "quant_lowrank_kernel")
    if k:
        loop = k["hot_loop"]
        ffma = loop["opcodes"].get("FFMA", 0)
        add("CUDA int4 M = 16: about 7365 static instructions per tile including 2560 fp32 FMAs", k["kernel"],
            f"{loop['region_instructions']} instructions in the K-loop region, {loop['instructions']} on its fast path "
            f"({k['weight_elements_per_thread_iteration']:g} codes per thread per iteration), {ffma} FFMA on it: "
            f"{k['issue_slots_per_weight_element']:.1f} slots per code",
            "reproduced (7365 is the whole K-loop region, fallback paths included)"
            if abs(loop["region_instructions"] - 7365) <= 50 and ffma == 2560 else "differs (see found)")  # fmt: skip
    return checks


# ---------------------------------------------------------------------------------------------------------------
# Output.


def _notes(cases: list[dict]) -> list[str]:
    notes = [
        "Every figure is a static estimate from sm_90a SASS compiled on a machine without a GPU, not a measurement. "
        "The lower bound ignores stalls (memory latency, dependent-instruction latency, tensor-core and shared-memory "
        "pipe throughput, barriers), prologues, epilogues and every loop but the hot one: a kernel above its target "
        "here cannot meet it as compiled; one below may still miss it.",
        f"Bytes in flight: each SM needs ~{little_bytes_per_sm() / 1024:.0f} KB of weight loads outstanding to stream "
        "3.0 TB/s at ~0.8 us latency (Little's law, latency assumed). The per-kernel figure is the weight bytes one "
        "loop iteration requests on an SM (x resident blocks; x (stages - 1) for cp.async pipelines): an upper "
        "estimate of what is in flight, since a loop that consumes its loads in the same iteration has none "
        "outstanding while it computes.",
        "Fast path: where a loop holds a 16-byte path and a masked scalar fallback (the CUDA kernels, chosen by a "
        "runtime flag), only the fast path is counted (`hot_path`); 'region_instructions' in the JSON keeps the "
        "whole region. Triton's loops here are straight-line, so both are equal.",
    ]
    quant = {(c["backend"], c["M"]): c for c in cases if c["op"] == "quant_lowrank_matmul"}
    if quant:
        codes = M_OUT * N_IN
        base = {key: next(k for k in c["kernels"] if "shrink" not in k["kernel"]) for key, c in quant.items()}
        slots = ", ".join(f"{b_} M = {m_}: {k['issue_slots_per_weight_element']:.1f}" for (b_, m_), k in base.items())
        floor = max(c["byte_floor_us"] for c in quant.values())
        budget = floor * issue_rate_per_us() * 32 / codes  # slots per element are warp instructions per 32 elements
        at4 = 4 * codes / 32 / issue_rate_per_us()
        flight = ", ".join(f"{b_} M = {m_}: {k['weight_bytes_requested_per_sm_per_iteration'] / 1024:.0f} KB"
                           for (b_, m_), k in base.items())  # fmt: skip
        notes.append(
            f"For int4 v2 (issue 19 part 2), from this report. Issue slots per code in today's base loops: {slots}. "
            f"The whole op may spend {budget:.1f} slots per code before issue exceeds the {floor:.2f} us byte floor "
            f"at 4096^2 (floor x chip issue rate x 32 / codes); issue 19's <= 4 per code for the base is "
            f"{at4:.2f} us of issue, leaving room for the shrink and the epilogue. Where the slots go: the Triton "
            "M = 1 loop spends per 64 codes 82 LDS + 9 STS + 16 BAR on splitting x into stride-8 columns through "
            "shared memory, and two fp32 instructions per code (magic-number FADD + FFMA) on top of a shift and a "
            "LOP3: an interleaved / fragment-ordered layout removes the split, and fp16x2 / bf16x2 dequantisation "
            "(one LOP3 + one HFMA2 per two codes) halves the rest. The CUDA M = 1 loop also loads each scale and zero "
            "with its own 2-byte load per word (32 LDG per 128 codes): pack scale and zero per group and load them "
            "once per group. At M = 16 an fp32-FMA kernel needs >= 16 FFMA per code (the CUDA kernel: "
            f"{base.get(('cuda', 16), {}).get('issue_slots_per_weight_element', float('nan')):.1f} slots per code), "
            "so M = 16 must run on tensor cores (mma.sync m16n8k16) with registers-only dequantisation (Triton's "
            "HMMA path stages the dequantised tile through shared memory: 96 STS + 16 BAR per step). Bytes in flight: "
            f"~{little_bytes_per_sm() / 1024:.0f} KB per SM wanted; today's base loops request {flight} per SM and "
            "iteration: v2's cp.async pipeline should keep >= that Little's-law figure outstanding per SM (e.g. 2 "
            "blocks x 3 stages x 3 KB of codes).")
    return notes


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "csrc"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return out.stdout.strip() + ("+local changes in kernels/ or csrc/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def build_report(cases: list[dict], quick: bool, seconds: float) -> dict:
    import triton

    nvcc_version = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return {
        "header": {
            "title": "Static performance report of the decode kernels for sm_90a",
            "kind": STATIC_LABEL,
            "statement": "STATIC ESTIMATE, NOT A MEASUREMENT: no GPU ran anything. Figures come from SASS compiled "
            "for sm_90a on a CPU machine and from the device model below; 'lower_bound_us' is a floor, not a timing.",
            "device_model": DEVICE,
            "issue_rate_slots_per_us": issue_rate_per_us(),
            "little_bytes_per_sm": little_bytes_per_sm(),
            "method": __doc__.split("What it does, per variant", 1)[1].strip(),
            "toolchain": {"triton": triton.__version__, "nvcc": nvcc_version[-1] if nvcc_version else None,
                          "disassembler": "nvdisasm bundled with Triton"},  # fmt: skip
            "git_sha": _git_sha(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "quick": quick,
            "seconds": round(seconds, 1),
        },
        "cases": cases,
        "issue_19_counts": issue_19_checks(cases),
        "notes": _notes(cases),
    }


def handoff_figures(case: dict) -> dict | None:
    """Launch-plan figures of a low-rank case (issue 19, part 4), read from the launch configurations a report
    records, so that they can be computed for an earlier report too: the shrink's split count S, the bytes of
    partial sums (or of z) all expand programs read from L2 after their wait, and the fraction of each program's
    rows of U it fetches before the wait. None for other ops."""
    if case["op"] != "lowrank_matmul":
        return None
    shrink, expand = case["kernels"]
    r, M = case["rank"], case["M"]
    if case["backend"] == "triton":
        grid = expand["launch"]["grid"]
        splits = shrink["launch"]["grid"][2]
        partials_read = expand["launch"].get("SPLIT_IN", 1)  # the expand sums SPLIT_IN partials as it loads them
        reads = grid[0] * M * r * 4 * partials_read
        before_wait = min(expand["launch"]["BLOCK_K"], r) / r  # the first K-step of U is loaded before gdc_wait
    else:
        splits = shrink["launch"]["splits"]
        partials_read = expand["launch"].get("partials_read", splits)  # reports before the handoff: all S
        reads = expand["launch"]["blocks"] * M * r * 4 * partials_read
        before_wait = min(cuda_constants()["kWarp"] * cuda_constants()["kVec"], r) / r  # first chunk of 256 columns
    return {"splits": splits, "expand_reads_after_wait_bytes": reads, "u_fetched_before_wait": before_wait}


def before_after(before: dict, cases: list[dict]) -> list[dict]:
    """Low-rank cases of an earlier report (`before`, its JSON) next to this run's, figure by figure."""
    old = {(c["backend"], c["M"], c["rank"]): c for c in before["cases"] if c["op"] == "lowrank_matmul"}
    rows = []
    for c in cases:
        if c["op"] != "lowrank_matmul" or (c["backend"], c["M"], c["rank"]) not in old:
            continue
        b = old[(c["backend"], c["M"], c["rank"])]
        rows.append({"backend": c["backend"], "M": c["M"], "rank": c["rank"],
                     **{f"{key}_{when}": value for when, case in (("before", b), ("after", c))
                        for key, value in {**handoff_figures(case),
                                           "slots_per_element": [k["issue_slots_per_weight_element"]
                                                                 for k in case["kernels"]],
                                           "registers": [k["registers"] for k in case["kernels"]],
                                           "spill_bytes": [k["spill_bytes_per_thread"] for k in case["kernels"]],
                                           "lower_bound_us": case["lower_bound_us"]}.items()}})  # fmt: skip
    return rows


def before_after_table(report: dict) -> str:
    rows = report.get("before_after")
    if not rows:
        return ""
    lines = [
        f"## Before / after the split-K handoff and the U prefetch (issue 19, part 4)\n\nBefore: git "
        f"{report['before_git_sha']}. S = shrink slices; \"partials read\" = bytes of split-K partials (before) or of "
        "z (after) that all expand programs read from L2 after their wait (after: plus S x M x r x 4 bytes that the "
        "shrink's last-arriving programs read once); \"U before wait\" = fraction of each "
        "expand program's U fetched before the wait. Static figures from the launch plans and the SASS, not timings; "
        "the lower bound does not model either change (it counts only hot loops and DRAM bytes).\n",
        "| backend | M | r | S | partials read KB | U before wait | slots / elem. | regs | lower bound us |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    def kernels(v):
        return " / ".join(_fmt(x) if isinstance(x, float) else str(x) for x in v)

    for row in rows:
        def pair(key, fmt, row=row):
            return f"{fmt(row[key + '_before'])} -> {fmt(row[key + '_after'])}"

        lines.append(
            f"| {row['backend']} | {row['M']} | {row['rank']} | {pair('splits', str)} | "
            f"{pair('expand_reads_after_wait_bytes', lambda v: f'{v / 1024:.0f}')} | "
            f"{pair('u_fetched_before_wait', lambda v: f'{v:.0%}')} | {pair('slots_per_element', kernels)} | "
            f"{pair('registers', kernels)} | {pair('lower_bound_us', lambda v: _fmt(v, 2))} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def _short(kernel: str) -> str:
    """lowrank_shrink_kernel<bf16, 1> -> lowrank_shrink; _lowrank_matmul_kernel (expand) -> lowrank_matmul (expand)."""
    name, _, role = kernel.partition(" (")
    name = name.split("<")[0].strip("_").removesuffix("_kernel")
    return f"{name} ({role}" if role else name


def summary_table(report: dict) -> str:
    lines = [
        "| op | backend | M | case | kernels (regs, blocks x warps per SM) | slots / elem. | weight KB / SM / iter. "
        "| byte floor us | issue floor us | lower bound us | target us |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        case = c["label"].split(" 4096x4096 ")[1]
        kernels = "; ".join(
            f"{_short(k['kernel'])} {k['registers']} r, {k['resident_blocks_per_sm']}x"
            f"{k['launch']['threads_per_block'] // 32}"
            for k in c["kernels"]
        )  # fmt: skip
        slots = " / ".join(_fmt(k["issue_slots_per_weight_element"]) for k in c["kernels"])
        flight = " / ".join(_fmt(k["weight_bytes_requested_per_sm_per_iteration"] / 1024) for k in c["kernels"])
        lines.append(
            f"| {c['op']} | {c['backend']} | {c['M']} | {case} | {kernels} | {slots} | {flight} | "
            f"{_fmt(c['byte_floor_us'], 2)} | {_fmt(c['issue_floor_us'], 2)} | **{_fmt(c['lower_bound_us'], 2)}** | "
            f"{_fmt(c['target_us'])} |"
        )
    return "\n".join(lines)


def kernel_table(report: dict) -> str:
    head = ["case", "kernel", "blocks", "regs", "smem B", "spill B", "occ. blocks/SM (limit)", "loop instr."]
    head += [c.replace("_", " ") for c in CLASSES] + ["elem./thread/iter.", "slots/elem.", "issue us"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in report["cases"]:
        for k in c["kernels"]:
            loop = k["hot_loop"]
            row = [f"{c['backend']} M={c['M']} {c['label'].split(' 4096x4096 ')[1]}", k["kernel"],
                   str(k["launch"]["blocks"]), str(k["registers"]), str(k["shared_memory_per_block"]),
                   str(k["spill_bytes_per_thread"]),
                   f"{k['occupancy']['blocks_per_sm']} ({k['occupancy']['limited_by']})",
                   str(loop["instructions"]) + (" (no loop)" if loop["whole_function"] else "")]  # fmt: skip
            row += [str(loop["classes"][cls]) for cls in CLASSES]
            row += [f"{k['weight_elements_per_thread_iteration']:g}", _fmt(k["issue_slots_per_weight_element"]),
                    _fmt(k["issue_us"], 2)]  # fmt: skip
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    h = report["header"]
    checks = "\n".join(f"- {c['claim']}: **{c['verdict']}**. This run: {c['found']}." for c in
                       report["issue_19_counts"])
    return f"""# Decode kernels on sm_90a: {STATIC_LABEL}

**{h['statement']}**

Device model (H100 SXM): {DEVICE['sms']} SMs x {DEVICE['schedulers_per_sm']} schedulers x {DEVICE['clock_ghz']} GHz
= {h['issue_rate_slots_per_us']:.0f} issue slots per us; DRAM 3.0 TB/s (measured copy, docs/FACTS.md); one launch
~1 us (in a CUDA graph, docs/FACTS.md). Triton {h['toolchain']['triton']}, {h['toolchain']['nvcc']}; git
{h['git_sha']}; {h['date']}. bf16 activations, 4096 x 4096, launch plans as on a 132-SM H100.

lower bound = max(byte floor, issue floor) + 1 launch. "slots / elem." = issue slots per weight element (per code
for int4) in each kernel's hot loop, kernels in launch order; "weight KB / SM / iter." = weight bytes one loop
iteration requests per SM (Little's law wants ~{h['little_bytes_per_sm'] / 1024:.0f} KB in flight per SM at an
assumed 0.8 us latency). Blocks x warps per SM: resident in this launch.

{summary_table(report)}

## Per kernel: resources and the hot loop's instructions by class

{kernel_table(report)}

{before_after_table(report)}
## Issue 19's earlier counts

{checks}

## Notes

""" + "\n".join(f"- {n}" for n in report["notes"]) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one case (Triton int4, M = 1), for the test")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output directory")
    parser.add_argument("--before", type=Path, help="an earlier report's JSON: adds a before / after section for the "
                        "low-rank cases")  # fmt: skip
    args = parser.parse_args(argv)

    os.environ.pop("TRITON_INTERPRET", None)  # before any kernel module is imported: they must be compilable
    sys.path.insert(0, str(REPO))
    check = _load_check_script()
    if (reason := toolchain_unavailable_reason(check)) is not None:
        print(f"kernel_report: skipped: {reason}")
        return EXIT_SKIPPED

    start = time.perf_counter()
    cases = []
    for case in [c for c in VARIANTS if c.quick or not args.quick]:
        launches = triton_launches(check, case) if case.backend == "triton" else cuda_launches(case)
        cases.append(analyse_case(case, launches))
        c = cases[-1]
        print(f"{case.label:58} byte {c['byte_floor_us']:5.2f} us  issue {c['issue_floor_us']:5.2f} us  "
              f"lower bound {c['lower_bound_us']:5.2f} us  target {_fmt(c['target_us'])} us", flush=True)  # fmt: skip
    report = build_report(cases, args.quick, time.perf_counter() - start)
    for c in cases:
        if (figures := handoff_figures(c)) is not None:
            c["handoff"] = figures
    if args.before is not None:
        before = json.loads(args.before.read_text())
        report["before_git_sha"] = before["header"]["git_sha"]
        report["before_after"] = before_after(before, cases)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "kernel_report-sm90a-static" + ("-quick" if args.quick else "")
    _write_atomic(args.out / f"{stem}.json", json.dumps(report, indent=1) + "\n")
    _write_atomic(args.out / f"{stem}.md", markdown(report))
    print(f"kernel_report: {STATIC_LABEL}; wrote {args.out / stem}.json and .md "
          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
