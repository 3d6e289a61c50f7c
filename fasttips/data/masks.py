"""iBOT block masks with DINOv2 semantics (docs/loss_math.md §5.2).

Two levels:

* ``block_mask`` / ``block_masks``: BEiT-style rectangular blocks on an ``h × w`` patch grid until a
  target patch count is reached. A block's area is drawn from U(min_patches, remaining budget capped at
  max_patches), its aspect ratio from exp(U(log a, log 1/a)); up to 10 placements are tried per block
  and a block may overlap earlier ones. Once less than ``min_patches`` is left, smaller *finishing*
  blocks keep being drawn (area U(left, min_patches), up to 30 placements, counting only their new
  patches), so the target is almost always met by blocks. A 1×1 block is only placed next to the mask.
  DINOv2 stops when no block makes progress, which can leave an image a few patches short; in that rare
  case (a few % of masks on a 16×16 grid) we grow the mask at its edge, one random unmasked neighbour of
  a masked patch at a time, so every image gets **exactly** its target count (the stratified ratios
  below are then met exactly) and no masked patch is ever isolated.
* ``batch_masks``: the collate-level rule over the ``n`` global crops of a batch: ``int(n · p)`` images
  are masked, their ratios are stratified over ``[lo, hi]`` (image i draws from U(r_i, r_{i+1}) with
  ``r = linspace(lo, hi, n_masked + 1)``), the rest get empty masks, and the order is shuffled.

The block placement exists twice, byte for byte identical: the C++ version in ``csrc/masking.cpp``
(``fasttips._native.block_masks``) and the Python twin here. Both draw from the same tiny PRNG
(splitmix64, one stream per image seeded from ``(seed, image index)``), so for equal arguments they
return equal masks; the tests check that and the mask properties on both.
"""
from __future__ import annotations

import math

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
MAX_TRIES = 10      # placements tried per block (DINOv2's value)
FINISH_TRIES = 30   # per finishing block: fitting a leftover of 1-3 patches needs more tries


class SplitMix64:
    """splitmix64: tiny, fast, and easy to reproduce exactly in C++ (see csrc/masking.cpp)."""

    def __init__(self, seed: int):
        self.state = seed & _MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * ((self.next() >> 11) * (1.0 / 9007199254740992.0))

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi] (inclusive)."""
        return lo + self.next() % (hi - lo + 1)


def image_seed(seed: int, index: int) -> int:
    """The PRNG seed of image ``index`` in a call (same formula in C++)."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xD1B54A32D192ED03 + 1) & _MASK64


def _check_args(height, width, counts, min_patches, max_patches, min_aspect):
    if height < 1 or width < 1:
        raise ValueError(f"block_masks: grid must be at least 1×1, got height={height}, width={width}")
    if min_patches < 1:
        raise ValueError(f"block_masks: min_patches must be >= 1, got {min_patches}")
    if max_patches < min_patches:
        raise ValueError(f"block_masks: max_patches={max_patches} must be >= min_patches={min_patches}")
    if not 0.0 < min_aspect <= 1.0:
        raise ValueError(f"block_masks: min_aspect must be in (0, 1], got {min_aspect}")
    for c in counts:
        if not 0 <= c <= height * width:
            raise ValueError(f"block_masks: each count must be in [0, {height * width}], got {c}")


def _touches_mask(mask: bytearray, height: int, width: int, top: int, left: int, h: int, w: int) -> bool:
    """True if the rectangle overlaps the mask or shares an edge with a masked patch."""
    for i in range(max(0, top - 1), min(height, top + h + 1)):
        row_outside = i < top or i >= top + h
        for j in range(max(0, left - 1), min(width, left + w + 1)):
            if row_outside and (j < left or j >= left + w):
                continue           # a corner: touching diagonally does not join a block
            if mask[i * width + j]:
                return True
    return False


def _place_block(rng: SplitMix64, mask: bytearray, height: int, width: int, area_range: tuple[int, int],
                 budget: int, tries: int, log_aspect: tuple[float, float], trace: list | None) -> int:
    """Try up to ``tries`` blocks; return how many new patches the first useful one masked."""
    for _ in range(tries):
        area = rng.uniform(area_range[0], area_range[1])
        aspect = math.exp(rng.uniform(log_aspect[0], log_aspect[1]))
        h = int(math.sqrt(area * aspect) + 0.5)
        w = int(math.sqrt(area / aspect) + 0.5)
        if h < 1 or w < 1 or h > height or w > width:
            continue
        top = rng.randint(0, height - h)
        left = rng.randint(0, width - w)
        already = sum(mask[(top + i) * width + left + j] for i in range(h) for j in range(w))
        new = h * w - already
        if not 0 < new <= budget:  # never overshoot the target; overlap is fine
            continue
        if h * w == 1 and not _touches_mask(mask, height, width, top, left, 1, 1):
            continue               # a lone 1×1 block would be an isolated patch
        for i in range(h):
            row = (top + i) * width + left
            for j in range(w):
                mask[row + j] = 1
        if trace is not None:
            trace.append(("block", top, left, h, w))
        return new
    return 0


