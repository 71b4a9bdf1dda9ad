"""csrc/'s CUDA decode kernels run on the CPU under tests/cuda_emu (threads of a block as fibers that meet at
every __syncthreads and warp shuffle): parity with float64 on awkward shapes, memory safety, bytes streamed, the
split-K plan, launch structure and argument errors -- everything but timing and true concurrency, on any machine
with g++. tests/test_cuda_kernels.py runs the same kernels on a real GPU.

Memory: every __ldg / __ldcs (all weight and x loads) must fall inside the buffers of the call (else the launch
fails) and is counted, so "each weight byte is streamed once" is asserted, not assumed. Plain loads (scales,
zeros, bias, the workspace) are covered by guards instead: every input lives between NaN (or random-code) guard
regions, the workspace and shared memory start as NaN, and the output starts as NaN between NaN guards, so a read
past a tensor, a read of unwritten workspace or shared memory, or a missing write shows up as a non-finite or wrong
output, and a write past y as a changed guard.
"""

import contextlib
import ctypes
import dataclasses

import pytest
import torch
from cuda_emu import build as emu_build
from helpers import assert_close_to_reference

from lowrank_ops.ops.reference import lowrank_matmul_ref, quant_lowrank_matmul_ref
from lowrank_ops.quant_format import PackedQuantWeight, num_groups, pack, to_layout_v2

H100 = {"sm_count": 132, "smem_optin": 232448, "cc_major": 9}  # cudaDevAttrMaxSharedMemoryPerBlockOptin: 227 KB
A100 = {"sm_count": 108, "smem_optin": 166912, "cc_major": 8}  # no PDL: the sm_80 image, plain stream order
GUARD = 64  # elements on each side of every tensor: 128+ bytes keeps the 16-byte alignment of the views
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}
ERR_LEN = 512


class KernelError(RuntimeError):
    """A decode entry point returned a status other than LOWRANK_OPS_OK (its message is the text)."""


def _ptr(t):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


