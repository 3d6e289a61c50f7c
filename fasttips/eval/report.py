"""Evaluation results as JSON and as a short human-readable table."""
from __future__ import annotations

import json
import math
from pathlib import Path

# Row order and labels of the table; keys missing from a result are skipped.
TABLE_ROWS = (
    ("seg/miou", "zero-shot seg mIoU (patch vs class names)"),
    ("seg/pixel_acc", "zero-shot seg pixel accuracy"),
    ("seg/miou_fg", "zero-shot seg mIoU, objects only"),
    ("seg/pixel_acc_fg", "zero-shot seg pixel acc, objects only"),
    ("cls/cls1_acc", "zero-shot classification acc, CLS#1"),
    ("cls/cls2_acc", "zero-shot classification acc, CLS#2"),
    ("ret/cls1_alt/i2t_r1", "CLS#1 <-> alt-text  image->text R@1"),
    ("ret/cls1_alt/i2t_r5", "CLS#1 <-> alt-text  image->text R@5"),
    ("ret/cls1_alt/t2i_r1", "CLS#1 <-> alt-text  text->image R@1"),
    ("ret/cls1_alt/t2i_r5", "CLS#1 <-> alt-text  text->image R@5"),
    ("ret/cls2_short/i2t_r1", "CLS#2 <-> short cap image->text R@1"),
    ("ret/cls2_short/i2t_r5", "CLS#2 <-> short cap image->text R@5"),
    ("ret/cls2_short/t2i_r1", "CLS#2 <-> short cap text->image R@1"),
    ("ret/cls2_short/t2i_r5", "CLS#2 <-> short cap text->image R@5"),
    ("ret/cls2_long/i2t_r1", "CLS#2 <-> long cap  image->text R@1"),
    ("ret/cls2_long/i2t_r5", "CLS#2 <-> long cap  image->text R@5"),
    ("ret/cls2_long/t2i_r1", "CLS#2 <-> long cap  text->image R@1"),
    ("ret/cls2_long/t2i_r5", "CLS#2 <-> long cap  text->image R@5"),
)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:6.1f}"


def chance_levels(result: dict, eval_set) -> dict:
    """What a model guessing uniformly at random would score on the same set, key by key: retrieval
    R@k = k / n_images (one right answer among n), classification 1 / classes, and segmentation from the
    expected confusion matrix of uniform guesses over the candidate classes (so mIoU's chance level
    reflects how the pixels are spread over the classes)."""
    import torch

    from .metrics import IGNORE_INDEX, mean_iou, pixel_accuracy

    chance: dict = {}
    n = int(result.get("n_images", 0))
    eval_set = eval_set.subset(n)
    for key in result:
        if key.startswith("ret/") and "_r" in key and n > 0:
            k = int(key.rsplit("_r", 1)[1])
            chance[key] = min(1.0, k / n)
    if "cls/cls1_acc" in result:
        n_cls = len(eval_set.classify_classes or eval_set.class_names)
        chance["cls/cls1_acc"] = chance["cls/cls2_acc"] = 1.0 / n_cls
    if "seg/miou" in result and eval_set.masks is not None:
        labelled = eval_set.masks[eval_set.masks != IGNORE_INDEX].long()
        n_classes = len(eval_set.class_names)
        counts = torch.bincount(labelled, minlength=n_classes).double()

        def uniform_guess(candidates: list[int], pixels: torch.Tensor) -> dict:
            cm = torch.zeros(n_classes, n_classes, dtype=torch.float64)
            cm[:, candidates] = pixels[:, None] / len(candidates)
            return {"miou": mean_iou(cm), "pixel_acc": pixel_accuracy(cm)}

        every = uniform_guess(list(range(n_classes)), counts)
        chance["seg/miou"], chance["seg/pixel_acc"] = every["miou"], every["pixel_acc"]
        if "seg/miou_fg" in result and "background" in eval_set.class_names:
            bg = eval_set.class_names.index("background")
            objects = counts.clone()
            objects[bg] = 0
            fg = uniform_guess([c for c in range(n_classes) if c != bg], objects)
            chance["seg/miou_fg"], chance["seg/pixel_acc_fg"] = fg["miou"], fg["pixel_acc"]
    return chance


def table(columns: dict[str, dict], rows=TABLE_ROWS) -> str:
    """A fixed-width table, one column per named result (values in %). ``columns`` maps a column
    title (a run, a seed, "iBOT++ mean", "chance") to a result dict from ``evaluate``."""
    titles = list(columns)
    present = [(k, label) for k, label in rows if any(k in columns[t] for t in titles)]
    width = max([len(label) for _, label in present] + [6])
    colw = [max(8, len(t)) for t in titles]
    lines = [f"{'metric (%)':<{width}}  " + "  ".join(f"{t:>{w}}" for t, w in zip(titles, colw))]
    lines.append("-" * len(lines[0]))
    for key, label in present:
        cells = [f"{_fmt(columns[t].get(key)):>{w}}" for t, w in zip(titles, colw)]
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def write_json(path: str | Path, result: dict) -> None:
    def clean(v):   # JSON has no NaN: write null
        return None if isinstance(v, float) and math.isnan(v) else v
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({k: clean(v) for k, v in result.items()}, indent=2, sort_keys=True))
