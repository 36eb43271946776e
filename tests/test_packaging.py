"""Packaging (SPEC §1): one distribution ``cplfast``; kernels/ and export/ install as cplfast.kernels / cplfast.export.

The explicit ``packages`` list in pyproject.toml must name every package directory, or an installed
(non-editable) copy silently lacks it.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import cplfast

REPO = Path(__file__).resolve().parents[1]
# top-level source folder -> the package name it installs as
SOURCE_ROOTS = {"cplfast": "cplfast", "kernels": "cplfast.kernels", "export": "cplfast.export"}

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


@pytest.fixture(scope="module")
def setuptools_config() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def package_directories() -> dict[str, Path]:
    """Every directory holding an ``__init__.py`` under the source roots, by the package name it installs as."""
    found = {}
    for folder, package in SOURCE_ROOTS.items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            relative = init.parent.relative_to(root).parts
            found[".".join((package, *relative))] = init.parent
    return found


def test_every_package_directory_is_listed(setuptools_config):
    listed = set(setuptools_config["packages"])
    missing = sorted(set(package_directories()) - listed)
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_every_listed_package_is_a_directory_with_init(setuptools_config):
    dirs = setuptools_config.get("package-dir", {})
    for package in setuptools_config["packages"]:
        # the longest package-dir prefix decides where the package lives
        prefix = max((p for p in dirs if package == p or package.startswith(p + ".")), key=len, default=None)
        assert prefix is not None, f"{package} is not under any package-dir entry"
        folder = REPO / dirs[prefix] / Path(*package[len(prefix):].split(".")[1:])
        assert (folder / "__init__.py").is_file(), f"{package} is listed but {folder}/__init__.py does not exist"


def test_kernels_and_export_install_under_cplfast_only(setuptools_config):
    dirs = setuptools_config.get("package-dir", {})
    assert dirs.get("cplfast.kernels") == "kernels"
    assert dirs.get("cplfast.export") == "export"
    assert "" not in dirs, "a root package-dir would expose kernels/ and export/ as top-level modules"
    packages = setuptools_config["packages"]
    assert isinstance(packages, list), "packages must be an explicit list, not a find: directive"
    assert all(p == "cplfast" or p.startswith("cplfast.") for p in packages), packages
    assert "py-modules" not in setuptools_config


@pytest.mark.parametrize("module,folder", [("cplfast.kernels", "kernels"), ("cplfast.export", "export")])
def test_subpackage_resolves_to_the_repository_folder(module, folder):
    imported = importlib.import_module(module)
    location = Path(imported.__file__).resolve()
    if Path(cplfast.__file__).resolve().parent == REPO / "cplfast":
        # editable install (or running from the checkout): the repository's own folder
        assert location == REPO / folder / "__init__.py"
    else:
        # an installed copy: the same file, placed under the installed cplfast
        assert location == Path(cplfast.__file__).resolve().parent / folder / "__init__.py"
        assert location.read_bytes() == (REPO / folder / "__init__.py").read_bytes()


def test_installed_distribution_declares_only_cplfast_at_top_level():
    from importlib import metadata

    # dist-info directories only: a cplfast.egg-info left in the checkout lists source paths, not installed ones
    installed = [d for d in metadata.distributions(name="cplfast") if str(getattr(d, "_path", "")).endswith(".dist-info")]
    if not installed:
        pytest.skip("cplfast is not installed (running from the checkout)")
    for dist in installed:
        top_level = dist.read_text("top_level.txt")
        if top_level is not None:
            assert top_level.split() == ["cplfast"]
        for file in dist.files or []:
            assert file.parts[0] not in ("kernels", "export"), f"the installed distribution ships a top-level {file}"


def test_no_top_level_kernels_or_export_module_outside_the_checkout(tmp_path):
    """From another directory, cplfast.kernels / cplfast.export import and bare kernels / export do not."""
    code = """
import importlib.util, json, cplfast.kernels, cplfast.export
found = {}
for name in ("kernels", "export"):
    spec = importlib.util.find_spec(name)
    found[name] = None if spec is None else str(spec.origin or list(spec.submodule_search_locations or []))
print(json.dumps(found))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0 and "No module named 'cplfast'" in result.stderr:
        pytest.skip("cplfast is not installed")
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for name, origin in found.items():
        assert origin is None or str(REPO) not in origin, f"'import {name}' resolves to the checkout: {origin}"


@pytest.mark.slow
def test_built_wheel_holds_one_top_level_package(tmp_path):
    """Build a wheel from a copy of the sources (no network, no build isolation) and inspect it."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in SOURCE_ROOTS:
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("cplfast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"cplfast"}
    for package, folder in package_directories().items():
        assert "/".join(package.split(".")) + "/__init__.py" in names, f"{package} ({folder}) missing from the wheel"
