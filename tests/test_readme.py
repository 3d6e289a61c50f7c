"""The README stays true: its test command is the one CI runs, and its config reference is complete."""
import re
import subprocess
import sys
from pathlib import Path

from fasttips import config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = "TRITON_INTERPRET=1 python -m pytest -q tests"
    assert command in ci.splitlines(), ".ci/run must run the README's test command verbatim"
    assert command in README


def test_readme_config_reference_matches_the_code():
    block = re.search(r"<!-- config-reference:start -->\n```text\n(.*?)\n```\n<!-- config-reference:end -->",
                      README, re.S)
    assert block, "README lost its config-reference block"
    assert block.group(1) == config.describe(), (
        "README config reference is stale: regenerate it from `python -m fasttips.config`")


def test_readme_quick_start_runs_fasttips_train():
    assert "fasttips train" in README and 'pip install -e ".[test]"' in README


def test_python_m_fasttips_config_prints_the_reference():
    out = subprocess.run([sys.executable, "-m", "fasttips.config"], capture_output=True, text=True,
                         check=True).stdout
    assert out.rstrip("\n") == config.describe()
