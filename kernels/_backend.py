"""The forced backends of every fasttips.kernels op: an op's ``backend=`` argument, else the deployment
override ``FASTTIPS_KERNELS=auto|triton|reference`` (read here and nowhere else). ``auto`` (default)
leaves the choice to the measured dispatch (``dispatch/``, config ``kernels.dispatch``); ``triton``
and ``reference`` force one path (``triton_chosen`` is the rule, shared with the ``fasttips`` policy).
Inputs an op's compiled kernels cannot take (its ``unsupported`` reason) run the reference with a
warning, whatever was asked. Under ``TRITON_INTERPRET=1`` the Triton path also accepts CPU tensors
(the interpreter), which is how the CPU test suite checks kernel math.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "reference")


def requested() -> str:
    value = os.environ.get("FASTTIPS_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FASTTIPS_KERNELS={value!r} is not allowed; choose one of {list(BACKENDS)}")
    return value


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_AVAILABLE: bool | None = None


def triton_available() -> bool:
    # A plain module-level cache (not lru_cache) so torch.compile can trace callers without warnings.
    global _TRITON_AVAILABLE
    if _TRITON_AVAILABLE is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON_AVAILABLE = True
        except Exception:  # ImportError, or a broken install
            _TRITON_AVAILABLE = False
    return _TRITON_AVAILABLE


def use_triton(*tensors: torch.Tensor | None, backend: str | None = None, op: str = "",
               unsupported=None) -> bool:
    """True when the op should run its Triton kernel on these tensors (``triton_chosen`` for them)."""
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    return triton_chosen(backend or requested(), on_cuda, op=op, unsupported=unsupported)


def triton_chosen(choice: str, on_cuda: bool, op: str = "", unsupported=None) -> bool:
    """The rule of ``backend=triton`` and of the fasttips policy (``auto`` here), for tensors that are
    (``on_cuda``) or are not all on CUDA: ``triton`` needs Triton and CUDA tensors (or the interpreter);
    ``auto`` takes Triton for CUDA tensors only (the interpreter is for tests).

    ``unsupported(interpreting) -> str | None`` says why the compiled kernels cannot take these inputs;
    asked only when the Triton path would run, and a reason sends the call to the reference with a
    one-time warning (``op`` names the op in it)."""
    if choice not in BACKENDS:
        raise ValueError(f"backend={choice!r} is not allowed; choose one of {list(BACKENDS)}")
    if choice == "reference":
        return False
    runnable = triton_available() and (on_cuda or interpreting())
    if choice == "triton":
        if not runnable:
            raise RuntimeError(
                "FASTTIPS_KERNELS=triton needs Triton and CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                f"tensors); triton importable={triton_available()}, cuda tensors={on_cuda}")
        chosen = True
    else:   # auto: the interpreter is for tests, so CPU tensors take the (fast) reference by default.
        chosen = runnable and on_cuda
    if chosen and unsupported is not None:
        reason = unsupported(interpreting())
        if reason:
            warn_once(f"{op}: {reason}; running the chunked PyTorch reference instead")
            return False
    return chosen


def warn_once(message: str) -> None:
    _warn_once(message)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)
