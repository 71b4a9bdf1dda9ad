"""Run the Triton kernels under the CPU interpreter the way an H100 / H200 runs them (issue 20, points 1-4).

`hopper()` is a test-harness context; nothing in kernels/ changes for it. Inside it:

1. Launch plans. `kernels.launch.emulated_device` makes the launchers plan for the GPU's SM count: split counts,
   block shapes and expand tiles are the ones an H100 / H200 (132 SMs, 264 target programs) compiles, and PDL is
   on (USE_PDL, launch_pdl), so the kernels' griddepcontrol paths execute.
2. Tensor-core dots. `dot_flags` returns the GPU's flags (16-bit operands multiplied in their dtype, fp32 operands
   in TF32 or 3xTF32). The interpreter's own tl.dot multiplies bf16 as raw uint16 bit patterns (garbage), so
   `create_dot` is replaced here: 16-bit operands are widened exactly to fp32 (products of fp16 / bf16 values are
   exact in fp32, as on the tensor cores), fp32 operands of a "tf32" dot are TRUNCATED to TF32's 10 mantissa bits
   (the worse of truncation and rounding: a kernel that passes here passes with either), then multiplied and
   accumulated in fp32. "tf32x3" and "ieee" run in fp32.
3. Programmatic dependent launch. tl.extra.cuda.gdc_wait / gdc_launch_dependents (inline asm, which the
   interpreter cannot run) become hooks, and the harness models what PDL allows: a PDL launch may start as soon as every
   program of its predecessor has triggered (launch_dependents) or exited, so before its own wait it may overlap
   the predecessor, and the predecessor's predecessor too when the predecessor triggered before waiting, and so
   on down the chain. Every element a program loads before its wait from memory that a possibly-running kernel
   writes is poison (NaN; the most negative integer for integer loads) and is recorded as a hazard; so is a store
   before the wait. After the wait the predecessor is complete, and so is everything before it when every program
   of the predecessor waited. `previous_kernel(*tensors)` declares the kernel before the op: it writes those
   tensors and triggers at its start (the worst case PDL allows; an optimizer step writing the weights before a
   forward, or a preceding layer writing x).

Programs still run one after another, so a hazard shows whatever the pattern of loads, not by chance of timing.
`hopper(reverse_splits=True)` runs the programs along grid axis 2 (the split-K slices) in reverse order, so the
last program to arrive at a split-K handoff is slice 0 instead of slice S - 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np
import torch
import triton.language as tl
import triton.language.extra.cuda as gdc
from triton.runtime import interpreter as interp

from lowrank_ops.kernels import launch

H100_SMS = 132  # H100 SXM and H200 alike
HOPPER = (9, 0)


@dataclasses.dataclass
class Launch:
    name: str
    pdl: bool
    writes: list = dataclasses.field(default_factory=list)  # (begin, end) byte intervals stored to
    trigger_before_wait: bool = False  # some program triggered its dependents before its own wait
    some_program_never_waited: bool = False
    grid: tuple = ()


@dataclasses.dataclass
class Hazard:
    kernel: str
    launch: int  # index into Hopper.launches (0: the previous kernel when one was declared)
    program: tuple
    what: str  # "load" or "store"
    elements: int


def _intervals_of(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    span = (max((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) if t.numel() else 0
    return start, start + span * t.element_size()


def _in_any(addresses: np.ndarray, intervals) -> np.ndarray:
    hit = np.zeros(addresses.shape, dtype=bool)
    for begin, end in intervals:
        hit |= (addresses >= begin) & (addresses < end)
    return hit


def _truncate_tf32(data: np.ndarray) -> np.ndarray:
    return (data.astype(np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def _as_f32(handle) -> np.ndarray:
    if handle.dtype.scalar == tl.bfloat16:  # stored as uint16 bit patterns
        return (handle.data.astype(np.uint32) << 16).view(np.float32)
    return handle.data.astype(np.float32)


class Hopper:
    """State of one `hopper()` context: the launches so far and the hazards found."""

    def __init__(self, reverse_splits: bool = False):
        self.reverse_splits = reverse_splits
        self.launches: list[Launch] = []
        self.hazards: list[Hazard] = []
        self.dot_precisions: set[str] = set()
        self.dot_dtypes: set[str] = set()
        self._current: Launch | None = None
        self._program = None
        self._waited = False
        self._pre_wait: list = []
        self._post_wait: list = []

    # -- the test's side
    def previous_kernel(self, *tensors: torch.Tensor) -> None:
        """The kernel before the next launch writes `tensors` and lets its dependents start at once."""
        self.launches.append(Launch("previous kernel", pdl=True, writes=[_intervals_of(t) for t in tensors],
                                    trigger_before_wait=True))  # fmt: skip

    def kernel_names(self) -> list[str]:
        return [launch.name for launch in self.launches if launch.name != "previous kernel"]

    # -- the interpreter's side
    def _begin_launch(self, name: str, pdl: bool) -> None:
        overlap_pre, overlap_post = [], []
        if pdl and self.launches:
            j = len(self.launches) - 1
            overlap_pre.append(j)
            while self.launches[j].pdl and self.launches[j].trigger_before_wait and j > 0:
                j -= 1
                overlap_pre.append(j)
            j = len(self.launches) - 1  # after the wait: the predecessor is done; its predecessor only if it waited
            while self.launches[j].pdl and self.launches[j].some_program_never_waited and j > 0:
                j -= 1
                overlap_post.append(j)
        self._pre_wait = [iv for j in overlap_pre for iv in self.launches[j].writes]
        self._post_wait = [iv for j in overlap_post for iv in self.launches[j].writes]
        self._current = Launch(name, pdl)

    def _end_program(self) -> None:
        if self._program is not None and self._current.pdl and not self._waited:
            self._current.some_program_never_waited = True

    def _begin_program(self, idx) -> None:
        self._end_program()
        self._program, self._waited = idx, False

    def _end_launch(self) -> None:
        self._end_program()
        self._current.grid = tuple(interp.interpreter_builder.grid_dim)
        self.launches.append(self._current)
        self._current, self._program = None, None

    def _hazard_mask(self, addresses: np.ndarray) -> np.ndarray:
        intervals = self._post_wait if self._waited else self._pre_wait
        return _in_any(addresses, intervals) if intervals else np.zeros(addresses.shape, dtype=bool)

    def _hazard(self, what: str, elements: int) -> Hazard:
        return Hazard(self._current.name, len(self.launches), self._program, what, elements)

    def _wait(self) -> None:
        self._waited = True

    def _trigger(self) -> None:
        if not self._waited:
            self._current.trigger_before_wait = True


_state: Hopper | None = None


def _rtne_bfloat16(data: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns, rounded to nearest even (NaN kept quiet), as the GPU's cvt.rn.bf16.f32."""
    bits = data.astype(np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(data), np.uint16(0x7FC0), rounded)