class Emulator:
    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.emu_half_to_float.restype = ctypes.c_float
        self.lib.emu_bfloat16_to_float.restype = ctypes.c_float
        self.lib.emu_float_to_half.restype = ctypes.c_ushort
        self.lib.emu_bfloat16_to_float.argtypes = self.lib.emu_half_to_float.argtypes = [ctypes.c_ushort]
        self.lib.emu_float_to_half.argtypes = self.lib.emu_float_to_bfloat16.argtypes = [ctypes.c_float]
        self.lib.emu_float_to_bfloat16.restype = ctypes.c_ushort
        self.lib.emu_loaded_bytes.restype = ctypes.c_longlong
        self._configure(**H100)

    def _configure(self, sm_count, smem_optin, cc_major):
        self.lib.emu_configure(sm_count, ctypes.c_longlong(smem_optin), cc_major)

    @contextlib.contextmanager
    def device(self, **changes):
        """Inside, the emulated GPU is the H100 with `changes` (sm_count, smem_optin, cc_major)."""
        self._configure(**{**H100, **changes})
        try:
            yield
        finally:
            self._configure(**H100)

    def launches(self):
        out = (ctypes.c_longlong * 4)()
        records = []
        for i in range(self.lib.emu_launch_count()):
            self.lib.emu_launch_record(i, out)
            records.append({"grid": out[0], "block": out[1], "smem": out[2], "pdl": bool(out[3])})
        return records

    def loaded(self, name):
        """Bytes the last decode call loaded from buffer `name` through __ldg / __ldcs."""
        return self.lib.emu_loaded_bytes(name.encode())

    def shrink_plan(self, rows, n, rank, sm_count):
        out = (ctypes.c_longlong * 4)()
        self.lib.emu_shrink_plan(rows, n, rank, sm_count, out)
        return dict(zip(("splits", "chunks_per_slice", "blocks", "workspace_bytes"), out))

    def counters_set(self):
        """Split-K arrival counters left non-zero by the decode calls so far (each call must leave all at zero)."""
        return self.lib.emu_counters_set()

    def _call(self, fn, *args):
        err = ctypes.create_string_buffer(ERR_LEN)
        self.lib.emu_reset_launches()
        status = fn(*args, err, ctypes.c_size_t(ERR_LEN))
        if status != 0:
            raise KernelError(err.value.decode())

    def lowrank(self, x, v, u, b, x_row_stride=None):
        rows, n = x.shape
        m, r = u.shape
        y, storage = _guarded_output(rows, m, x.dtype)
        stride = x.stride(0) if x_row_stride is None else x_row_stride
        self._call(self.lib.emu_lowrank_decode, DTYPE_CODES[x.dtype], rows, n, m, r, _ptr(x), ctypes.c_longlong(stride),
                   _ptr(v), _ptr(u), _ptr(b), _ptr(y))  # fmt: skip
        _assert_guards_intact(storage)
        return y

    def quant(self, x, qweight, scales, zeros, v, u, b, bits, group_size):
        assert bits <= 4
        rows, n = x.shape
        m = qweight.shape[0]
        r = 0 if u is None else u.shape[1]
        y, storage = _guarded_output(rows, m, x.dtype)
        self._call(self.lib.emu_quant_lowrank_decode, DTYPE_CODES[x.dtype], rows, n, m, group_size, r, _ptr(x),
                   ctypes.c_longlong(x.stride(0)), _ptr(qweight), _ptr(scales), _ptr(zeros), _ptr(v), _ptr(u), _ptr(b),
                   _ptr(y))  # fmt: skip
        _assert_guards_intact(storage)
        return y

    def quant_v2(self, x, packed_v2, v, u, b):
        """The int4 kernel v2 on a layout-v2 packed weight (quant_format.to_layout_v2)."""
        rows, n = x.shape
        m = packed_v2.shape[0]
        r = 0 if u is None else u.shape[1]
        y, storage = _guarded_output(rows, m, x.dtype)
        tensors = [_guarded(t) for t in (packed_v2.qweight, packed_v2.scales, packed_v2.zeros)]
        self._call(self.lib.emu_quant_lowrank_decode_v2, DTYPE_CODES[x.dtype], rows, n, m, packed_v2.group_size, r,
                   _ptr(x), ctypes.c_longlong(x.stride(0)), *map(_ptr, tensors), _ptr(v), _ptr(u), _ptr(b),
                   _ptr(y))  # fmt: skip
        _assert_guards_intact(storage)
        return y


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if emu_build.compiler() is None:
        pytest.skip("no C++ compiler (g++ / c++) on PATH: cannot build the CUDA emulator")
    return Emulator(emu_build.build(tmp_path_factory.mktemp("cuda_emu")))


def _guarded(t):
    """A copy of t (contiguous) inside a buffer with GUARD elements on each side holding NaN (floats) or random
    values (integers): the kernels get a pointer into the middle."""
    flat = t.contiguous().reshape(-1)
    if t.is_floating_point():
        storage = torch.full((flat.numel() + 2 * GUARD,), float("nan"), dtype=t.dtype)
    else:
        storage = torch.randint(-(2**31), 2**31 - 1, (flat.numel() + 2 * GUARD,), dtype=torch.int64).to(t.dtype)
    storage[GUARD : GUARD + flat.numel()] = flat
    return storage[GUARD : GUARD + flat.numel()].view(t.shape)


def _guarded_output(rows, m, dtype):
    storage = torch.full((rows * m + 2 * GUARD,), float("nan"), dtype=dtype)
    return storage[GUARD : GUARD + rows * m].view(rows, m), storage


def _assert_guards_intact(storage):
    assert storage[:GUARD].isnan().all() and storage[-GUARD:].isnan().all(), "a kernel wrote outside y"


# --------------------------------------------------------------------------------------------- the emulator itself


