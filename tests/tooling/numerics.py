"""Numerical yardsticks of the test suite: tolerances by dtype and flash-attn's 2×-error rule."""
from __future__ import annotations

import torch

# (atol, rtol) per dtype for parity checks against a reference run in the same dtype's math.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def assert_close(actual, expected, dtype=None, msg=""):
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=rtol, msg=msg or None)


def assert_within_2x(kernel_out, same_precision_out, fp32_reference, name="output", floor=1e-6):
    """flash-attn's rule: |kernel − ref32| ≤ 2·|same-precision torch − ref32| (max abs), plus a floor."""
    ref = fp32_reference.float()
    err_kernel = (kernel_out.float() - ref).abs().max().item()
    err_torch = (same_precision_out.float() - ref).abs().max().item()
    assert err_kernel <= 2 * err_torch + floor, (
        f"{name}: kernel error {err_kernel:.3e} > 2 × torch error {err_torch:.3e} (+{floor:g})")