_bf16_fixed = False


def round_bfloat16_to_nearest_even() -> None:
    """The interpreter (triton 3.6) converts fp32 to bf16 by truncation (`x.to(tl.bfloat16)` with no rounding mode);
    Triton on a GPU rounds to nearest even. Truncation biases every bf16 output towards zero by about half an ulp,
    which the accuracy rule's scale check (tests/helpers.py) would rightly reject: replace it, once per process."""
    global _bf16_fixed
    if _bf16_fixed:
        return
    orig = interp.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interp.TensorHandle(_rtne_bfloat16(src.data), tl.bfloat16)
        return orig(self, src, dst_type)

    interp.InterpreterBuilder.cast_impl = cast_impl
    _bf16_fixed = True


def _patched_builder_methods(orig):
    def create_masked_load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        result = orig["create_masked_load"](self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)
        if _state is not None and _state._current is not None:
            hit = _state._hazard_mask(ptrs.data) & mask.data
            if hit.any():
                _state.hazards.append(_state._hazard("load", int(hit.sum())))
                data = result.data.copy()
                if data.dtype.kind == "f":
                    data[hit] = np.nan
                elif result.dtype.scalar == tl.bfloat16:
                    data[hit] = 0x7FC0  # bf16 NaN
                else:
                    data[hit] = np.iinfo(data.dtype).min
                result = interp.TensorHandle(data, result.dtype)
        return result

    def create_masked_store(self, ptrs, value, mask, cache_modifier, eviction_policy):
        if _state is not None and _state._current is not None:
            addresses = ptrs.data[mask.data]
            if addresses.size:
                item = value.data.dtype.itemsize
                _state._current.writes.append((int(addresses.min()), int(addresses.max()) + item))
                if _state._current.pdl and not _state._waited:
                    _state.hazards.append(_state._hazard("store", int(addresses.size)))
        return orig["create_masked_store"](self, ptrs, value, mask, cache_modifier, eviction_policy)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a_data, b_data = _as_f32(a), _as_f32(b)
        precision = str(input_precision).rsplit(".", 1)[-1].lower()
        if _state is not None:
            _state.dot_precisions.add(precision)
            _state.dot_dtypes.add(str(a.dtype.scalar))
        if precision == "tf32" and a.dtype.scalar == tl.float32:
            a_data, b_data = _truncate_tf32(a_data), _truncate_tf32(b_data)
        product = np.matmul(a_data, b_data, dtype=np.float32)
        return interp.TensorHandle((product + d.data).astype(d.data.dtype), d.dtype.scalar)

    def set_grid_idx(self, x, y, z):
        if _state is not None and _state.reverse_splits:
            z = self.grid_dim[2] - 1 - z
        orig["set_grid_idx"](self, x, y, z)
        if _state is not None and _state._current is not None:
            _state._begin_program((x, y, z))

    return dict(create_masked_load=create_masked_load, create_masked_store=create_masked_store,
                create_dot=create_dot, set_grid_idx=set_grid_idx)  # fmt: skip