def test_emulator_conversions_match_torch(emu):
    bits = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16)
    halves, bfloats = bits.view(torch.float16).float(), bits.view(torch.bfloat16).float()
    lib = emu.lib
    for i in range(0, 2**16, 7):  # every 7th bit pattern of both formats, subnormals, infinities and NaNs included
        for value, to_float in ((halves[i].item(), lib.emu_half_to_float),
                                (bfloats[i].item(), lib.emu_bfloat16_to_float)):  # fmt: skip
            got = to_float(i)
            assert got == value or (got != got and value != value), (i, got, value)
    special = torch.tensor([65504.0, 65519.99, 65520.0, 1e-8, -6e-8, 2.0**-24 * 1.5, 0.0, -0.0])
    floats = torch.cat([torch.randn(3000) * 10.0 ** torch.randint(-9, 6, (3000,)), special])
    for f in floats.tolist():
        assert lib.emu_float_to_half(f) == torch.tensor(f).half().view(torch.int16).item() & 0xFFFF, f
        assert lib.emu_float_to_bfloat16(f) == torch.tensor(f).bfloat16().view(torch.int16).item() & 0xFFFF, f


def _selftest(emu, which, blocks=2, threads=64):
    out = torch.full((blocks * threads,), float("nan"))
    status = emu.lib.emu_selftest(which, blocks, threads, ctypes.c_void_p(out.data_ptr()))
    return status, out


def test_emulator_runs_warp_shuffles_and_barriers(emu):
    status, out = _selftest(emu, 0)
    assert status == 0 and (out == 496.0).all()  # sum of lanes 0..31 on every lane of every warp
    status, out = _selftest(emu, 1, blocks=1, threads=96)
    assert status == 0 and torch.equal(out, (torch.arange(96.0) + 1) % 96)


def test_emulator_exposes_the_faults_it_claims_to(emu):
    status, out = _selftest(emu, 2, blocks=1, threads=96)  # no __syncthreads between write and read
    assert status == 0 and out[:-1].isnan().any(), "a read of shared memory not yet written must see the NaN poison"
    assert _selftest(emu, 3)[0] != 0  # a barrier only half the block reaches
    assert _selftest(emu, 4)[0] != 0  # a full-mask shuffle after a lane exited
    assert _selftest(emu, 5)[0] != 0  # a load one element past the buffer


def test_emulator_publishes_block_writes_only_through_fence_then_atomic(emu):
    """Visibility between blocks (emu.h): each block writes a cell, then arrives at a counter (atomicAdd by lane 0,
    the ticket broadcast with __shfl_sync, __syncwarp); the last block sums the cells. With __threadfence() before
    the arrival it sees every cell; without, the other blocks' cells stay hidden (NaN) until the launch ends. Either
    way the last block leaves the counter at zero."""
    blocks = 5
    status, out = _selftest(emu, 6, blocks=blocks, threads=32)
    assert status == 0 and out[blocks] == blocks * (blocks + 1) / 2 and out[blocks + 1] == 0
    assert torch.equal(out[:blocks], torch.arange(1.0, blocks + 1)), "every write is visible once the launch ends"
    status, out = _selftest(emu, 7, blocks=blocks, threads=32)
    assert status == 0 and out[blocks].isnan() and out[blocks + 1] == 0
    assert torch.equal(out[:blocks], torch.arange(1.0, blocks + 1))


# ------------------------------------------------------------------------------------------------- low-rank decode

DTYPES = [torch.float16, torch.bfloat16]
# n = 4095 (no 16-byte path for x and V), 4096, 576 (SmolLM2); odd m = 1537; r = 1 and 200 are not multiples of 8.
LOWRANK_CASES = [(4095, 1537, 200), (4096, 1537, 24), (576, 192, 1), (576, 192, 256), (4096, 300, 256)]
# Rows of x: one per M tile the kernels instantiate (1, 2, 4, 8, 16), the odd ones leaving a partial tile.
ROWS = [1, 2, 3, 7, 16]


def _dtype_for(*case) -> torch.dtype:
    """fp16 or bf16, alternating over the grid: both dtypes meet every shape and tile without doubling the runtime."""
    return DTYPES[sum(case) % 2]


