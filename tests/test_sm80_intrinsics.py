"""csrc/sm80_intrinsics.cuh (mma.sync m16n8k16, ldmatrix.x4 [.trans], cp.async, lop3, prmt) and csrc/int4_dequant.cuh
(8 int4 codes -> 4 fp16x2 / bf16x2), the groundwork of issue 19's int4 kernel v2 (docs/INT4_V2.md).

One source, tests/cuda_emu/sm80_kernels.cu, compiles for sm_90a with nvcc (compile-only: no GPU here) and runs on the
CPU under the emulator (tests/cuda_emu), whose results are checked against references written here from the PTX ISA
text: float64 matrix products for mma, exact integers where the values allow, the ISA's element tables for ldmatrix,
the truth-table and byte-select definitions for lop3 and prmt, and every code pair for the dequantisation. Seeded
bugs (a wrong fragment mapping in a kernel or in the emulator, a read of a cp.async destination before its wait)
must fail. About 25 s on 2 CPU cores (three ~6 s emulator builds, one ~2 s nvcc compile)."""

import ctypes
import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from cuda_emu import build as emu_build

REPO = Path(__file__).resolve().parents[1]
SOURCE = emu_build.SM80_KERNEL_SOURCES[0]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Sm80:
    """ctypes face of the extern "C" entry points of tests/cuda_emu/sm80_kernels.cu built against the emulator."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.sm80_dequant_sass.argtypes = [ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p]

    @staticmethod
    def _p(t):
        return ctypes.c_void_p(t.data_ptr())

    def _check(self, status, what):
        assert status == 0, f"{what}: launch failed with cudaError_t {status}"

    def mma(self, kind, dtype, a, b, c):
        """kind 0: d (16 x 8) from fragments gathered by the ISA formulas; 1: d (16 x 16) via cp.async + ldmatrix."""
        d = torch.full(c.shape, float("nan"), dtype=torch.float32)
        bits = [t.contiguous().view(torch.int16) for t in (a, b)]
        status = self.lib.sm80_mma(kind, int(dtype == torch.bfloat16), *map(self._p, (*bits, c.contiguous(), d)))
        self._check(status, "mma")
        return d

    def ldmatrix(self, trans, rows, order):
        out = torch.zeros(32 * 4, dtype=torch.int32)
        self._check(self.lib.sm80_ldmatrix(int(trans), self._p(rows), self._p(order), self._p(out)), "ldmatrix")
        return out.view(32, 4)

    def cp_async_ring(self, x, threads):
        width = 4 * threads
        out = torch.full((-(-x.numel() // width) * width,), float("nan"))
        self._check(self.lib.sm80_cp_async_ring(self._p(x), x.numel(), threads, self._p(out)), "cp.async ring")
        return out

    def lop3(self, a, b, c):
        out = torch.zeros(256, a.numel(), dtype=torch.int32)
        self._check(self.lib.sm80_lop3(*map(self._p, (a, b, c)), a.numel(), self._p(out)), "lop3")
        return out

    def prmt(self, a, b, selector):
        out = torch.zeros_like(a)
        self._check(self.lib.sm80_prmt(*map(self._p, (a, b, selector)), a.numel(), self._p(out)), "prmt")
        return out

    def dequant(self, dtype, q):
        out = torch.zeros(q.numel() * 4, dtype=torch.int32)
        self._check(self.lib.sm80_dequant(int(dtype == torch.bfloat16), self._p(q), q.numel(), self._p(out)), "dequant")
        return out.view(torch.int16).view(dtype).view(-1, 4, 2)  # [word, pair j, half]


def _build(tmp_path_factory, name, mutations=()):
    if emu_build.compiler() is None:
        pytest.skip("no C++ compiler (g++ / c++) on PATH: cannot build the CUDA emulator")
    path = emu_build.build(tmp_path_factory.mktemp(name), mutations, emu_build.SM80_KERNEL_SOURCES,
                           emu_build.SM80_RUNTIME_SOURCES)  # fmt: skip
    return Sm80(path)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return _build(tmp_path_factory, "sm80_emu")


# ------------------------------------------------------------------------------------------------ references


def _u32(values):
    """uint32 values (Python ints) as an int32 tensor with the same bits."""
    return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32)


def _bits(t):
    return [v & 0xFFFFFFFF for v in t.tolist()]


def lop3_reference(a, b, c, lut):
    """PTX ISA: LUT = F(0xF0, 0xCC, 0xAA), so bit i of LUT is F at a = bit 2 of i, b = bit 1, c = bit 0."""
    out = 0
    for bit in range(32):
        i = ((a >> bit) & 1) << 2 | ((b >> bit) & 1) << 1 | ((c >> bit) & 1)
        out |= ((lut >> i) & 1) << bit
    return out


def prmt_reference(a, b, selector):
    """PTX ISA prmt.b32 default mode: bytes 0-3 of a, 4-7 of b; nibble i of the selector picks result byte i, its bit
    3 asking for the picked byte's sign bit replicated over the byte."""
    source = (a | b << 32).to_bytes(8, "little")
    out = 0
    for i in range(4):
        s = (selector >> 4 * i) & 0xF
        byte = source[s & 7]
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


