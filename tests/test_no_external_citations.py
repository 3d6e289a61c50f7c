"""The repository stands alone: no tracked file cites a document that lives outside it (the research
notes the project started from, or the ../shared folder). What the code relies on is in docs/."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ("reference_math.md", "kernel_anchors.md", "fsdp2_layout_notes.md", "data_notes.md",
           "hopper_review.md", "../shared", "/work/shared")
_CITATION = re.compile("|".join(re.escape(name) for name in OUTSIDE))
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()


def citations(text: str) -> list[str]:
    return _CITATION.findall(text)


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (an installed copy): nothing to scan")
    return [name for name in out.decode().split("\0") if name]


def test_no_tracked_file_cites_an_outside_document():
    found = {}
    for name in tracked_files():
        path = ROOT / name
        if name == THIS_FILE or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:                  # binary files (images, results) cite nothing
            continue
        lines = [i for i, line in enumerate(text.splitlines(), 1) if citations(line)]
        if lines:
            found[name] = lines
    assert not found, f"files citing documents outside the repository (file: lines): {found}"


def test_the_scan_recognises_each_outside_name():
    for name in OUTSIDE:
        assert citations(f"see `{name}` §2.1 for the math") == [name]
    assert citations("see docs/loss_math.md §2.1 and docs/kernels.md §4.2") == []