def _lowrank_inputs(rows, n, m, r, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g).to(dtype)
    v = (torch.randn(r, n, generator=g) / n**0.5).to(dtype)
    u = (torch.randn(m, r, generator=g) / r**0.5).to(dtype)
    b = torch.randn(m, generator=g).to(dtype) if bias else None
    return x, v, u, b


def _check_lowrank(y, x, v, u, b):
    ref64 = lowrank_matmul_ref(*(None if t is None else t.double() for t in (x, v, u, b)))
    assert y.shape == ref64.shape and torch.isfinite(y).all()
    assert_close_to_reference(y, lowrank_matmul_ref(x, v, u, b), ref64)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("n", "m", "r"), LOWRANK_CASES, ids=str)
def test_lowrank_decode_matches_float64(emu, n, m, r, rows):
    dtype = _dtype_for(n, m, r, rows)
    x, v, u, b = _lowrank_inputs(rows, n, m, r, dtype, bias=(r + rows) % 2 == 0, seed=n + m + r + rows)
    y = emu.lowrank(*(None if t is None else _guarded(t) for t in (x, v, u, b)))
    _check_lowrank(y, x, v, u, b)
    shrink, expand = emu.launches()
    assert not shrink["pdl"] and expand["pdl"], "the shrink is a plain launch, the expand PDL-chained behind it"
    assert expand["smem"] == 4 * rows * r
    _assert_weights_streamed_once(emu, v=v, u=u)
    assert emu.counters_set() == 0, "the split-K handoff must leave every arrival counter at zero"


def _assert_weights_streamed_once(emu, **weights):
    """The decode kernels are byte streams: every weight byte is loaded exactly once (x is re-read from cache)."""
    for name, t in weights.items():
        assert emu.loaded(name) == t.numel() * t.element_size(), f"{name}: loaded {emu.loaded(name)} bytes"


@pytest.mark.parametrize("sm_count", [1, 8])
def test_lowrank_decode_on_small_devices(emu, sm_count):
    """Few SMs: one split or a handful; grids that loop over row tiles (expand blocks capped at 2 per SM)."""
    with emu.device(sm_count=sm_count):
        x, v, u, b = _lowrank_inputs(5, 2000, 1100, 40, torch.bfloat16, bias=True, seed=sm_count)
        _check_lowrank(emu.lowrank(*map(_guarded, (x, v, u, b))), x, v, u, b)
        assert emu.launches()[1]["grid"] == 2 * sm_count


def test_pre_hopper_devices_run_the_same_kernels_without_pdl(emu):
    """Compute capability 8.x (the sm_80 image): the second kernel is a plain launch, results unchanged."""
    with emu.device(**A100):
        x, v, u, b = _lowrank_inputs(16, 4096, 1537, 200, torch.float16, bias=True, seed=1)
        _check_lowrank(emu.lowrank(*map(_guarded, (x, v, u, b))), x, v, u, b)
        assert [launch["pdl"] for launch in emu.launches()] == [False, False]
        args = _quant_inputs(3, 4096, 515, 24, 128, 4, torch.bfloat16, bias=True, seed=2)
        _check_quant(emu.quant(*[_guarded(t) if isinstance(t, torch.Tensor) else t for t in args]), args)
        assert [launch["pdl"] for launch in emu.launches()] == [False, False]


def test_lowrank_decode_strided_unaligned_x(emu):
    """x with row stride 4100 and offset by one element: the masked 2-byte load path, rows read at their stride."""
    _, v, u, b = _lowrank_inputs(1, 4096, 515, 24, torch.bfloat16, bias=True, seed=7)
    base = _guarded(torch.randn(3, 4100).to(torch.bfloat16))
    x = base[:, 1:4097]
    _check_lowrank(emu.lowrank(x, *map(_guarded, (v, u, b))), x, v, u, b)