def ldmatrix_reference(rows, order, trans):
    """PTX ISA ldmatrix .x4: lanes 8i .. 8i+7 address rows 0..7 of matrix i; lane l's register i holds the elements
    (row l // 4, columns 2 (l % 4) + h) of matrix i, or with .trans (rows 2 (l % 4) + h, column l // 4); h = 0 in the
    low 16 bits."""
    out = torch.zeros(32, 4, dtype=torch.int64)
    for lane in range(32):
        for i in range(4):
            word = 0
            for h in range(2):
                if trans:
                    row, col = 8 * i + 2 * (lane % 4) + h, lane // 4
                else:
                    row, col = 8 * i + lane // 4, 2 * (lane % 4) + h
                word |= (rows[order[row]][col] & 0xFFFF) << 16 * h
            out[lane, i] = word
    return out


def _distinct_integers(shape, low, generator):
    """Distinct integers low, low + 1, ... in a random order: exact in fp16 / bf16 up to |256|."""
    count = torch.Size(shape).numel()
    return (torch.randperm(count, generator=generator) + low).float().view(shape)


def _awkward(shape, generator):
    """Normal values scaled by powers of two from 2^-6 to 2^6: no two products of one sum alike in magnitude."""
    return torch.randn(shape, generator=generator) * 2.0 ** torch.randint(-6, 7, shape, generator=generator)


def _mma_shapes(kind):
    return ((16, 16), (16, 8), (16, 8)) if kind == 0 else ((16, 16), (16, 16), (16, 16))


# --------------------------------------------------------------------------------------------------- mma.sync


