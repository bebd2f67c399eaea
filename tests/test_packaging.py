"""Packaging: the version is stated once in effect (pyproject.toml and ``flowalign.__version__`` agree), and the sdist
(MANIFEST.in) holds what the test suite and the README's main job need while the wheel holds the package only."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import flowalign

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("flowalign", "rewards", "samplers")  # pyproject's package-dir: what the wheel ships


def _pyproject() -> str:
    path = REPO / "pyproject.toml"
    if not path.is_file():
        pytest.skip("no pyproject.toml next to tests/ (not a source checkout or sdist)")
    return path.read_text(encoding="utf-8")


def _project_version(text: str, toml: bool = sys.version_info >= (3, 11)) -> str:
    if toml:
        import tomllib

        return tomllib.loads(text)["project"]["version"]
    section = re.search(r"^\[project\]\s*$(.*?)(?=^\[)", text + "\n[", re.M | re.S)  # Python 3.10: no tomllib
    assert section, "pyproject.toml has no [project] table"
    match = re.search(r"""^version\s*=\s*["']([^"']+)["']""", section.group(1), re.M)
    assert match, "pyproject.toml's [project] table states no version"
    return match.group(1)


def test_the_version_in_pyproject_is_flowalign_version():
    """Both are hard-coded: a release that bumps one and not the other ships a wheel whose metadata and
    ``flowalign.__version__`` disagree."""
    version = _project_version(_pyproject())
    assert version == flowalign.__version__, (
        f"pyproject.toml says {version!r}, flowalign/__init__.py says {flowalign.__version__!r}: bump both")


def test_the_regex_fallback_reads_the_same_version():
    """The Python 3.10 path (no tomllib) reads the version the TOML parser reads."""
    text = _pyproject()
    assert _project_version(text, toml=False) == flowalign.__version__
    if sys.version_info >= (3, 11):
        assert _project_version(text, toml=False) == _project_version(text, toml=True)
    other = '[tool.x]\nversion = "1"\n[project]\nname = "x"\nversion = "9.8.7"\n[tool.y]\nversion = "2"\n'
    assert _project_version(other, toml=False) == "9.8.7"


def _manifest_files() -> set[str]:
    """The files MANIFEST.in adds to the sdist, selected by setuptools' own template machinery (no build)."""
    from setuptools.command.egg_info import FileList

    manifest = REPO / "MANIFEST.in"
    if not manifest.is_file():
        pytest.fail("MANIFEST.in is missing: the sdist would hold tests/test_*.py without their helpers and fixtures")
    files = FileList()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        for line in manifest.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                files.process_template_line(line.strip())
    return set(files.files)


def _tree(folder: str) -> set[str]:
    return {p.relative_to(REPO).as_posix() for p in (REPO / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")}


def test_the_sdist_holds_the_tests_their_helpers_and_the_main_job():
    """Without MANIFEST.in setuptools put tests/test_*.py in the sdist but not what they import (conftest.py,
    tiny_models.py, tiny_rewards.py, reward_fixtures.py, gaussian_world.py, cli_checks.py, tests/fixtures/**), nor
    configs/ (`make demo` trains configs/shapes_grpo.yaml), the Makefile, docs/ or .ci/."""
    files = _manifest_files()
    needed = _tree("tests") | _tree("configs") | _tree("docs") | _tree(".ci") | {"README.md", "Makefile"}
    for helper in ("conftest.py", "tiny_models.py", "tiny_rewards.py", "reward_fixtures.py", "gaussian_world.py",
                   "cli_checks.py"):
        assert f"tests/{helper}" in needed
    assert any(f.startswith("tests/fixtures/") for f in needed) and "configs/shapes_grpo.yaml" in needed
    missing = sorted(needed - files)
    assert not missing, f"MANIFEST.in leaves these out of the sdist: {missing}"
    # every config the README and the Makefile name is shipped
    named = set()
    for doc in ("README.md", "Makefile"):
        named |= set(re.findall(r"\bconfigs/[\w.-]+\.yaml\b", (REPO / doc).read_text(encoding="utf-8")))
    assert named and not sorted(named - files), sorted(named - files)


def test_the_manifest_adds_nothing_inside_the_packages():
    """pyproject's setuptools config includes package data by default: a MANIFEST.in line reaching into flowalign/,
    rewards/ or samplers/ would put its files in the wheel, which ships the package and its assets only."""
    if sys.version_info >= (3, 11):  # the folders the packages come from are the ones checked here
        import tomllib

        setuptools_cfg = tomllib.loads(_pyproject())["tool"]["setuptools"]
        assert set(setuptools_cfg["package-dir"].values()) <= set(PACKAGE_DIRS)
        assert all(p.split(".")[0] == "flowalign" for p in setuptools_cfg["packages"]), setuptools_cfg["packages"]
    inside = sorted(f for f in _manifest_files() if f.split("/", 1)[0] in PACKAGE_DIRS)
    assert not inside, f"MANIFEST.in adds files inside a package (they would be in the wheel): {inside}"


def test_no_unused_extras():
    """An extra nothing used (`xformers`) was declared; every extra must be named where users read how to install."""
    if sys.version_info < (3, 11):
        pytest.skip("reads pyproject.toml with tomllib")
    import tomllib

    extras = tomllib.loads(_pyproject())["project"].get("optional-dependencies", {})
    docs = "\n".join(p.read_text(encoding="utf-8") for p in [REPO / "README.md", REPO / "Makefile",
                                                             *sorted((REPO / "docs").glob("*.md"))])
    for name in extras:
        assert re.search(rf"\[{re.escape(name)}\]", docs), f"extra {name!r} is not mentioned in README/Makefile/docs"