def test_lowrank_decode_large_rank_opts_in_to_shared_memory(emu):
    """z = 16 x 1024 fp32 = 64 KB of shared memory, above the 48 KB default: needs the per-kernel opt-in."""
    x, v, u, b = _lowrank_inputs(16, 1024, 96, 1024, torch.float16, bias=False, seed=11)
    _check_lowrank(emu.lowrank(*(None if t is None else _guarded(t) for t in (x, v, u, b))), x, v, u, b)
    assert emu.launches()[1]["smem"] == 65536


def test_lowrank_decode_bad_arguments_name_the_rule(emu):
    x, v, u, b = _lowrank_inputs(17, 64, 32, 8, torch.float16, bias=True, seed=0)
    with pytest.raises(KernelError, match=r"rows=17 must be in 1 \.\. 16"):
        emu.lowrank(x, v, u, b)
    with pytest.raises(KernelError, match=r"x_row_stride=10 must be >= n=64"):
        emu.lowrank(x[:2], v, u, b, x_row_stride=10)
    too_small = pytest.raises(KernelError, match=r"rows \* rank \* 4 = 16384 bytes of z must fit .* \(8192 bytes")
    with emu.device(smem_optin=8 * 1024), too_small:
        emu.lowrank(*_lowrank_inputs(16, 300, 32, 256, torch.float16, bias=False, seed=0)[:3], None)