@pytest.mark.parametrize("kind", [0, 1], ids=["gathered", "cp.async+ldmatrix"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_mma_exact_on_distinct_integers(emu, dtype, kind):
    """Every element of A, B and C distinct (integers up to |128|: exact in fp16 and bf16, every sum exact in fp32),
    so a fragment element in a wrong place changes some d exactly."""
    g = torch.Generator().manual_seed(19 + kind)
    sa, sb, sc = _mma_shapes(kind)
    a = _distinct_integers(sa, -128, g).to(dtype)
    b = _distinct_integers(sb, -sb[0] * sb[1] // 2, g).to(dtype)
    c = _distinct_integers(sc, -100, g) * 3
    d = emu.mma(kind, dtype, a, b, c)
    assert torch.equal(d.double(), a.double() @ b.double() + c.double())


@pytest.mark.parametrize("kind", [0, 1], ids=["gathered", "cp.async+ldmatrix"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_mma_matches_float64_on_awkward_values(emu, dtype, kind):
    """Products of fp16 / bf16 are exact; the fp32 result is within the fp32 accumulation bound of 17 terms."""
    g = torch.Generator().manual_seed(7 + kind)
    sa, sb, sc = _mma_shapes(kind)
    a, b = _awkward(sa, g).to(dtype), _awkward(sb, g).to(dtype)
    c = _awkward(sc, g)
    d = emu.mma(kind, dtype, a, b, c)
    ref = a.double() @ b.double() + c.double()
    bound = 17 * 2.0**-24 * (a.double().abs() @ b.double().abs() + c.double().abs())
    assert ((d.double() - ref).abs() <= bound).all(), (d.double() - ref).abs().max()


# --------------------------------------------------------------------------------------------------- ldmatrix


@pytest.mark.parametrize("trans", [False, True], ids=["x4", "x4.trans"])
def test_ldmatrix_matches_the_isa_tables(emu, trans):
    """32 rows of 8 distinct b16 values; lane l addresses row order[l] (a permutation), so every register of every
    lane names one source element."""
    g = torch.Generator().manual_seed(3)
    rows = (torch.randperm(256, generator=g) * 97 + 5).to(torch.int16).view(32, 8)
    order = torch.randperm(32, generator=g).to(torch.int32)
    out = emu.ldmatrix(trans, rows.contiguous(), order)
    expected = ldmatrix_reference(rows.tolist(), order.tolist(), trans)
    assert torch.equal(out.long() & 0xFFFFFFFF, expected)


# --------------------------------------------------------------------------------------------------- cp.async


@pytest.mark.parametrize(("n", "threads"), [(997, 64), (1024, 32), (3, 32)])
def test_cp_async_ring_copies_and_zero_fills(emu, n, threads):
    """A two-stage ring (chunk c + 1 in flight while chunk c is read): every value arrives, the tail past n of the
    last chunk is zero-filled (src_bytes < 16), none is poison."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    out = emu.cp_async_ring(x, threads)
    assert torch.equal(out[:n], x) and torch.equal(out[n:], torch.zeros(out.numel() - n))


# ---------------------------------------------------------------------------------------------- lop3 and prmt


def test_lop3_every_truth_table(emu):
    g = torch.Generator().manual_seed(5)
    words = [0, 0xFFFFFFFF, 0xF0F0F0F0, 0x0F0F0F0F, 0xCCCCCCCC, 0xAAAAAAAA, 0x80000001]
    words += torch.randint(0, 2**32, (25,), generator=g, dtype=torch.int64).tolist()
    a = words
    b = words[3:] + words[:3]
    c = words[7:] + words[:7]
    out = emu.lop3(*map(_u32, (a, b, c)))
    for lut in range(256):
        assert _bits(out[lut]) == [lop3_reference(x, y, z, lut) for x, y, z in zip(a, b, c)], hex(lut)
    named = {0xF0: lambda x, y, z: x, 0xCC: lambda x, y, z: y, 0xAA: lambda x, y, z: z,
             0xEA: lambda x, y, z: (x & y) | z, 0x96: lambda x, y, z: x ^ y ^ z}  # fmt: skip
    for lut, f in named.items():
        assert _bits(out[lut]) == [f(x, y, z) & 0xFFFFFFFF for x, y, z in zip(a, b, c)], hex(lut)


def test_prmt_every_byte_select_and_sign_replication(emu):
    """Selectors cover each of the 16 nibble values in every result byte; bits 16-31 of the selector are ignored."""
    g = torch.Generator().manual_seed(11)
    a = torch.randint(0, 2**32, (64,), generator=g, dtype=torch.int64).tolist()
    b = torch.randint(0, 2**32, (64,), generator=g, dtype=torch.int64).tolist()
    a[:2], b[:2] = [0x7F80FF01, 0x00000000], [0x80FF7F00, 0xFFFFFFFF]  # every sign-bit case
    selectors = [s | (s + 5) % 16 << 4 | (s + 10) % 16 << 8 | (s + 15) % 16 << 12 for s in range(16)]
    selectors += torch.randint(0, 2**16, (48,), generator=g).tolist()
    selectors = [s | 0xDEAD << 16 for s in selectors]
    out = emu.prmt(*map(_u32, (a, b, selectors)))
    assert _bits(out) == [prmt_reference(x, y, s) for x, y, s in zip(a, b, selectors)]


# ------------------------------------------------------------------------------------------- int4 dequantisation


def _dequant_words(generator):
    """For each pair j (nibbles j and j + 4) and each of its 256 code pairs, a word holding that pair at j and random
    codes elsewhere; then 256 random words."""
    words = []
    for j in range(4):
        for v in range(256):
            w = torch.randint(0, 2**32, (1,), generator=generator, dtype=torch.int64).item()
            w &= ~((0xF << 4 * j) | (0xF << 4 * (j + 4))) & 0xFFFFFFFF
            words.append(w | (v & 15) << 4 * j | (v >> 4) << 4 * (j + 4))
    return words + torch.randint(0, 2**32, (256,), generator=generator, dtype=torch.int64).tolist()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_dequant8_every_code_pair_is_exact(emu, dtype):
    words = _dequant_words(torch.Generator().manual_seed(8))
    out = emu.dequant(dtype, _u32(words))
    codes = torch.tensor([[[(w >> 4 * j) & 15, (w >> 4 * (j + 4)) & 15] for j in range(4)] for w in words])
    assert torch.equal(out.float(), codes.float())
    for j in range(4):  # each pair position saw all 256 code pairs
        assert len({(int(lo), int(hi)) for lo, hi in codes[:1024, j]}) == 256


# ------------------------------------------------------------------------------------------------ seeded bugs

KERNEL_BUGS = (
    # registers 1 and 2 of the gathered A fragment swapped: rows g + 8 and columns + 8 confused
    ("sm80_kernels.cu", "const int row = g + 8 * (r % 2), col = 2 * t + 8 * (r / 2);",
     "const int row = g + 8 * (r / 2), col = 2 * t + 8 * (r % 2);"),
    # the ring waits for all but the newest two groups: chunk c is read while still in flight
    ("sm80_kernels.cu", "cp_async_wait<1>();", "cp_async_wait<2>();"),
    # the tiles are read by ldmatrix with no wait for their cp.async at all
    ("sm80_kernels.cu", "  cp_async_wait<0>();\n  __syncthreads();\n  uint32_t fa[4], fb[4];",
     "  __syncthreads();\n  uint32_t fa[4], fb[4];"),
)  # fmt: skip

EMULATOR_BUGS = (
    # the emulator's A layout with registers 1 and 2 swapped (what a misread of the ISA table would give)
    ("emu.cpp", "int a_row(int lane, int i) { return lane / 4 + 8 * ((i / 2) % 2); }",
     "int a_row(int lane, int i) { return lane / 4 + 8 * (i / 4); }"),
    ("emu.cpp", "int a_col(int lane, int i) { return 2 * (lane % 4) + i % 2 + 8 * (i / 4); }",
     "int a_col(int lane, int i) { return 2 * (lane % 4) + i % 2 + 8 * ((i / 2) % 2); }"),
    # ldmatrix.trans handing out the two halves of a register in the wrong order
    ("emu.cpp", "rows[8 * i + 2 * (lane % 4) + h][lane / 4]", "rows[8 * i + 2 * (lane % 4) + 1 - h][lane / 4]"),
)  # fmt: skip


def test_seeded_kernel_bugs_are_caught(tmp_path_factory):
    mutant = _build(tmp_path_factory, "sm80_kernel_bugs", KERNEL_BUGS)
    g = torch.Generator().manual_seed(1)
    a, b = _distinct_integers((16, 16), -128, g).half(), _distinct_integers((16, 8), -64, g).half()
    assert not torch.equal(mutant.mma(0, torch.float16, a, b, torch.zeros(16, 8)).double(), a.double() @ b.double())
    assert mutant.cp_async_ring(torch.randn(997), 64).isnan().any(), "a chunk read before its group landed"
    b16 = _distinct_integers((16, 16), -128, g).half()
    assert mutant.mma(1, torch.float16, a, b16, torch.zeros(16, 16)).isnan().all(), "tiles read before the wait"


def test_seeded_emulator_layout_bugs_are_caught(tmp_path_factory):
    """The references above are independent of the emulator: an emulator with a wrong layout fails them."""
    mutant = _build(tmp_path_factory, "sm80_emulator_bugs", EMULATOR_BUGS)
    g = torch.Generator().manual_seed(2)
    a, b = _distinct_integers((16, 16), -128, g).bfloat16(), _distinct_integers((16, 8), -64, g).bfloat16()
    assert not torch.equal(mutant.mma(0, torch.bfloat16, a, b, torch.zeros(16, 8)).double(), a.double() @ b.double())
    rows = (torch.randperm(256, generator=g) * 97 + 5).to(torch.int16).view(32, 8)
    order = torch.arange(32, dtype=torch.int32)
    assert not torch.equal(mutant.ldmatrix(True, rows, order).long() & 0xFFFFFFFF,
                           ldmatrix_reference(rows.tolist(), order.tolist(), True))  # fmt: skip


# ------------------------------------------------------------------------------ nvcc sm_90a: compile and SASS


def _kernel_report():
    spec = importlib.util.spec_from_file_location("kernel_report", REPO / "scripts" / "kernel_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sm90a_sass(tmp_path_factory):
    """{kernel function: [Instr]} of sm80_kernels.cu compiled for sm_90a (nvcc -Werror all-warnings)."""
    report = _kernel_report()
    if (reason := report.toolchain_unavailable_reason(report._load_check_script())) is not None:
        pytest.skip(reason)
    cubin = tmp_path_factory.mktemp("sm80_sass") / "sm80_kernels.cubin"
    cmd = [report._nvcc(), "-std=c++17", "-O3", "-arch=sm_90a", "-cubin", "-Werror", "all-warnings",
           f"-I{REPO / 'csrc'}", str(SOURCE), "-o", str(cubin)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {name: instrs for name, (instrs, _) in report.disassemble(cubin.read_bytes()).items()}


def test_test_kernels_compile_for_sm90a_with_the_real_instructions(sm90a_sass):
    """The wrappers' PTX is real: HMMA.16816 (fp16 and bf16), LDSM (.T), LDGSTS + LDGDEPBAR / DEPBAR, LOP3, PRMT."""

    def opcodes(fragment):
        return {i.opcode for name, instrs in sm90a_sass.items() if fragment in name for i in instrs}

    for kernel in ("mma_direct_kernelI6__half", "mma_direct_kernelI13__nv_bfloat16"):
        assert {op for op in opcodes(kernel) if op.startswith("HMMA.16816.F32")}, kernel
    assert any(op.startswith("HMMA.16816.F32.BF16") for op in opcodes("mma_direct_kernelI13__nv_bfloat16"))
    assert "LDSM.16.M88.4" in opcodes("ldmatrix_kernelILb0") and "LDSM.16.MT88.4" in opcodes("ldmatrix_kernelILb1")
    ring = opcodes("cp_async_ring_kernel")
    assert any(op.startswith("LDGSTS") for op in ring) and "LDGDEPBAR" in ring and any("DEPBAR" in op for op in ring)
    assert "PRMT" in opcodes("prmt_kernel") and "LOP3.LUT" in opcodes("lop3_kernel")


# Issue slots of dequant8 per 8 codes in SASS, sm_90a, nvcc 13.0 (docs/INT4_V2.md), without the loop-invariant
# constants a K loop hoists (IMAD.MOV / HFMA2.MMA of a magic number) and the kernel's parameter loads and store.
DEQUANT_SASS = {
    "__half": {"SHF": 1, "LOP3": 4, "HADD2": 2, "HFMA2": 2},  # 9 slots: 1.125 per code
    "__nv_bfloat16": {"SHF": 3, "LOP3": 4, "HADD2": 4},  # 11 slots: 1.375 per code
}
FRAME = {"LDC", "ULDC", "STG", "EXIT", "BRA", "NOP"}


@pytest.mark.parametrize("dtype", DEQUANT_SASS)
def test_dequant8_sass_count(sm90a_sass, dtype):
    (instrs,) = [v for k, v in sm90a_sass.items() if "dequant_sass_kernel" in k and f"I{len(dtype)}{dtype}" in k]
    constants = [i for i in instrs if i.opcode in ("IMAD.MOV.U32", "MOV", "HFMA2.MMA") and "RZ" in i.text]
    counted = Counter(i.base for i in instrs if i.base not in FRAME and i not in constants)
    assert dict(counted) == DEQUANT_SASS[dtype], f"{dtype}: {dict(counted)}; update DEQUANT_SASS and docs/INT4_V2.md"
