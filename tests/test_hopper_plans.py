"""What an H100 / H200 runs, executed on CPU (issue 20, points 1-4): the Triton kernels under the interpreter with
the GPU's launch plans (264 target programs: split-K up to 16 slices), its tensor-core dot branches (16-bit
operands multiplied in their dtype, fp32 ones in TF32) and programmatic dependent launch with hazards poisoned
(tests/triton_hopper.py). Every case declares a previous kernel that writes every input of the op and lets its
dependents start at once (an optimizer step writing the weights, a layer writing x): a load of any of them
before the op's first gdc_wait reads NaN.

Seeded bugs, each caught here: the shrink prefetching V before its wait (the code before issue 20), an expand
reading the partials without its wait, a shrink triggering its dependent before waiting (codebook, quant), a
split-K handoff that leaves its arrival counter set (the next call reduces too early or never)."""

import importlib.util
import inspect

import pytest
import test_codebook_matmul as cb
import test_lowrank_matmul as lr
import test_quant_lowrank_matmul as ql
import torch
import triton
from triton_hopper import H100_SMS, hopper

import lowrank_ops  # noqa: F401  (registers the ops)
from lowrank_ops.backends import DECODE_MAX_M, use_backend
from lowrank_ops.kernels import codebook_matmul as codebook_kernels
from lowrank_ops.kernels import launch
from lowrank_ops.kernels import lowrank_matmul as lowrank_kernels
from lowrank_ops.kernels import quant_lowrank_matmul as quant_kernels

pytestmark = pytest.mark.skipif(not launch.triton_interpreting(), reason="runs the Triton CPU interpreter")
HALF = [torch.float16, torch.bfloat16]
TARGET = launch.PROGRAMS_PER_SM * H100_SMS


def _tensors(args):
    return [t for t in args if isinstance(t, torch.Tensor)]


def _run_on_hopper(fn, args):
    """fn(*args) under the Hopper harness, after a previous kernel that writes every tensor in args."""
    with use_backend("triton"), hopper() as h:
        h.previous_kernel(*_tensors(args))
        y = fn(*args)
    return y, h


# ---------------------------------------------------------------------------------------------- lowrank_matmul


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", lr.SHAPES, ids=str)
def test_lowrank_matmul_h100_plan(shape, dtype):
    m_rows, n, m, r = shape
    x, v, u, b = lr._inputs(shape, dtype, "cpu", bias=m_rows % 2 == 1, seed=hash(shape) % 1000)
    y, h = _run_on_hopper(lr.op, (x, v, u, b))
    assert not h.hazards, h.hazards
    lr._check(y, x, v, u, b)
    shrink, expand = lowrank_kernels._lowrank_configs(m_rows, n, r, m, x.element_size(), TARGET, DECODE_MAX_M)
    first, second = h.launches[1:]
    assert first.grid == (triton.cdiv(r, shrink["BLOCK_N"]), triton.cdiv(m_rows, shrink["BLOCK_M"]), shrink["split"])
    assert second.grid == (triton.cdiv(m, expand["BLOCK_N"]), triton.cdiv(m_rows, expand["BLOCK_M"]), 1)
    assert first.pdl and second.pdl
    if m_rows > 4:
        assert h.dot_precisions == {"tf32"}, "fp32 operands of a 16-bit op run in TF32 on the GPU"
    if shape == (1, 4095, 33, 24):
        assert shrink["split"] == 16, "an H100 splits the M = 1 shrink 16 ways; the CPU plan uses 4 programs"


def test_lowrank_matmul_fp32_runs_3xtf32():
    x, v, u, b = lr._inputs((17, 300, 211, 200), torch.float32, "cpu", seed=3)
    y, h = _run_on_hopper(lr.op, (x, v, u, b))
    assert not h.hazards and h.dot_precisions == {"tf32x3"}
    lr._check(y, x, v, u, b)


