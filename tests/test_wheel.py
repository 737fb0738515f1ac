"""Packaging (10 to 30 s): the wheel holds passes/, targets/ and configs/ inside the autoglm_compile namespace, and
installed into a fresh virtualenv it works from outside the repository.

The fresh venv sees the dependencies already installed in this one through a .pth file holding this venv's
site-packages path. A plain path line does not run the editable-install finder there, so autoglm_compile can only
come from the wheel."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import onnx
import pytest

from autoglm_compile.pass_manager import registered_passes
from conftest import conv_net

REPO = Path(__file__).resolve().parents[1]
# Build outputs and environments are not sources: copying them would put stale files in the wheel.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                     ".cache", ".tvmrt", ".tvmdev", ".whl")

pytestmark = pytest.mark.packaging  # builds a wheel and installs it into a fresh venv: 10 to 30 s


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"  # build from a copy so the build writes nothing into the repository
    shutil.copytree(REPO, src, ignore=NOT_SOURCES)
    run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", root / "dist"], cwd=src)
    (whl,) = (root / "dist").glob("autoglm_compile-*.whl")
    return whl


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"autoglm_compile", "autoglm_compile-0.1.0.dist-info"}
    assert not {"passes", "targets", "configs"} & top
    for py in sorted(p.name for p in (REPO / "passes").glob("*.py")):
        assert f"autoglm_compile/passes/{py}" in names
    for yaml_file in sorted(p.name for p in (REPO / "targets").glob("*.yaml")):
        assert f"autoglm_compile/targets/{yaml_file}" in names
    for yaml_file in sorted(p.name for p in (REPO / "configs").glob("*.yaml")):
        assert f"autoglm_compile/configs/{yaml_file}" in names
    for yaml_file in sorted(p.name for p in (REPO / "targets" / "ops").glob("*.yaml")):  # the NPU op lists
        assert f"autoglm_compile/targets/ops/{yaml_file}" in names
    assert {"autoglm_compile/runners/runner.py", "autoglm_compile/runners/build_magicmind.py"} <= set(names)
    assert "autoglm_compile/targets/host.yaml" in names and "autoglm_compile/configs/O2.yaml" in names
    assert "autoglm_compile/passes/fold_constants.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "autoglm-compile = autoglm_compile.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_in_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    python, cli = venv / "bin" / "python", venv / "bin" / "autoglm-compile"
    fresh_site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    ours = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    assert all(Path(p).resolve() != fresh_site.resolve() for p in ours)
    (fresh_site / "deps_from_dev_venv.pth").write_text("".join(f"{p}\n" for p in ours))
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel])

    outside = tmp_path / "elsewhere"  # not the repository, so nothing is imported from the source tree
    outside.mkdir()
    files = json.loads(run([python, "-c", "import json, autoglm_compile, autoglm_compile.passes, autoglm_compile.configs; "
                                          "print(json.dumps([autoglm_compile.__file__, autoglm_compile.passes.__file__, "
                                          "autoglm_compile.configs.__file__]))"], cwd=outside).stdout)
    for f in files:
        assert Path(f).resolve().is_relative_to(fresh_site.resolve()), f
    assert not (fresh_site / "passes").exists() and not (fresh_site / "targets").exists() and not (fresh_site / "configs").exists()

    passes = json.loads(run([cli, "passes", "--json"], cwd=outside).stdout)
    builtin = [n for n, c in registered_passes().items() if c.__module__.startswith("autoglm_compile.passes.")]
    assert list(passes) == builtin  # every pass of passes/ was installed and found
    assert all(p["module"].startswith("autoglm_compile.passes.") for p in passes.values())
    targets = json.loads(run([cli, "targets", "--json"], cwd=outside).stdout)
    assert targets["host"]["kind"] == "cpu" and targets["host"]["cpu"]["triple"]

    # The installed tool compiles a model with its packaged O2 config and host target, and runs the artifact.
    onnx.save(conv_net(batch=1), str(outside / "conv.onnx"))
    report = json.loads(run([cli, "conv.onnx", "-o", "out", "--runs", "1", "--json", "--quiet"], cwd=outside).stdout)
    assert report["accuracy"]["ok"] and report["config"] == "O2" and report["result"] == "ok"
    run([cli, "run", "out", "--check"], cwd=outside)
