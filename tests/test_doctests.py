"""Every docstring example of the package runs: the doctests of each module, by installed name.

pytest's ``--doctest-modules`` imports a source file by its path: ``plugins/columnar.py``
would become a second module ``plugins.columnar`` beside ``agentstate.plugins.columnar``, the
name the ``package-dir`` mapping of pyproject.toml installs it under (its classes, gymnasium
registrations and pluggy hooks then exist twice). Here each module is imported by its
installed name and every docstring with examples is one test, named like pytest's
(``agentstate.metrics.returns``).
"""

from __future__ import annotations

import copy
import doctest
import importlib
import io
import pkgutil
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PACKAGES = ("agentstate", "agentstate.plugins", "agentstate.envs")
"""The installed packages whose modules are searched, subpackages included."""
OPTIONAL_DEPENDENCIES = frozenset({"ale_py", "cv2", "ray", "sb3_contrib", "stable_baselines3"})
"""Top-level modules of the optional extras; a module importing one is skipped without it."""
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def module_names() -> list[str]:
    """Every module of ``PACKAGES`` and their subpackages, by installed name."""
    names = set(PACKAGES)
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names.update(
            info.name for info in pkgutil.walk_packages(package.__path__, f"{package_name}.")
        )
    return sorted(names)


def docstring_examples() -> list:
    """One ``pytest.param`` per docstring with examples; a skip for a module lacking an extra."""
    finder = doctest.DocTestFinder()
    cases = []
    for name in module_names():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            missing = (error.name or "").partition(".")[0]
            if missing not in OPTIONAL_DEPENDENCIES:
                raise
            reason = f"{name} needs the optional {missing}"
            cases.append(pytest.param(None, id=name, marks=pytest.mark.skip(reason=reason)))
            continue
        cases += [
            pytest.param(test, id=test.name) for test in finder.find(module, name) if test.examples
        ]
    return cases


@pytest.mark.parametrize("example", docstring_examples())
def test_docstring_example_runs(example: doctest.DocTest, tmp_path, monkeypatch) -> None:
    # In a fresh folder with fresh globals, so examples neither leave files nor share names.
    monkeypatch.chdir(tmp_path)
    test = copy.copy(example)
    test.globs = dict(example.globs)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = io.StringIO()
    result = runner.run(test, out=report.write)
    if result.failed:
        pytest.fail(report.getvalue(), pytrace=False)


def test_every_installed_package_root_is_searched():
    with PYPROJECT.open("rb") as file:
        package_dir = tomllib.load(file)["tool"]["setuptools"]["package-dir"]
    assert set(package_dir) == set(PACKAGES)
