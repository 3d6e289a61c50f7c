"""Packaging rules: kernels/ is only ever `fasttips.kernels`, and every package is listed."""
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL_KERNELS = re.compile(r"^\s*(import\s+kernels\b|from\s+kernels\b)", re.M)


def test_nothing_imports_a_top_level_kernels_package():
    offenders = []
    for folder in ("fasttips", "kernels", "tests", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            if TOP_LEVEL_KERNELS.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"these files import a top-level 'kernels' (use fasttips.kernels): {offenders}"


def test_importing_fasttips_kernels_does_not_create_a_top_level_kernels_module():
    code = ("import sys, fasttips.kernels, fasttips.kernels.attention.reference; "
            "print('kernels' in sys.modules, fasttips.kernels.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd="/").stdout.split()
    assert out[0] == "False", "a top-level 'kernels' module was imported"
    assert Path(out[1]).resolve().parent == (ROOT / "kernels").resolve() or "site-packages" in out[1]



FAKE_HUB_KERNELS = "CUDAProperties = 'the other package'\n"


def _import_kernels_from_the_root(pythonpath: str, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_top_level_kernels_import_from_the_repository_root_gets_the_other_package(tmp_path):
    """With the repository root first on sys.path (python -c / -m / pytest run from it), 'import kernels'
    must reach the package of that name (Hugging Face's, which transformers imports), not kernels/."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text(FAKE_HUB_KERNELS)
    code = ("import kernels, fasttips.kernels as fk; from kernels import CUDAProperties; "
            "print(CUDAProperties); print(kernels.__file__); print(fk.attention.__module__)")
    done = _import_kernels_from_the_root(str(tmp_path), code)
    assert done.returncode == 0, done.stderr[-2000:]
    name, where, ops = done.stdout.splitlines()
    assert name == "the other package"
    assert Path(where).resolve() == (tmp_path / "kernels" / "__init__.py").resolve()
    assert ops == "fasttips.kernels.ops"          # fasttips' own ops are untouched


def test_a_top_level_kernels_import_without_the_other_package_is_an_import_error(tmp_path):
    code = ("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
            "try:\n    import kernels\nexcept ImportError as e:\n    print('ImportError', e.name, 'kernels' in sys.modules)")
    done = _import_kernels_from_the_root("", code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[:3] == ["ImportError", "kernels", "False"]

def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = set()
    for package, folder in cfg["package-dir"].items():      # fasttips.kernels lives in kernels/, ...
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join(tuple(package.split(".")) + rel.parts))
    missing = sorted(found - listed)
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"
    stale = sorted(listed - found)
    assert not stale, f"pyproject.toml lists packages with no __init__.py: {stale}"


def test_cli_lists_commands_and_rejects_unknown_ones(capsys):
    from fasttips.cli import main
    assert main([]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err



def _pip_dry_run(*requirements: str) -> subprocess.CompletedProcess:
    """Resolve requirements against the package index without installing them (metadata only)."""
    return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps",
                           "--ignore-installed", "--disable-pip-version-check", *requirements],
                          capture_output=True, text=True, timeout=300)


def test_every_extra_resolves_on_the_package_index():
    """Each optional extra names packages that exist on the index in a matching version and whose metadata
    builds (the old `flash` extra, a source distribution needing torch at build time, fails here).
    One pip call for all extras; skipped only when the index is unreachable."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    requirements = sorted({r for reqs in extras.values() for r in reqs})
    done = _pip_dry_run(*requirements)
    if done.returncode != 0 and _pip_dry_run("pip").returncode != 0:
        import pytest
        pytest.skip(f"package index unreachable: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, f"extras {sorted(extras)} do not resolve:\n{done.stderr.strip()[-1500:]}"


CONSTRAINTS = ROOT / ".ci" / "constraints.txt"


def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f".ci/constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version
    return pins


def _installed_closure(extras=("test", "dali")) -> dict[str, str]:
    """Every installed distribution that `pip install -e ".[test,dali]"` pulls in, by name → version:
    fasttips' requirements with those extras, then theirs (with the extras asked of them), recursively."""
    from importlib import metadata
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    seen: dict[str, str] = {}
    todo = [(req, extra) for req in metadata.requires("fasttips") or [] for extra in ("",) + tuple(extras)]
    while todo:
        text, extra = todo.pop()
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue    # optional on this platform; pip did not install it either
        if name in seen:
            continue
        seen[name] = dist.version
        todo += [(r, e) for r in dist.requires or [] for e in ("",) + tuple(req.extras)]
    return seen


def test_ci_installs_every_package_under_the_constraints_file():
    ci = (ROOT / ".ci" / "run").read_text()
    installs = [line for line in ci.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert installs and all('"${pins[@]}"' in line for line in installs), installs
    assert 'CONSTRAINTS="${FASTTIPS_CI_CONSTRAINTS-.ci/constraints.txt}"' in ci


def test_user_installs_stay_unpinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for reqs in project["optional-dependencies"].values() for r in reqs]
    from packaging.requirements import Requirement
    pinned = [r for r in requirements if any(s.operator in ("==", "===") for s in Requirement(r).specifier)]
    assert not pinned, f"pin in .ci/constraints.txt, not in pyproject.toml: {pinned}"


def test_constraints_pin_every_package_the_test_install_pulls():
    """A new dependency of a new release (transformers 5.25 brought `kernels`) must be pinned too, or the
    next clean clone resolves it afresh; in CI (.ci/run) the installed versions are the pinned ones."""
    pins, closure = _pins(), _installed_closure()
    assert {"torch", "transformers", "triton", "pytest"} <= set(closure)       # the walk found the install
    unpinned = sorted(set(closure) - set(pins))
    assert not unpinned, f"add to .ci/constraints.txt (or run `bash .ci/newest`): {unpinned}"
    if os.environ.get("FASTTIPS_CI_CONSTRAINTS"):
        from packaging.version import Version
        off = {n: (v, pins[n]) for n, v in closure.items() if Version(v).public != Version(pins[n]).public}
        assert not off, f"installed (version, pin) differ from .ci/constraints.txt: {off}"


def test_the_pinned_test_install_resolves_on_the_package_index():
    """The pins name releases that exist and agree with each other and with pyproject's ranges."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["test"] + \
        project["optional-dependencies"]["dali"]
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                           "--disable-pip-version-check", "-c", str(CONSTRAINTS), *wanted],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and _pip_dry_run("pip").returncode != 0:
        import pytest
        pytest.skip(f"package index unreachable: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, f"the pinned install does not resolve:\n{done.stderr.strip()[-1500:]}"
