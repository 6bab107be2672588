"""The wheel ships every module and data file of the package, and runs once installed.

The package is installed editable on a development machine, which hides a wheel that leaves
something out; these tests build the wheel and run it from a fresh virtual environment.
"""

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from zipfile import ZipFile

import pytest

from agentstate import fused
from agentstate.plugins.columnar import COLUMNS_KERNEL

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = {
    "agentstate": "agentstate",
    "plugins": "agentstate/plugins",
    "envs": "agentstate/envs",
}
"""Source folder -> its place in the wheel, as ``package-dir`` in pyproject.toml maps them."""
BUILT_IN_LEARNERS = ("columnar", "ccn", "elstm", "tbptt", "uoro", "rtrl", "snap1")
IMPORTED_PACKAGES = (
    "agentstate",
    "agentstate.wrappers",
    "agentstate.commands",
    "agentstate.plugins",
    "agentstate.envs",
)

WHERE_FROM = (
    "import importlib, json, sys; "
    "print(json.dumps({name: importlib.import_module(name).__file__ for name in sys.argv[1:]}))"
)
"""Script printing the file each package named on its command line imports from."""

pytestmark = pytest.mark.expensive


def source_files() -> set[str]:
    """Wheel paths of every file under the source roots: modules, ``py.typed``, kernels."""
    return {
        f"{target}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, target in SOURCE_ROOTS.items()
        for path in (ROOT / folder).rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and not any(part.startswith(".") for part in path.relative_to(ROOT).parts)
    }


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``command`` and return its stdout; fail the test with its stderr if it fails."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the repository.

    A build in the working tree would leave ``build/`` there, and setuptools ships whatever
    a stale ``build/lib`` holds: a forgotten subpackage would pass unnoticed.
    """
    scratch = tmp_path_factory.mktemp("wheel")
    source = scratch / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "runs"),
    )
    pip_wheel = ["pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    run([sys.executable, "-m", *pip_wheel, "-w", str(scratch / "dist"), str(source)], scratch)
    (built,) = (scratch / "dist").glob("agentstate-*.whl")
    return built


def test_wheel_ships_every_source_file_under_agentstate(wheel: Path) -> None:
    with ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    missing = source_files() - shipped
    assert not missing, f"the wheel leaves out {sorted(missing)}"
    top_level = {name.split("/")[0] for name in shipped}
    (dist_info,) = {name for name in top_level if name.endswith(".dist-info")}
    assert top_level == {"agentstate", dist_info}, "nothing but agentstate installs at the top"


def test_wheel_installs_and_runs_from_a_fresh_environment(wheel: Path, tmp_path: Path) -> None:
    # System site-packages bring pip, torch and the rest. They also hold the editable install,
    # whose finder is appended to sys.meta_path, after the path-based finder that searches the
    # venv's site-packages first: the wheel's agentstate wins, as the imports below check.
    environment = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(environment)
    python = environment / "bin" / "python"
    outside = tmp_path / "elsewhere"  # not the repository, whose agentstate/ would import first
    outside.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["AGENTSTATE_CACHE_DIR"] = str(tmp_path / "cache")
    # The editable install counts as agentstate 0.1.0 already there; pip reinstalls into the
    # venv and leaves that one, being outside the venv, alone.
    pip_install = ["pip", "install", "--no-deps", "--no-index", "--force-reinstall"]
    run([str(python), "-m", *pip_install, str(wheel)], outside, env)

    imported = json.loads(run([str(python), "-c", WHERE_FROM, *IMPORTED_PACKAGES], outside, env))
    for name, file in imported.items():
        assert Path(file).resolve().is_relative_to(environment.resolve()), f"{name}: {file}"

    agentstate = str(environment / "bin" / "agentstate")
    listing = run([agentstate, "learners"], outside, env)
    listed = {line.split()[0] for line in listing.splitlines()[1:] if line.strip()}
    assert set(BUILT_IN_LEARNERS) <= listed

    out = tmp_path / "run"
    short_run = "run trace-patterning --steps 2000 --streams 2 --no-progress".split()
    run([agentstate, *short_run, "--out", str(out)], outside, env)
    assert (out / "metrics.csv").is_file()
    if fused.load_kernel(COLUMNS_KERNEL) is not None:  # this toolchain builds kernels: so must
        assert list((tmp_path / "cache" / "kernels").glob("td_columns-*.so"))  # the wheel
