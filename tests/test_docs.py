"""The documents stay true to the config: every `section.field` key that README.md or docs/*.md names
exists (or is a retired key the config still recognises), and the documents the code relies on exist."""
import re
from pathlib import Path

import pytest

from fasttips import config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = {key.split(".")[0] for key in config.keys()}
# Dotted words in backticks that are not config keys: modules, attributes and placeholders.
NOT_CONFIG = {"fasttips", "torch", "tl", "triton", "np", "nn", "dist", "dcp", "os", "sys", "self", "metadata",
              "skimage", "nvidia", "fn", "types", "section", "shards", "mma", "head", "model", "teacher_head", "cfg", "args",
              # parameter names of the released TIPS / transformers / timm layouts (docs/interop.md)
              "attn", "ls1", "ls2", "mlp", "token_embedding", "timm"}
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "yaml", "yml", "png", "jpg", "jpeg", "tar", "idx", "txt", "pt",
                 "model", "toml", "sh", "distcp", "metadata", "cubin", "whl", "cfg", "log", "cpp", "html", "npz",
                 "safetensors", "jsonlines", "mat", "zip", "npy"}

# a known section followed by .name, not inside a longer dotted or path name, not a call
_SECTION_KEY = re.compile(r"(?<![\w./-])(%s)\.([a-z_][a-z0-9_]*)\b(?![.(/\w-])" % "|".join(sorted(SECTIONS)))
# any `a.b` at the start of a backtick span: how documents show a key (`loss.centering = "..."`)
_BACKTICK_KEY = re.compile(r"`([a-z_][a-z0-9_]*)\.([a-z_][a-z0-9_]*)(?=[`\s=:])")


def dotted_keys(text: str) -> set[str]:
    """The config-like `section.field` names a document mentions."""
    found = set()
    for pattern in (_SECTION_KEY, _BACKTICK_KEY):
        for section, name in pattern.findall(text):
            if section in NOT_CONFIG or name in FILE_SUFFIXES:
                continue
            found.add(f"{section}.{name}")
    return found


def unknown_keys(text: str) -> set[str]:
    known = set(config.keys()) | set(config.RETIRED)
    return {key for key in dotted_keys(text) if key not in known}


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_config_key_a_document_names_exists(doc):
    bad = unknown_keys(doc.read_text(encoding="utf-8"))
    assert not bad, f"{doc.relative_to(ROOT)} names config keys that do not exist: {sorted(bad)}"


def test_the_key_finder_catches_made_up_keys(tmp_path):
    doc = tmp_path / "made_up.md"
    doc.write_text('Use `contrastive.kind = "siglip"`, or set loss.temperature=0.1 and `ibot.masked_weight`;\n'
                   "`ema.schedule: constant` also works. Real: `loss.centering = \"softmax\"`, data.path, "
                   "`train.steps=3`.\nNot keys: `fasttips.kernels`, fasttips/train.py, `config.yaml`, "
                   "eval.json, `tl.dot`, data.loader(...).\n")
    assert unknown_keys(doc.read_text()) == {"contrastive.kind", "loss.temperature", "ibot.masked_weight",
                                             "ema.schedule"}
    assert {"loss.centering", "data.path", "train.steps"} <= dotted_keys(doc.read_text())


def test_the_documents_the_code_relies_on_exist():
    for name in ("DESIGN.md", "loss_math.md", "fsdp_and_checkpoints.md", "data.md", "kernels.md"):
        text = (ROOT / "docs" / name).read_text(encoding="utf-8")
        assert len(text) > 1000, name
    # the section numbers the code cites
    loss_math = (ROOT / "docs" / "loss_math.md").read_text(encoding="utf-8")
    for section in ("2.1", "2.2", "2.3", "2.4", "2.5", "2.7", "2.8", "2.9", "5.1", "5.2"):
        assert re.search(rf"^### {re.escape(section)} ", loss_math, re.M), f"loss_math.md lost §{section}"
    for section in ("## 4.", "## 7."):
        assert section in loss_math
    kernels = (ROOT / "docs" / "kernels.md").read_text(encoding="utf-8")
    for section in ("### 2.1 ", "### 4.2 ", "### 4.4 "):
        assert section in kernels, f"kernels.md lost {section}"
    assert "## 1. NVIDIA DALI" in (ROOT / "docs" / "data.md").read_text(encoding="utf-8")
    assert "### Tolerance note" in (ROOT / "docs" / "fsdp_and_checkpoints.md").read_text(encoding="utf-8")
