"""The repository stands alone: no tracked file cites a document that lives outside it (the research
notes the project started from, or the shared folder beside the checkout). What the code relies on is
in docs/.

The outside names are kept as SHA-256 prefixes, not spelled out, so that this test does not cite them
either: the scan hashes every Markdown file name and every parent-relative or /work folder a line
mentions and looks the digest up."""
import hashlib
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# five research notes (*.md) and the two spellings of the shared folder's path
OUTSIDE_DIGESTS = frozenset({"7bcb85eda08667bc", "af12c694a5b7bebf", "82740e498dc8ddb6", "568f1e07cd5cad7d",
                             "bf66f299ebd91dd0", "9d5e33ea197579b6", "bbb98a33b1e04c2f"})
# what could name one: a Markdown file name, or a folder under .. or /work
_CANDIDATE = re.compile(r"[\w-]+\.md\b|(?:\.\./|/work/)[\w-]+")


def digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def citations(text: str, outside=OUTSIDE_DIGESTS) -> list[str]:
    return [name for name in _CANDIDATE.findall(text) if digest(name) in outside]


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
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:                  # binary files (images, results) cite nothing
            continue
        lines = [i for i, line in enumerate(text.splitlines(), 1) if citations(line)]
        if lines:
            found[name] = lines
    assert not found, f"files citing documents outside the repository (file: lines): {found}"


def test_the_scan_recognises_each_kind_of_outside_name():
    """The mechanism, on made-up outside names: a note's file name and both spellings of a folder."""
    made_up = ("old_notes.md", "../elsewhere", "/work/elsewhere")
    outside = frozenset(digest(n) for n in made_up)
    for name in made_up:
        assert citations(f"see `{name}` §2.1 for the math", outside) == [name]
    assert citations("see docs/loss_math.md §2.1 and docs/kernels.md §4.2", outside) == []
    assert len(OUTSIDE_DIGESTS) == 7 and all(len(d) == 16 for d in OUTSIDE_DIGESTS)