def _patched_call(orig_call):
    def __call__(self, *args, **kwargs):
        if _state is None:
            return orig_call(self, *args, **kwargs)
        _state._begin_launch(self.fn.__name__, bool(kwargs.get("launch_pdl", False)))
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            _state._end_launch()

    return __call__


@contextlib.contextmanager
def hopper(sm_count: int = H100_SMS, reverse_splits: bool = False) -> Iterator[Hopper]:
    """Inside, Triton launches plan, multiply and synchronise as on a Hopper GPU with `sm_count` SMs (module
    docstring); `reverse_splits` runs each grid's split-K slices last to first. Needs TRITON_INTERPRET=1
    (tests/conftest.py)."""
    global _state
    if _state is not None:
        raise RuntimeError("hopper() contexts do not nest")
    builder = interp.InterpreterBuilder
    names = ("create_masked_load", "create_masked_store", "create_dot", "set_grid_idx")
    orig = {name: getattr(builder, name) for name in names}
    orig_call = interp.GridExecutor.__call__
    orig_gdc = (gdc.gdc_wait, gdc.gdc_launch_dependents)
    _state = Hopper(reverse_splits)
    try:
        for name, fn in _patched_builder_methods(orig).items():
            setattr(builder, name, fn)
        interp.GridExecutor.__call__ = _patched_call(orig_call)
        gdc.gdc_wait, gdc.gdc_launch_dependents = _state._wait, _state._trigger
        with launch.emulated_device(sm_count, HOPPER):
            yield _state
    finally:
        for name, fn in orig.items():
            setattr(builder, name, fn)
        interp.GridExecutor.__call__ = orig_call
        gdc.gdc_wait, gdc.gdc_launch_dependents = orig_gdc
        _state = None