@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize(("n", "rank"), [(4096, 256), (11008, 128), (576, 24), (4095, 1), (4096, 1024)])
def test_shrink_plan_rules(emu, n, rank, rows):
    """Slices cover n with none empty; enough warp tasks for the SMs (16 per SM) unless n has too few 512-column
    chunks; nothing else caps S (the last-arriving warps reduce the partials once); the workspace holds the S
    partials and z."""
    plan = emu.shrink_plan(rows, n, rank, H100["sm_count"])
    chunks = -(-n // 512)
    s, per = plan["splits"], plan["chunks_per_slice"]
    assert 1 <= s <= chunks and s * per >= chunks and (s - 1) * per < chunks, "slices cover n, none is empty"
    groups = -(-rank // 2)
    assert per == -(-chunks // min(-(-16 * H100["sm_count"] // groups), chunks)), "16 warp tasks per SM, no other cap"
    assert plan["blocks"] * 4 >= groups * s and plan["workspace_bytes"] == 4 * (s + 1) * rows * rank
    if (n, rank) == (4096, 256):
        assert s == 8, "4096^2, r = 256: 8 slices at every M (before the handoff, M = 16 was capped at 4)"


# ------------------------------------------------------------------------------------------ quantized base + residual

QUANT_CASES = [(4095, 1537, 128, 4), (4096, 515, 32, 3), (576, 192, 8, 4), (1000, 77, 40, 2)]


def _quant_inputs(rows, n, m, r, group_size, bits, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (m, n), generator=g, dtype=torch.uint8)
    groups = num_groups(n, group_size)
    scales = (0.5 + torch.rand(m, groups, generator=g)) * (2.0 / 2**bits) * (3.0 / n) ** 0.5
    zeros = torch.randint(0, 2**bits, (m, groups), generator=g).float()
    packed = pack(codes, scales, zeros, bits, group_size, dtype)
    x = torch.randn(rows, n, generator=g).to(dtype)
    v = u = None
    if r > 0:
        v = (torch.randn(r, n, generator=g) / n**0.5).to(dtype)
        u = (0.3 * torch.randn(m, r, generator=g) / r**0.5).to(dtype)
    b = torch.randn(m, generator=g).to(dtype) if bias else None
    return x, packed.qweight, packed.scales, packed.zeros, v, u, b, bits, group_size


def _check_quant(y, args):
    x, q, s, z, v, u, b, bits, group_size = args
    ref64 = quant_lowrank_matmul_ref(
        x.double(), q, s.double(), z.double(), *(None if t is None else t.double() for t in (v, u, b)), bits, group_size
    )
    assert y.shape == ref64.shape and torch.isfinite(y).all()
    assert_close_to_reference(y, quant_lowrank_matmul_ref(*args), ref64)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("r", [0, 1, 24, 200])
@pytest.mark.parametrize(("n", "m", "group_size", "bits"), QUANT_CASES, ids=str)
def test_quant_decode_matches_float64(emu, n, m, group_size, bits, r, rows):
    dtype = _dtype_for(n, m, r, rows)
    if r >= min(n, m):
        pytest.skip(f"rank {r} >= min(m, n) = {min(n, m)}")
    args = _quant_inputs(rows, n, m, r, group_size, bits, dtype, bias=rows != 3, seed=n + m + r + rows)
    guarded = [_guarded(t) if isinstance(t, torch.Tensor) else t for t in args]
    _check_quant(emu.quant(*guarded), args)
    launches = emu.launches()
    if r == 0:
        assert len(launches) == 1 and not launches[0]["pdl"] and launches[0]["smem"] == 0
    else:
        shrink, fused = launches
        assert not shrink["pdl"] and fused["pdl"] and fused["smem"] == 4 * rows * r
        _assert_weights_streamed_once(emu, v=args[4], u=args[5])
    _assert_weights_streamed_once(emu, qweight=args[1])


def test_quant_decode_bad_arguments_name_the_rule(emu):
    args = list(_quant_inputs(1, 256, 64, 8, 128, 4, torch.float16, bias=False, seed=0))
    with pytest.raises(KernelError, match=r"group_size=12 must be a positive multiple of 8"):
        emu.quant(*args[:8], 12)
    args[0] = torch.randn(17, 256).half()
    with pytest.raises(KernelError, match=r"rows=17 must be in 1 \.\. 16"):
        emu.quant(*args)


# ---------------------------------------------------------------------------------------------- PDL, seeded bugs

# The consumer's wait for the shrink moved after its first read of the partials: on an H100 the expand / quant kernel
# may then read partials the shrink has not written (PDL lets it start as soon as the shrink triggers).
MISPLACED_WAITS = (
    ("lowrank_decode.cu", "  wait_for_producer();\n  load_z(zs, z, rows * rank);\n",
     "  load_z(zs, z, rows * rank);\n  wait_for_producer();\n"),
    ("quant_lowrank_decode.cu",
     "        wait_for_producer();  // the shrink's z is complete and visible\n"
     "        load_z(zs, z, rows * rank);\n",
     "        load_z(zs, z, rows * rank);\n        wait_for_producer();\n"),
)  # fmt: skip


@pytest.fixture(scope="module")
def emu_misplaced_wait(tmp_path_factory):
    if emu_build.compiler() is None:
        pytest.skip("no C++ compiler (g++ / c++) on PATH: cannot build the CUDA emulator")
    return Emulator(emu_build.build(tmp_path_factory.mktemp("cuda_emu_mutant"), MISPLACED_WAITS))


def test_pdl_seeded_misplaced_wait_reads_poison(emu, emu_misplaced_wait):
    """The emulator starts a PDL launch while its triggering predecessor's writes are poison (NaN) until the wait:
    the kernels as shipped are exact, the same kernels reading the partials before their wait return NaN."""
    x, v, u, b = _lowrank_inputs(3, 1000, 300, 24, torch.float16, bias=True, seed=5)
    _check_lowrank(emu.lowrank(*map(_guarded, (x, v, u, b))), x, v, u, b)
    assert emu_misplaced_wait.lowrank(*map(_guarded, (x, v, u, b))).isnan().all()
    args = _quant_inputs(2, 1000, 77, 24, 40, 4, torch.bfloat16, bias=True, seed=6)
    guarded = [_guarded(t) if isinstance(t, torch.Tensor) else t for t in args]
    _check_quant(emu.quant(*guarded), args)
    assert emu_misplaced_wait.quant(*guarded).isnan().all()
    with emu_misplaced_wait.device(**A100):  # no PDL on an A100: stream order, the misplaced wait is harmless there
        _check_lowrank(emu_misplaced_wait.lowrank(*map(_guarded, (x, v, u, b))), x, v, u, b)


# The split-K handoff of the shrink (last_arrival in decode_common.cuh), each bug seeded on its own.
HANDOFF_BUGS = {
    # no release: the partial sums are not published before the arrival counts
    "no fence": ("decode_common.cuh", "  __threadfence();\n  __syncwarp();\n  unsigned int ticket = 0u;\n",
                 "  __syncwarp();\n  unsigned int ticket = 0u;\n"),
    # the fence after the atomic: the arrival is counted before the partial sums are published
    "fence after the atomic": ("decode_common.cuh", "    ticket = atomicAdd(counter, 1u);\n",
                               "    ticket = atomicAdd(counter, 1u);\n    __threadfence();\n"),
    # the counter is never reset: the next call's arrivals start at S
    "counter not reset": ("decode_common.cuh", "  if (lane == 0) {\n    *counter = 0u;\n  }\n", ""),
}  # fmt: skip


@pytest.mark.parametrize("bug", list(HANDOFF_BUGS))
def test_handoff_seeded_bugs_are_caught(emu, bug, tmp_path_factory):
    """The shipped handoff is exact call after call and leaves the counters at zero; each seeded bug makes the last
    warp reduce partial sums it cannot see (poison: NaN in y), at once or in the next call."""
    if bug == "fence after the atomic":  # the fence before the arrival goes, one after it comes
        mutations = (HANDOFF_BUGS["no fence"], HANDOFF_BUGS[bug])
    else:
        mutations = (HANDOFF_BUGS[bug],)
    mutant = Emulator(emu_build.build(tmp_path_factory.mktemp("cuda_emu_handoff"), mutations))
    x, v, u, b = _lowrank_inputs(3, 2000, 300, 24, torch.bfloat16, bias=True, seed=21)
    for _ in range(2):
        _check_lowrank(emu.lowrank(*map(_guarded, (x, v, u, b))), x, v, u, b)
        assert emu.counters_set() == 0
    outputs = [mutant.lowrank(*map(_guarded, (x, v, u, b))) for _ in range(2)]
    assert any(y.isnan().any() for y in outputs), bug
    if bug == "counter not reset":
        assert mutant.counters_set() > 0 and not outputs[0].isnan().any() and outputs[1].isnan().all()


# ------------------------------------------------------------------------------------------ int4 kernel v2 (layout v2)

# n = 4095 and 1000 (K padded to 64 with zero x), m = 77 / 515 (partial n16 blocks and warps past m), groups 16 / 32 /
# 48 / 128 (a group cut by a split's end, a last partial group), bits 2 / 3 / 4 in the 4-bit slots.
QUANT_V2_CASES = [(576, 192, 16, 4), (1000, 77, 48, 2), (2048, 515, 32, 3), (4095, 77, 128, 4)]


def _v2_args(rows, n, m, r, group_size, bits, dtype, bias, seed):
    """_quant_inputs in layout v1 (the reference's) and the same weight converted to layout v2 (the kernel's)."""
    args = _quant_inputs(rows, n, m, r, group_size, bits, dtype, bias, seed)
    x, q, s, z, v, u, b, bits, group_size = args
    return args, to_layout_v2(PackedQuantWeight(q, s, z, bits, group_size, (m, n)))


def _run_v2(emulator, args, packed_v2, x=None):
    x0, _, _, _, v, u, b, _, _ = args
    return emulator.quant_v2(_guarded(x0) if x is None else x, packed_v2, *(None if t is None else _guarded(t)
                                                                            for t in (v, u, b)))  # fmt: skip


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("r", [0, 24])
@pytest.mark.parametrize(("n", "m", "group_size", "bits"), QUANT_V2_CASES, ids=str)
def test_quant_v2_matches_float64(emu, n, m, group_size, bits, r, rows):
    """mma.sync on fragments dequantised with the zero point folded in, per-group fp32 scaling, split-K with the
    last-arriving warp's reduction and the residual's rank shared across the splits: the accuracy rule against
    float64, every code / V / U byte loaded once, the counters left at zero."""
    dtype = _dtype_for(n, m, r, rows)
    args, packed_v2 = _v2_args(rows, n, m, r, group_size, bits, dtype, bias=rows != 3, seed=n + m + r + rows)
    _check_quant(_run_v2(emu, args, packed_v2), args)
    launches = emu.launches()
    assert launches[-1]["pdl"] == (r > 0) and launches[-1]["block"] == 128 and len(launches) == 1 + (r > 0)
    _assert_weights_streamed_once(emu, qweight=packed_v2.qweight, **({"v": args[4], "u": args[5]} if r else {}))
    assert emu.counters_set() == 0


def test_quant_v2_single_split_strided_x_and_pre_hopper(emu):
    """One SM: S = 1, the CTA writes y itself (no workspace partials). x offset by one element at row stride 1003:
    the masked 2-byte x path instead of cp.async. An A100 (no PDL): the same results in plain stream order."""
    args, packed_v2 = _v2_args(3, 1000, 77, 24, 16, 4, torch.bfloat16, bias=True, seed=3)
    base = _guarded(torch.zeros(3, 1003).to(torch.bfloat16))
    x = base[:, 1:1001]
    x.copy_(args[0])
    with emu.device(sm_count=1):
        _check_quant(_run_v2(emu, args, packed_v2, x=x), args)
        assert emu.launches()[-1]["grid"] == 1
    with emu.device(**A100):
        _check_quant(_run_v2(emu, args, packed_v2), args)
        assert [launch["pdl"] for launch in emu.launches()] == [False, False]


def test_quant_v2_bad_arguments_name_the_rule(emu):
    args, packed_v2 = _v2_args(1, 256, 64, 0, 32, 4, torch.float16, bias=False, seed=0)
    bad_group = dataclasses.replace(packed_v2, group_size=40)
    with pytest.raises(KernelError, match=r"group_size=40 must be a positive multiple of 16"):
        emu.quant_v2(args[0], bad_group, None, None, None)


# Seeded bugs in the v2 kernel, each alone: the tests above must catch every one.
V2_BUGS = {
    # the B fragments of the two n8 tiles swapped with each other's second half
    "fragment order": ("quant_lowrank_decode_v2.cu", "b0[2] = {pairs[0], pairs[1]}, b1[2] = {pairs[2], pairs[3]}",
                       "b0[2] = {pairs[0], pairs[2]}, b1[2] = {pairs[1], pairs[3]}"),
    # the group's scale applied one k16 step late
    "group boundary": ("quant_lowrank_decode_v2.cu", "int steps_left = ((group + 1) * group_size - kb0 * 64) / 16;",
                       "int steps_left = ((group + 1) * group_size - kb0 * 64) / 16 + 1;"),
    # x past n not zero-filled: the padded codes (c - z) s are not zero weights
    "x padding": ("quant_lowrank_decode_v2.cu", "kb + x_kk[i] < kb1 ? min(n - col, kVec) : 0;",
                  "kb + x_kk[i] < kb1 ? kVec : 0;"),
    # the residual reads z before the wait for the shrink
    "wait after z": ("quant_lowrank_decode_v2.cu",
                     "    wait_for_producer();  // the shrink's z is complete and visible\n    const int share",
                     "    const int share"),
}  # fmt: skip


@pytest.mark.parametrize("bug", list(V2_BUGS))
def test_quant_v2_seeded_bugs_are_caught(emu, bug, tmp_path_factory):
    mutant = Emulator(emu_build.build(tmp_path_factory.mktemp("cuda_emu_v2_bug"), (V2_BUGS[bug],)))
    args, packed_v2 = _v2_args(3, 1000, 77, 24, 48, 4, torch.float16, bias=True, seed=8)
    _check_quant(_run_v2(emu, args, packed_v2), args)
    with pytest.raises((AssertionError, KernelError)):  # a wrong result, or a load the emulator faults (x padding)
        _check_quant(_run_v2(mutant, args, packed_v2), args)