def test_seeded_prefetch_before_wait_is_caught(monkeypatch):
    """The shrink as it was before issue 20 (first chunk of V loaded before gdc_wait, dependents triggered before
    it): with a previous kernel writing V the prefetch reads poison, and with one writing U so does the expand's
    (its trigger let the expand start while the previous kernel ran)."""
    launch_fn = lowrank_kernels._launch

    def old_launch(*args, prefetch_w, **kwargs):
        return launch_fn(*args, prefetch_w=True, **kwargs)

    monkeypatch.setattr(lowrank_kernels, "_launch", old_launch)
    x, v, u, b = lr._inputs((5, 576, 192, 24), torch.bfloat16, "cpu", seed=1)
    for written, racing_launch in ((v, 1), (u, 2)):  # launch 0 is the previous kernel, 1 the shrink, 2 the expand
        with use_backend("triton"), hopper() as h:
            h.previous_kernel(written)
            y = lr.op(x, v, u, b)
        assert {hazard.launch for hazard in h.hazards} == {racing_launch} and y.isnan().any()


def _mutant(module, tmp_path, old, new):
    """A copy of `module` with `old` (which must occur once) replaced by `new`, imported from a file (Triton's
    JIT reads kernel source through inspect)."""
    source = inspect.getsource(module)
    assert source.count(old) == 1, f"the mutation site is not unique in {module.__name__}"
    path = tmp_path / f"mutant_{module.__name__.rsplit('.', 1)[-1]}.py"
    path.write_text(source.replace(old, new))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mutant = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutant)
    return mutant


def test_seeded_missing_wait_in_the_expand_is_caught(tmp_path):
    wait = "        tl.extra.cuda.gdc_wait()  # `a` is written by the previous kernel\n"
    mutant = _mutant(lowrank_kernels, tmp_path, wait, "")
    x, v, u, b = lr._inputs((3, 257, 130, 1), torch.float16, "cpu", seed=2)
    y, h = _run_on_hopper(lambda *a: mutant.lowrank_matmul_triton(*a, DECODE_MAX_M), (x, v, u, b))
    assert {hazard.launch for hazard in h.hazards} == {2} and y.isnan().any()  # the expand reads unwritten partials


@pytest.mark.parametrize("shape", [(1, 4095, 33, 24), (16, 576, 192, 48), (17, 300, 211, 200)], ids=str)
def test_split_reduction_is_the_same_whichever_program_arrives_last(shape):
    """The last program of a tile to arrive sums the S partials in the fixed order 0 .. S - 1: slices run first to
    last and last to first give bitwise the same y, and every arrival counter is zero again afterwards."""
    x, v, u, b = lr._inputs(shape, torch.bfloat16, "cpu", seed=11)
    outputs = []
    for reverse in (False, True):
        with use_backend("triton"), hopper(reverse_splits=reverse) as h:
            h.previous_kernel(x, v, u, b)
            outputs.append(lr.op(x, v, u, b))
        assert not h.hazards and h.launches[1].grid[2] > 1, "the shrink must be split for the test to mean anything"
    assert torch.equal(*outputs)
    lr._check(outputs[0], x, v, u, b)
    assert all(not t.any() for t in lowrank_kernels._counters.values())


def test_seeded_counter_not_reset_is_caught(tmp_path):
    """Without the reset, the counters keep S arrivals per tile: in the next call no program sees S - 1, z is never
    written, and the expand multiplies whatever the workspace held."""
    reset = 'tl.atomic_xchg(count, 0, sem="relaxed", scope="gpu")'
    mutant = _mutant(lowrank_kernels, tmp_path, reset, "pass")
    run = lambda *a: mutant.lowrank_matmul_triton(*a, DECODE_MAX_M)  # noqa: E731
    x, v, u, b = lr._inputs((3, 1000, 130, 24), torch.bfloat16, "cpu", seed=12)
    lr._check(_run_on_hopper(run, (x, v, u, b))[0], x, v, u, b)  # the first call finds zeroed counters
    assert any(t.any() for t in mutant._counters.values())
    x2 = lr._inputs((3, 1000, 130, 24), torch.bfloat16, "cpu", seed=13)[0]
    with pytest.raises(AssertionError):
        lr._check(_run_on_hopper(run, (x2, v, u, b))[0], x2, v, u, b)


# ---------------------------------------------------------------------------------------------- codebook_matmul


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shared", cb.MODES)
@pytest.mark.parametrize("shape", cb.SHAPES, ids=str)
def test_codebook_matmul_h100_plan(shape, shared, dtype):
    args = cb._inputs(shape, shared, dtype, "cpu", bias=shape[0] % 2 == 1, seed=sum(shape))
    y, h = _run_on_hopper(lambda *a: cb.op(*a, shared), args)
    assert not h.hazards, h.hazards
    cb._check(y, args, shared)
    assert all(launch_.pdl for launch_ in h.launches[1:])
    if shape[0] > 4:  # the shrink's tensor-core branch: x times C / V / the one-hot tile in x's dtype
        assert {"fp16" if dtype == torch.float16 else "bf16"} <= h.dot_dtypes


