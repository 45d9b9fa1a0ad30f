"""The wheel users install: built from the source, installed into a fresh virtual environment, and run from there.

The machine may hold an editable install of varprune (a ``.pth`` line that puts some checkout's ``src`` on
``sys.path``). Nothing is downloaded (``pip install --no-deps --no-index``): torch and the other dependencies
come from wherever the interpreter running the tests finds them, through a ``.pth`` file in the new venv that
adds that interpreter's site-packages (and so their own ``.pth`` files) after the venv's own. Not
``--system-site-packages``: run from inside a venv, that means the base Python's site-packages, not the venv's
where the dependencies are (issue 26). The venv's own site-packages comes first on ``sys.path``, so the wheel
must shadow the editable copy. The test does not take that on trust: every command runs outside the checkout
with ``PYTHONPATH`` removed, and each one says which copy answered.
"""

import ast
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "varprune"

pytestmark = pytest.mark.slow


def source_version() -> str:
    """``__version__`` as the source states it (what setuptools' ``attr`` reads, statically)."""
    for node in ast.parse((SRC / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("no __version__ in src/varprune/__init__.py")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def run(args, cwd, env=None, timeout=120) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


SNIPPET = r"""
import json, sys
import varprune
from varprune import optim

loaded = {}
for name in varprune.__all__:
    value = getattr(varprune, name)
    assert value is not None, name
    module = getattr(value, "__module__", None)
    if module:
        loaded[name] = sys.modules[module].__file__
for name in optim.__all__:
    value = getattr(optim, name)
    assert callable(value), name
    loaded["optim." + name] = sys.modules[value.__module__].__file__
print(json.dumps({"file": varprune.__file__, "version": varprune.__version__, "loaded": loaded,
                  "all": list(varprune.__all__), "optim": list(optim.__all__)}))
"""


def test_the_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    import json
    import zipfile

    version = source_version()

    # build from a copy of what the wheel is made of, so the checkout gets no build/ or egg-info;
    # without isolation (no index needed) but with torch made unimportable: building must not import it
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(SRC, tree / "src" / "varprune", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch must not be needed to build varprune')\n")
    dist = tmp_path / "dist"
    run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, tree],
        cwd=tmp_path,
        env=clean_env(PYTHONPATH=str(blocker.parent)),
    )
    (wheel,) = dist.glob("*.whl")
    assert wheel.name == f"varprune-{version}-py3-none-any.whl"

    # every file of the package is in the wheel (a data file added later would need package-data)
    shipped = set(zipfile.ZipFile(wheel).namelist())
    source = {
        p.relative_to(SRC.parent).as_posix() for p in SRC.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    assert source - shipped == set(), f"not in the wheel: {sorted(source - shipped)}"
    assert f"varprune-{version}.dist-info/licenses/LICENSE" in shipped, "the wheel carries no LICENSE"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    python, script = venv / "bin" / "python", venv / "bin" / "varprune"
    own = run([python, "-c", "import site; print(site.getsitepackages()[0])"], cwd=tmp_path).stdout.strip()
    ours = [str(Path(d)) for d in site.getsitepackages()]  # where this interpreter's dependencies are
    (Path(own) / "zz-test-dependencies.pth").write_text(f"import site; list(map(site.addsitedir, {ours!r}))\n")
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=tmp_path)
    package = (venv / "lib").resolve()

    # the console script: its version is the package's own
    out = run([script, "--version"], cwd=tmp_path).stdout.strip()
    assert out == f"varprune {version}", out

    # doctor exits 0 and says which copy of varprune runs: the venv's
    out = run([script, "doctor"], cwd=tmp_path).stdout
    first = out.splitlines()[0]
    assert first.startswith(f"varprune:       {version} ("), first
    assert Path(first.split("(", 1)[1].rstrip(")")).resolve().is_relative_to(package), first

    # every public name imports, from the wheel's files and not from any checkout's src/
    for flags in ([], ["-I"]):  # as plain `python`, and isolated (no cwd, no user site, no PYTHON* variables)
        found = json.loads(run([python, *flags, "-c", SNIPPET], cwd=tmp_path).stdout)
        assert found["version"] == version
        assert Path(found["file"]).resolve().is_relative_to(package), found["file"]
        assert set(found["all"]) - {"__version__"} == {k for k in found["loaded"] if not k.startswith("optim.")}
        assert {"SAM", "CrAM", "S2SAM", "frozen_bn_stats", "is_two_pass"} <= set(found["optim"])
        outside = {k: v for k, v in found["loaded"].items() if not Path(v).resolve().is_relative_to(package)}
        assert not outside, f"loaded from outside the venv: {outside}"


def test_the_sdist_ships_the_tests_and_what_they_need(tmp_path):
    """An sdist is the source users can test: every file of tests/ (conftest.py and the helpers the tests
    import among them), what the tests read (docs/, CHANGELOG.md), the LICENSE and what the README names."""
    import tarfile

    tree = tmp_path / "tree"
    junk = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", "*.egg-info", "site", "runs", "build", "dist")
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "CHANGELOG.md", "Makefile", "mkdocs.yml"):
        tree.mkdir(exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    for folder in ("src", "tests", "docs", "scripts", "benchmarks"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=junk)
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", dist, tree], cwd=tmp_path)
    (sdist,) = dist.glob("*.tar.gz")
    top = f"varprune-{source_version()}/"
    with tarfile.open(sdist) as archive:
        shipped = {name.removeprefix(top) for name in archive.getnames()}
    wanted = {
        p.relative_to(tree).as_posix()
        for folder in ("tests", "docs", "scripts")
        for p in (tree / folder).rglob("*")
        if p.is_file()
    }
    assert {"tests/conftest.py", "tests/helpers.py", "docs/api.md"} <= wanted  # the check checks something
    assert wanted - shipped == set(), f"not in the sdist: {sorted(wanted - shipped)}"
    assert {"LICENSE", "CHANGELOG.md", "Makefile", "mkdocs.yml", "benchmarks/common.py"} <= shipped
    assert not [name for name in shipped if "__pycache__" in name or name.endswith(".pyc")]
