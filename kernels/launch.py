"""Launch-time facts and rules shared by the kernel launchers (lowrank_matmul, quant_lowrank_matmul,
codebook_matmul): what the device is, which dot precision a dtype gets, and how far a split-K shrink may split.

Split-K shrink / expand. Each op first runs a "shrink" that reduces over n, split into S slices along n so that
a few rows of output still give ~PROGRAMS_PER_SM programs per SM; its S fp32 partials (S, M, width) are summed by
the "expand" while it loads them (no memset, no atomics, deterministic). Every expand program re-reads all S
partials of its BLOCK_M rows over its reduction, so S is paid for twice:
- bytes: the re-reads cost S x (expand programs along N) x M x (reduction) x 4 bytes of L2 traffic. They are
  kept within PARTIAL_READ_RATIO x the op's weight bytes (the DRAM bytes the op must stream anyway).
- shared memory: on the tl.dot path Triton's software pipeliner stages the S partial tiles of every K-step in
  shared memory, S x BLOCK_M x BLOCK_K x 4 bytes per stage, (num_stages - 1) = 2 stages deep. S x BLOCK_M x
  BLOCK_K x 4 is kept <= PARTIAL_STAGE_BYTES: 2 x 32 KB of partials leave room for the weight's stages under
  the 227 KB a block may use on an H100. Without the cap the lowrank_matmul expand asked for 270 KB (M = 16,
  S = 16, 16 x 128 tiles) and 540 KB (M = 64, S = 16, 64 x 64 tiles) in the sm_90 compile, and spilled.
`partial_split_cap` computes the cap from those two rules, `cap_split` re-slices a launch configuration to it
(quant_lowrank_matmul, codebook_matmul). lowrank_matmul does not need it: its shrink reduces the partials once
(the split-K handoff in kernels/lowrank_matmul.py) and its expand reads z alone.

Device facts come from the tensor's CUDA device. `emulated_device` makes the launchers act as on a given GPU for
CPU tensors (PDL, program counts, dot precision): scripts/check_sm90_compile.py uses it to compile every kernel
variant for sm_90a on a machine without a GPU, and tests/triton_hopper.py to execute the H100 plans in the CPU
interpreter (it supplies the 16-bit tl.dot and the PDL hooks the interpreter lacks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import torch
import triton

from lowrank_ops.backends import triton_interpreting

PROGRAMS_PER_SM = 2  # split-K targets this many programs per SM so that the weight streams from every SM
MAX_SPLIT = 16  # at most this many slices: the expand issues S loads of partials per K-step
INTERPRETER_PROGRAMS = 4  # under TRITON_INTERPRET programs run one after another; fewer is faster
PARTIAL_READ_RATIO = 1  # the expand may re-read the shrink partials (from L2) for at most this x the weight bytes
PARTIAL_STAGE_BYTES = 32 * 1024  # tl.dot expand: S partial tiles of (BLOCK_M, BLOCK_K) fp32 per pipeline stage


@dataclasses.dataclass(frozen=True)
class EmulatedDevice:
    """The GPU the launchers act as if on (see `emulated_device`)."""

    multi_processor_count: int
    capability: tuple[int, int]


_emulated: EmulatedDevice | None = None


@contextlib.contextmanager
def emulated_device(multi_processor_count: int, capability: tuple[int, int]) -> Iterator[EmulatedDevice]:
    """Inside, the launchers treat any tensor as living on this GPU (device index 0): split counts from its SM
    count, PDL when capability >= 9.0. For compiling kernels offline only: a launch would still need a GPU."""
    global _emulated
    previous, _emulated = _emulated, EmulatedDevice(multi_processor_count, tuple(capability))
    try:
        yield _emulated
    finally:
        _emulated = previous


def device_info(t: torch.Tensor) -> tuple[int | None, bool]:
    """(device index, or None under the interpreter; whether PDL can be used)."""
    if _emulated is not None:
        return 0, _emulated.capability[0] >= 9
    if t.device.type != "cuda" or triton_interpreting():
        return None, False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.get_device_capability(index)[0] >= 9  # griddepcontrol is sm_90+


def target_programs(device_index: int | None) -> int:
    """How many programs a launch should have to keep every SM streaming."""
    if _emulated is not None:
        return PROGRAMS_PER_SM * _emulated.multi_processor_count
    if device_index is None:
        return INTERPRETER_PROGRAMS
    return _device_programs(device_index)


@functools.cache
def _device_programs(device_index: int) -> int:
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device_index).multi_processor_count


def dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_FP32, DOT_PRECISION) of tl.dot on activations of `dtype`. fp16 / bf16: DOT_FP32 False (16-bit operands
    may be multiplied in their dtype; fp32 operands, such as the fp32 partials, run in TF32: 10 mantissa bits,
    exact for fp16 / bf16 values). fp32: 3xTF32 throughout, near-fp32 accuracy. The CPU interpreter runs IEEE
    fp32 (its bf16 tl.dot is wrong), except inside `emulated_device`, where the GPU's flags are returned: the tests'
    Hopper harness (tests/triton_hopper.py) supplies a tl.dot that multiplies 16-bit operands correctly."""
    if triton_interpreting() and _emulated is None:
        return True, "ieee"
    if dtype == torch.float32:
        return True, "tf32x3"
    return False, "tf32"


def partial_split_cap(
    weight_bytes: int, read_bytes_per_split: int, expand_block_m: int, expand_block_k: int, expand_dot: bool
) -> int:
    """The largest split count S >= 1 that keeps the expand's re-reads of the partials within PARTIAL_READ_RATIO x
    `weight_bytes` (read_bytes_per_split: what all expand programs together read of ONE partial) and, on the
    tl.dot path (expand_dot), its staged partial tiles within PARTIAL_STAGE_BYTES. See the module docstring."""
    cap = PARTIAL_READ_RATIO * weight_bytes // read_bytes_per_split
    if expand_dot:
        cap = min(cap, PARTIAL_STAGE_BYTES // (expand_block_m * expand_block_k * 4))
    return max(1, cap)


def cap_split(cfg: dict, k_in: int, cap: int) -> dict:
    """Re-slice the split-K of `cfg` (keys split, k_per_split, BLOCK_K) over k_in to at most `cap` slices."""
    if cfg["split"] > cap:
        k_blocks = triton.cdiv(k_in, cfg["BLOCK_K"])
        cfg["k_per_split"] = triton.cdiv(k_blocks, cap) * cfg["BLOCK_K"]
        cfg["split"] = triton.cdiv(k_in, cfg["k_per_split"])
    return cfg
