"""The list of benchmark suites: one ``SuiteSpec`` per suite, nothing else.

A suite is a module ``fasttips.eval.suites.<module>`` with two functions:

    check_layout(root: Path, suite: str) -> None      # raise DatasetLayoutError naming the missing path
    run(ctx: SuiteContext, root: Path, suite: str) -> dict
        # {"metrics": {name: fraction}, "chance": {name: fraction}, ...counts...,
        #  optional "notes": [one-line strings printed under the table]}

Adding a suite = writing that module and one line in ``BUILTIN`` below (docs/eval_suites.md, "Adding
a suite"). The runner, the ``--suite`` parser, ``--data-root``/``--suite-root``, the table and
``suites.json`` all read this list. Modules are imported only when their suite is used.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class SuiteSpec:
    name: str              # what --suite takes
    module: str            # fasttips.eval.suites.<module> holds check_layout() and run()
    default_dir: str       # its folder under --data-root (override: --suite-root NAME=PATH)
    what: str              # one line for --help and the docs
    input: str = "image"   # which size option feeds the model: "image" (--image-size) or "seg" (--seg-size)
    text: bool = True      # uses the text tower (prompts, captions); False: runs without a tokenizer

    def load(self):
        return importlib.import_module(f"{__package__}.{self.module}")


BUILTIN = (
    SuiteSpec("imagenet", "imagenet", "imagenet", "ImageNet-1k val zero-shot classification, 1000-way"),
    SuiteSpec("coco", "retrieval", "coco", "COCO Karpathy test, image-text retrieval"),
    SuiteSpec("flickr30k", "retrieval", "flickr30k", "Flickr30k Karpathy test, image-text retrieval"),
    SuiteSpec("docci", "docci", "docci", "DOCCI test, long-description image-text retrieval"),
    SuiteSpec("ade20k", "segmentation", "ADEChallengeData2016", "ADE20K-150 zero-shot segmentation", "seg"),
    SuiteSpec("voc", "segmentation", "VOCdevkit/VOC2012", "Pascal VOC-20 zero-shot segmentation", "seg"),
    SuiteSpec("context", "segmentation", "VOCdevkit/VOC2010", "Pascal Context-59 zero-shot segmentation", "seg"),
    SuiteSpec("knn", "knn", "imagenet", "k-NN probe on frozen CLS features, k=20", text=False),
    SuiteSpec("linear", "linear", "imagenet", "ImageNet-1k linear probe on frozen CLS features", text=False),
    SuiteSpec("ade20k-linear", "seg_linear", "ADEChallengeData2016", "ADE20K-150 linear probe on patch tokens",
              "seg", text=False),
    SuiteSpec("voc-linear", "seg_linear", "VOCdevkit/VOC2012", "Pascal VOC-21 linear probe on patch tokens", "seg",
              text=False),
    SuiteSpec("nyu-depth", "nyu_depth", "nyu_depth_v2", "NYUv2 depth, linear probe (BTS layout)", "seg", text=False),
    SuiteSpec("nyu-normals", "nyu_normals", "nyuv2", "NYUv2 surface normals, linear probe (MTAN layout)", "seg",
              text=False),
)

REGISTRY: dict[str, SuiteSpec] = {s.name: s for s in BUILTIN}
