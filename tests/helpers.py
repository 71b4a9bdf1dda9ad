"""Shared test utilities: where kernels run, and the float64 accuracy rule of docs/FACTS.md."""

import json
import os

import pytest
import torch

KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

if os.environ.get("TRITON_INTERPRET") == "1":
    from triton_hopper import round_bfloat16_to_nearest_even

    round_bfloat16_to_nearest_even()  # the interpreter truncates fp32 -> bf16; a GPU rounds (see triton_hopper.py)

# 16-bit outputs: the output's own rounding (the floor) plus at most one more rounding of the same size in an
# intermediate (the quant kernel rounds its dequantised tile to x's dtype, as torch does): sqrt(2) x the floor, with
# 25 % to spare. Measured on CPU (interpreter, emulator and the Hopper harness): at most 1.31 x the floor in bf16.
FLOOR_FACTOR = 1.75
# The kernels' fp32 intermediates may pass through TF32 on the tensor cores (10 mantissa bits; the Hopper harness
# truncates, the worse case): one TF32 unit roundoff in quadrature. fp16 under the harness: at most 2.0 x the floor.
TF32_UNIT = 2.0**-11
# A kernel's output may not be scaled against float64 by more than this (plus sampling noise): rounding to nearest
# is unbiased, so the least-squares scale of a correct output is 1 within noise, while a 0.5 % scale error is 5e-3.
SCALE_TOLERANCE = 1e-3


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_F / ||expected||_F in float64."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def rounding_floor(reference64: torch.Tensor, dtype: torch.dtype) -> float:
    """Relative error of the float64 result rounded once to `dtype`: what no kernel writing `dtype` can beat."""
    return relative_error(reference64.to(dtype), reference64)


def scale_error(actual: torch.Tensor, reference64: torch.Tensor) -> float:
    """s with actual ~ (1 + s) reference64 in the least-squares sense: <actual - ref, ref> / <ref, ref>."""
    ref = reference64.double().reshape(-1)
    delta = actual.double().reshape(-1) - ref
    return (delta @ ref / (ref @ ref).clamp_min(1e-300)).item()


def accuracy_bound(actual_dtype: torch.dtype, same_dtype_torch: torch.Tensor, reference64: torch.Tensor) -> float:
    """The largest relative error (against float64) the rule accepts for an output of `actual_dtype`.

    The accuracy rule (docs/FACTS.md): at most twice PyTorch's own same-dtype error plus one unit of the dtype's
    rounding. In fp16 / bf16 that epsilon dominates (bf16: 7.8e-3, enough to hide one dropped K column or a 0.5 %
    scale error, issue 20), so 16-bit outputs must also stay within sqrt((FLOOR_FACTOR x floor)^2 + TF32_UNIT^2),
    the floor being the error of the float64 result rounded once to the dtype. The tighter of the two applies: the
    rule is never looser than the rule as first written. tests/test_accuracy_rule.py shows it catching the seeded
    bugs in both 16-bit dtypes."""
    torch_err = relative_error(same_dtype_torch, reference64)
    bound = 2 * torch_err + torch.finfo(actual_dtype).eps
    if actual_dtype in (torch.float16, torch.bfloat16):
        floor = rounding_floor(reference64, actual_dtype)
        bound = min(bound, ((FLOOR_FACTOR * floor) ** 2 + TF32_UNIT**2) ** 0.5)
    return bound


def assert_close_to_reference(actual: torch.Tensor, same_dtype_torch: torch.Tensor, reference64: torch.Tensor):
    """The accuracy rule (`accuracy_bound`), plus: the output is not scaled against float64 by more than
    SCALE_TOLERANCE beyond three standard deviations of rounding noise (floor / sqrt(outputs))."""
    err = relative_error(actual, reference64)
    bound = accuracy_bound(actual.dtype, same_dtype_torch, reference64)
    floor = rounding_floor(reference64, actual.dtype)
    torch_err = relative_error(same_dtype_torch, reference64)
    assert err <= bound, (
        f"error {err:.3e} > the accuracy bound {bound:.3e} (torch's same-dtype error {torch_err:.3e}, "
        f"rounding floor {floor:.3e})"
    )
    noise = 3 * max(floor, torch.finfo(torch.float32).eps) / reference64.numel() ** 0.5
    scale = scale_error(actual, reference64)
    assert abs(scale) <= SCALE_TOLERANCE + noise, (
        f"output scaled by {scale:+.3e} against float64 (allowed {SCALE_TOLERANCE:.0e} + noise {noise:.1e})"
    )


def drop_weights_digest(directory) -> None:
    """Remove weights_sha256 from a saved model's manifest after a test edited its tensors, so that loading reaches
    the per-layer checks behind the digest (what from_pretrained and manifests saved before the digest rely on); the
    digest itself is tested in tests/test_file_corruption.py."""
    from lowrank_ops.serialization import MANIFEST

    path = os.path.join(directory, MANIFEST)
    with open(path) as handle:
        manifest = json.load(handle)
    manifest.pop("weights_sha256")
    with open(path, "w") as handle:
        json.dump(manifest, handle)
