"""``EvalSet``: a held-out evaluation set in memory. Its own module so that the loaders
(``eval.data``) and the metrics (``eval.evaluate``) both import it without importing each other."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EvalSet:
    """A held-out set in memory.

    images:   float [N, 3, H, W], already normalised like training pixels
    captions: {"alt": [N str], "short": [N str], "long": [N str]} (any subset; empty strings allowed)
    class_names: the C class names of the segmentation / classification vocabulary (or empty)
    masks:    int [N, Hm, Wm] class index per pixel (IGNORE_INDEX = unlabelled), or None; any
              resolution (patch scores are upsampled to it), same aspect ratio as the images
    labels:   int [N] one class per image for zero-shot classification, or None
    classify_classes: indices of the classes that compete in classification (default: all; the demo
              leaves out "background", which is never an image's label)
    """
    images: torch.Tensor
    captions: dict[str, list[str]] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    masks: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)
    classify_classes: list[int] | None = None

    def __post_init__(self):
        n = self.images.shape[0]
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images: expected [N, 3, H, W], got {list(self.images.shape)}")
        for kind, texts in self.captions.items():
            if len(texts) != n:
                raise ValueError(f"captions[{kind!r}]: {len(texts)} captions for {n} images")
        if self.masks is not None and (self.masks.ndim != 3 or self.masks.shape[0] != n):
            raise ValueError(f"masks: expected [{n}, H, W] class indices, got {list(self.masks.shape)}")
        if (self.masks is not None or self.labels is not None) and not self.class_names:
            raise ValueError("class_names: needed when masks or labels are given")
        if self.labels is not None and tuple(self.labels.shape) != (n,):
            raise ValueError(f"labels: expected [{n}], got {list(self.labels.shape)}")
        if self.classify_classes is not None:
            if not self.classify_classes or not all(0 <= c < len(self.class_names) for c in self.classify_classes):
                raise ValueError(f"classify_classes: need indices into the {len(self.class_names)} class names, "
                                 f"got {self.classify_classes}")
            if self.labels is not None and not torch.isin(self.labels, torch.tensor(self.classify_classes)).all():
                raise ValueError("labels: every label must be one of classify_classes")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, n: int) -> "EvalSet":
        n = min(n, len(self))
        return EvalSet(self.images[:n], {k: v[:n] for k, v in self.captions.items()}, list(self.class_names),
                       None if self.masks is None else self.masks[:n],
                       None if self.labels is None else self.labels[:n], self.keys[:n],
                       self.classify_classes)