def test_seeded_codebook_shrink_trigger_before_wait_is_caught(tmp_path):
    """A shrink that lets the expand start before its own wait: the expand's prefetch of the codebook rows races
    with the kernel before the op."""
    old = "        tl.extra.cuda.gdc_wait()\n        tl.extra.cuda.gdc_launch_dependents()\n    if pid_n < BLOCKS_A:"
    new = "        tl.extra.cuda.gdc_launch_dependents()\n        tl.extra.cuda.gdc_wait()\n    if pid_n < BLOCKS_A:"
    mutant = _mutant(codebook_kernels, tmp_path, old, new)
    x, c, idx, v, u, b = cb._inputs((5, 2000, 37, 6, 16), "columns", torch.bfloat16, "cpu", seed=4)
    with use_backend("triton"), hopper() as h:
        h.previous_kernel(c)
        y = mutant.codebook_matmul_triton(x, c, idx, v, u, b, "columns", DECODE_MAX_M)
    assert [hazard.kernel for hazard in h.hazards][:1] == ["_codebook_expand_kernel"] and y.isnan().any()


# ---------------------------------------------------------------------------------------------- quant_lowrank_matmul


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", ql.SHAPES, ids=str)
def test_quant_lowrank_matmul_h100_plan(shape, dtype):
    args = ql._inputs(shape, 4, dtype, "cpu", bias=shape[0] % 2 == 1, seed=hash((shape, 4)) % 1000)
    y, h = _run_on_hopper(ql.op, args)
    assert not h.hazards, h.hazards
    ql._check(y, args)
    assert all(launch_.pdl for launch_ in h.launches[1:]) and len(h.launches) == 2 + (shape[3] > 0)
    if shape[0] > 1:  # the dequantised tile rounded to x's dtype, multiplied on the tensor cores
        assert {"fp16" if dtype == torch.float16 else "bf16"} <= h.dot_dtypes


def test_seeded_quant_shrink_trigger_before_wait_is_caught(tmp_path):
    """The base kernel reads x before its own wait; a shrink that triggers it before waiting lets it read an x
    the previous kernel is still writing."""
    old = "        tl.extra.cuda.gdc_wait()\n        tl.extra.cuda.gdc_launch_dependents()  # only now"
    new = "        tl.extra.cuda.gdc_launch_dependents()\n        tl.extra.cuda.gdc_wait()  # only now"
    mutant = _mutant(quant_kernels, tmp_path, old, new)
    x, q, s, z, v, u, b, bits, group_size = ql._inputs((3, 200, 33, 1, 32), 4, torch.float16, "cpu", seed=5)
    with use_backend("triton"), hopper() as h:
        h.previous_kernel(x)
        y = mutant.quant_lowrank_matmul_triton(x, q, s, z, v, u, b, bits, group_size)
    assert [hazard.kernel for hazard in h.hazards][:1] == ["_quant_lowrank_matmul_kernel"] and y.isnan().any()


def test_chained_ops_under_pdl():
    """Three ops back to back as in a decoder layer, each PDL-launched behind the previous op's last kernel and
    reading its output: the expand of one triggers the next op's shrink early, which must wait before reading x."""
    x, v, u, b = lr._inputs((3, 257, 130, 24), torch.bfloat16, "cpu", seed=7)
    qargs = ql._inputs((3, 130, 97, 24, 32), 4, torch.bfloat16, "cpu", seed=8)
    cargs = cb._inputs((3, 97, 61, 9, 16), "rows", torch.bfloat16, "cpu", seed=9)
    with use_backend("triton"), hopper() as h:
        h.previous_kernel(x, v, u, b, *_tensors(qargs), *_tensors(cargs))
        y1 = lr.op(x, v, u, b)
        y2 = ql.op(y1, *qargs[1:])
        y3 = cb.op(y2, *cargs[1:], "rows")
    assert not h.hazards, h.hazards
    assert len(h.kernel_names()) == 6 and all(launch_.pdl for launch_ in h.launches)
    lr._check(y1, x, v, u, b)
    ql._check(y2, (y1, *qargs[1:]))
    cb._check(y3, (y2, *cargs[1:]), "rows")