def _has_masked_neighbour(mask: bytearray, height: int, width: int, k: int) -> bool:
    i, j = divmod(k, width)
    return ((j > 0 and mask[k - 1]) or (j + 1 < width and mask[k + 1])
            or (i > 0 and mask[k - width]) or (i + 1 < height and mask[k + width]))


def _grow_at_edge(rng: SplitMix64, mask: bytearray, height: int, width: int, missing: int,
                  trace: list | None) -> None:
    """The rare shortfall: mask random unmasked neighbours of the mask (any patch if it is empty)."""
    n = height * width
    for _ in range(missing):
        edge = [k for k in range(n) if not mask[k] and _has_masked_neighbour(mask, height, width, k)]
        if not edge:
            edge = [k for k in range(n) if not mask[k]]
        k = edge[rng.randint(0, len(edge) - 1)]
        mask[k] = 1
        if trace is not None:
            trace.append(("patch", k // width, k % width, 1, 1))


def _one_mask(rng: SplitMix64, height: int, width: int, count: int, min_patches: int,
              max_patches: int, log_aspect: tuple[float, float], trace: list | None = None) -> bytearray:
    mask = bytearray(height * width)
    done = 0
    while done < count:
        budget = min(count - done, max_patches)
        if budget >= min_patches:
            delta = _place_block(rng, mask, height, width, (min_patches, budget), budget, MAX_TRIES,
                                 log_aspect, trace)
        else:                      # finishing block: may overlap the mask by up to min_patches - budget
            delta = _place_block(rng, mask, height, width, (budget, min_patches), budget, FINISH_TRIES,
                                 log_aspect, trace)
        if delta == 0:
            break
        done += delta
    if done < count:
        _grow_at_edge(rng, mask, height, width, count - done, trace)
    return mask


def block_masks_python(height: int, width: int, counts: list[int], min_patches: int = 4,
                       max_patches: int | None = None, min_aspect: float = 0.3, seed: int = 0,
                       traces: list | None = None) -> bytes:
    """Pure-Python twin of ``fasttips._native.block_masks``: ``len(counts)`` masks as 0/1 bytes.

    ``traces``: if a list, gets one list per image of the rectangles placed, as
    ("block" | "patch", top, left, h, w) (for tests of the block shapes)."""
    max_patches = (height * width) // 2 if max_patches is None else max_patches
    _check_args(height, width, counts, min_patches, max_patches, min_aspect)
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    out = bytearray()
    for i, c in enumerate(counts):
        rng = SplitMix64(image_seed(seed, i))
        trace = [] if traces is not None else None
        out += _one_mask(rng, height, width, int(c), min_patches, max_patches, log_aspect, trace)
        if traces is not None:
            traces.append(trace)
    return bytes(out)


def _native():
    try:
        from fasttips import _native
        return _native
    except ImportError:
        return None


def block_masks(height: int, width: int, counts, min_patches: int = 4, max_patches: int | None = None,
                min_aspect: float = 0.3, seed: int = 0, backend: str = "auto") -> np.ndarray:
    """Masks for each target count as a bool array [len(counts), height, width].

    ``backend``: "native" (C++; error if not built), "python", or "auto" (native when built).
    """
    if backend not in ("auto", "native", "python"):
        raise ValueError(f"block_masks: backend={backend!r}; choose 'auto', 'native' or 'python'")
    counts = [int(c) for c in counts]
    max_patches = (height * width) // 2 if max_patches is None else int(max_patches)
    native = _native() if backend != "python" else None
    if backend == "native" and native is None:
        raise RuntimeError("block_masks: backend='native' but fasttips._native is not built "
                           "(pip install -e . with a C++ compiler)")
    if native is not None:
        _check_args(height, width, counts, min_patches, max_patches, min_aspect)
        raw = native.block_masks(height, width, counts, min_patches, max_patches, float(min_aspect),
                                 seed & _MASK64)
    else:
        raw = block_masks_python(height, width, counts, min_patches, max_patches, min_aspect, seed)
    return np.frombuffer(raw, dtype=np.uint8).reshape(len(counts), height, width).astype(bool)


def stratified_counts(n_images: int, n_patches: int, probability: float, ratio: tuple[float, float],
                      rng: np.random.Generator) -> list[int]:
    """Per-image target counts for one batch (DINOv2 collate semantics), already shuffled."""
    n_masked = int(n_images * probability)
    lo, hi = ratio
    edges = np.linspace(lo, hi, n_masked + 1)
    counts = [int(n_patches * rng.uniform(edges[i], edges[i + 1])) for i in range(n_masked)]
    counts += [0] * (n_images - n_masked)
    return [counts[i] for i in rng.permutation(n_images)]


def batch_masks(n_images: int, grid: int, probability: float, ratio: tuple[float, float], seed: int,
                backend: str = "auto") -> torch.Tensor:
    """The iBOT masks of one batch's global crops: bool [n_images, grid*grid] (True = masked)."""
    rng = np.random.default_rng(seed)
    n_patches = grid * grid
    counts = stratified_counts(n_images, n_patches, probability, ratio, rng)
    masks = block_masks(grid, grid, counts, min_patches=4, max_patches=max(4, n_patches // 2),
                        seed=int(rng.integers(0, 2**63)), backend=backend)
    return torch.from_numpy(masks.reshape(n_images, n_patches))
