"""What the reference and the Triton path of ``attention_varlen`` share: the ``max_seqlen`` contract.

``max_seqlen`` sizes the Triton launch (one program per ``BLOCK_M`` rows of the longest sequence);
a value below the longest sequence would leave rows of ``out`` never written. It is checked against
the longest sequence of ``cu_seqlens`` without waiting for the device on the hot path:

- ``cu_seqlens_from_lengths`` builds the offsets from host lengths and records their maximum;
- any other ``cu_seqlens`` tensor has its maximum computed once (one host read; free on the CPU) and
  recorded (``host_offsets`` does the same for the whole list, which the CPU reference loops over), keyed by the tensor object and its version counter, so a layout reused every step (the
  models' ``Packing`` keeps its offsets) is read at most once, and an in-place change is seen.
"""
from __future__ import annotations

import itertools
import weakref

import torch

# id(cu_seqlens) -> (weak reference, version when recorded, longest sequence, the offsets as a host
# list or None when only the longest is known)
_LONGEST: dict[int, tuple[weakref.ref, int | None, int, list[int] | None]] = {}


def _version(cu: torch.Tensor) -> int | None:
    return None if cu.is_inference() else cu._version   # inference tensors keep no version counter


def _remember(cu: torch.Tensor, longest: int, offsets: list[int] | None = None) -> None:
    key = id(cu)

    def forget(ref, key=key):
        entry = _LONGEST.get(key)
        if entry is not None and entry[0] is ref:
            del _LONGEST[key]

    _LONGEST[key] = (weakref.ref(cu, forget), _version(cu), int(longest), offsets)


def _recorded(cu: torch.Tensor):
    entry = _LONGEST.get(id(cu))
    if entry is not None and entry[0]() is cu and entry[1] == _version(cu):
        return entry
    return None


def cu_seqlens_from_lengths(lengths, device) -> torch.Tensor:
    """int32 offsets [0, n0, n0+n1, ...] on ``device``, their longest sequence known on the host."""
    lengths = [int(n) for n in lengths]
    if any(n < 0 for n in lengths):
        raise ValueError(f"cu_seqlens_from_lengths: lengths must be >= 0, got {lengths}")
    offsets = [0, *itertools.accumulate(lengths)]
    cu = torch.tensor(offsets, dtype=torch.int32, device=device)
    if not cu.device.type == "meta":
        _remember(cu, max(lengths, default=0), offsets)
    return cu


def longest_sequence(cu_seqlens: torch.Tensor) -> int | None:
    """The longest sequence in ``cu_seqlens``: recorded, or computed now (one host read) and recorded.
    None while a CUDA graph is being captured, when it is not recorded (a read would break the capture)."""
    entry = _recorded(cu_seqlens)
    if entry is not None:
        return entry[2]
    if cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    _remember(cu_seqlens, longest)
    return longest


def host_offsets(cu_seqlens: torch.Tensor) -> list[int]:
    """``cu_seqlens`` as a host list: recorded by ``cu_seqlens_from_lengths``, or read now (the CPU
    reference's per-segment loop needs every bound) and recorded."""
    entry = _recorded(cu_seqlens)
    if entry is not None and entry[3] is not None:
        return entry[3]
    offsets = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(offsets[:-1], offsets[1:])]
    _remember(cu_seqlens, max(lengths, default=0), offsets)
    return offsets


def recorded_offsets(cu_seqlens: torch.Tensor) -> list[int] | None:
    """The host list of ``cu_seqlens`` when it is recorded (``cu_seqlens_from_lengths``, or read once
    by ``host_offsets``), else None: never reads the device."""
    entry = _recorded(cu_seqlens)
    return entry[3] if entry is not None else None


def check_max_seqlen(max_seqlen, longest: int | None) -> int:
    """``max_seqlen`` as an int, or ``longest`` when it is None; a value below ``longest`` raises."""
    if max_seqlen is None:
        if longest is None:
            raise ValueError("attention_varlen: pass max_seqlen while capturing a CUDA graph")
        return longest
    if isinstance(max_seqlen, bool) or int(max_seqlen) != max_seqlen or max_seqlen < 0:
        raise ValueError(f"attention_varlen: max_seqlen must be an int >= 0, got {max_seqlen!r}")
    if longest is not None and max_seqlen < longest:
        raise ValueError(f"attention_varlen: max_seqlen={int(max_seqlen)} is below the longest sequence in "
                         f"cu_seqlens ({longest} tokens); pass at least {longest}, or None to derive it")
    return int(max_seqlen)
