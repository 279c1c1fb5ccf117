"""The sandbox side: the standard-library-only subpackage that is all a sandbox sees of aosbuild.

`aosbuild/sandboxside/` is bound into every sandbox as the package `aosbuild`, so it must import nothing
outside the standard library (the build root's python3 has none of the engine's dependencies) and nothing
of the engine (which is not there), and stages and runners can import only what it holds.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from aosbuild import sandbox

from .conftest import REPO, Aosbuild, manifest, pipeline, stage

PACKAGE = REPO / "aosbuild"
SIDE = sandbox.SANDBOX_SIDE_DIR
SIDE_MODULES = {path.stem for path in SIDE.glob("*.py")} - {"__init__"}


def foreign_imports(source: str, modules: set[str]) -> list[str]:
    """The imports in `source` (a module of the sandbox side) that are neither the standard library nor,
    relatively, one of `modules`; every import counts, also those in functions and `TYPE_CHECKING`."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            bad += [alias.name for alias in node.names if alias.name.split(".")[0] not in sys.stdlib_module_names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if (node.module or "").split(".")[0] not in sys.stdlib_module_names:
                    bad.append(node.module or "")
            elif node.level > 1:
                bad.append("." * node.level + (node.module or ""))
            elif node.module is not None:  # `from .x import y`
                if node.module.split(".")[0] not in modules:
                    bad.append(f".{node.module}")
            else:  # `from . import x`
                bad += [f".{alias.name}" for alias in node.names if alias.name not in modules]
    return bad


def test_the_checker_sees_each_kind_of_foreign_import() -> None:
    modules = {"stageapi", "runnerlib"}
    assert foreign_imports("import os, json\nfrom . import stageapi\nfrom .runnerlib import mount\n"
                           "def f():\n    import ctypes\n", modules) == []
    source = ("import anyio\nfrom aosbuild import builder\nfrom .. import rpc\nfrom . import sandbox\n"
              "from .store import fscache\nTYPE_CHECKING = False\nif TYPE_CHECKING:\n    import structlog\n"
              "def f():\n    from aosbuild.stageapi import run\n")
    assert sorted(foreign_imports(source, modules)) == sorted(
        ["anyio", "aosbuild", "..", ".sandbox", ".store", "structlog", "aosbuild.stageapi"])


@pytest.mark.parametrize("path", sorted(SIDE.glob("*.py")), ids=lambda path: path.name)
def test_sandbox_side_imports_only_the_standard_library_and_itself(path: Path) -> None:
    assert foreign_imports(path.read_text(), SIDE_MODULES) == []


def bundled_scripts() -> list[Path]:
    folders = [REPO / "stages", REPO / "runners", REPO / "assemblers", REPO / "tests" / "lib" / "stages"]
    return sorted(path for folder in folders for path in folder.iterdir()
                  if path.is_file() and path.read_bytes().startswith(b"#!/usr/bin/python3"))


def test_bundled_stages_and_runners_import_only_the_sandbox_side() -> None:
    """What a stage or runner imports of `aosbuild` must be in the sandbox side, or it fails in the sandbox."""
    scripts = bundled_scripts()
    assert len(scripts) > 40
    wrong = []
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "aosbuild":
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aosbuild."):
                names = [(node.module or "").split(".")[1]]
            elif isinstance(node, ast.Import):
                names = [alias.name.split(".")[1] for alias in node.names if alias.name.startswith("aosbuild.")]
            else:
                continue
            wrong += [f"{path.relative_to(REPO)}: aosbuild.{name}" for name in names if name not in SIDE_MODULES]
    assert wrong == []


def test_every_sandbox_side_module_gets_bytecode() -> None:
    assert set(sandbox.STAGE_SIDE_MODULES) == {path.name for path in SIDE.glob("*.py")}


def aosbuild_binds(argv: list[str]) -> list[tuple[str, str]]:
    """The (source, target) of each bind in a bwrap argv whose source is inside aosbuild's package."""
    binds = []
    for i, arg in enumerate(argv):
        if arg in ("--bind", "--ro-bind", "--ro-bind-try", "--dev-bind") and Path(argv[i + 1]).is_relative_to(PACKAGE):
            binds.append((argv[i + 1], argv[i + 2]))
    return binds


def spec(tmp_path: Path, **extra: object) -> sandbox.SandboxSpec:
    return sandbox.SandboxSpec(build_root=Path("/"), tree=tmp_path, executable=REPO / "stages" / "org.osbuild.noop",
                               runner=REPO / "runners" / "org.osbuild.linux", **extra)  # type: ignore[arg-type]


def test_only_the_sandbox_side_is_bound(tmp_path: Path) -> None:
    assert aosbuild_binds(sandbox.bwrap_argv(spec(tmp_path))) == [(str(SIDE), f"{sandbox.LIB}/aosbuild")]
    for wrapper, binds in ((False, []), (True, [(str(SIDE), f"{sandbox.AOSBUILD_LIB}/aosbuild")])):
        contract = sandbox.OsbuildSandbox(libdir=tmp_path, package=None, arguments=tmp_path / "arguments",
                                          meta=tmp_path / "meta", api=tmp_path, var=tmp_path,
                                          cmdline=tmp_path / "cmdline", mount_wrapper=wrapper)
        argv = sandbox.bwrap_argv(spec(tmp_path, osbuild=contract))
        assert aosbuild_binds(argv) == binds
        assert (argv[argv.index("--") + 1:argv.index("--") + 4] == list(sandbox.MOUNT_WRAPPER[:3])) is wrapper


def test_a_stage_imports_the_sandbox_side_as_aosbuild(aosbuild: Aosbuild) -> None:
    modules = ["aosbuild.stageapi", "aosbuild.runnerlib"]
    m = manifest(pipeline("tree", stage("org.aosbuild.test.imports", modules=modules)))
    run = aosbuild(m, "--export", "tree", "--output-directory", str(aosbuild.output))
    assert run.returncode == 0, run.stdout + run.stderr
    found = json.loads((aosbuild.output / "tree" / "imports.json").read_text())
    assert found["package"] == f"{sandbox.LIB}/aosbuild"
    assert found["imported"] == {name: f"{sandbox.LIB}/aosbuild/{name.split('.')[1]}.py" for name in modules}
    assert found["listing"] == sorted(path.name for path in SIDE.iterdir() if path.name != "__pycache__")


@pytest.mark.parametrize("module", ["aosbuild.builder", "aosbuild.sandbox", "aosbuild.sandboxside"])
def test_a_stage_cannot_import_the_engine(aosbuild: Aosbuild, module: str) -> None:
    m = manifest(pipeline("tree", stage("org.aosbuild.test.imports", modules=["aosbuild.stageapi", module])))
    run = aosbuild(m, "--export", "tree", "--output-directory", str(aosbuild.output))
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"ModuleNotFoundError: No module named '{module}'" in run.stdout + run.stderr


def test_the_sandbox_side_gets_bytecode_in_its_own_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`compile_stage_side` writes, for each module of a sandbox side without bytecode, a `.pyc` that is valid
    for its source (the mtime and size in its header), where the stage's python3 looks for it."""
    import importlib.util
    import shutil

    side = tmp_path / "aosbuild"
    shutil.copytree(SIDE, side, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(sandbox, "SANDBOX_SIDE_DIR", side)
    sandbox.compile_stage_side.__wrapped__()
    for name in sandbox.STAGE_SIDE_MODULES:
        source = side / name
        header = Path(importlib.util.cache_from_source(str(source))).read_bytes()[:16]
        assert header[:4] == importlib.util.MAGIC_NUMBER
        assert int.from_bytes(header[8:12], "little") == int(source.stat().st_mtime)
        assert int.from_bytes(header[12:16], "little") == source.stat().st_size


STAGE_REPORT = """
import json, os, sys
print(json.dumps({"pth": os.environ.get("PROBE_PTH"), "imported": IMPORTED,
                  "site_packages": any(p.endswith("site-packages") for p in sys.path),
                  "builtins": [callable(f) for f in (exit, quit, help)]}))
"""


@pytest.fixture(scope="module")
def build_root_python(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A python3 with site-packages of its own (a venv) holding a module and a `.pth` file that marks the
    environment when `site` processes it, and a PYTHONPATH with the sandbox side as `aosbuild`."""
    import subprocess

    root = tmp_path_factory.mktemp("buildroot-python")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    site_packages = next((root / "venv" / "lib").glob("python3*/site-packages"))
    (site_packages / "probe.pth").write_text("import os; os.environ['PROBE_PTH'] = 'ran'\n")
    (site_packages / "probe_module.py").write_text("import os\nPTH_BEFORE = os.environ.get('PROBE_PTH')\n")
    lib = root / "lib"
    lib.mkdir()
    (lib / "aosbuild").symlink_to(SIDE)
    return root / "venv" / "bin" / "python3", lib


@pytest.mark.parametrize(("code", "imported", "site_run"), [
    ("IMPORTED = None", None, False),
    ("import probe_module\nIMPORTED = probe_module.PTH_BEFORE", "ran", True),
    ("import importlib\nIMPORTED = importlib.import_module('probe_module').PTH_BEFORE", "ran", True),
    ("from aosbuild import stagejson\nIMPORTED = stagejson.__name__", "aosbuild.stagejson", False),
], ids=["stdlib-only", "import", "import_module", "sandbox-side"])
def test_the_runner_gives_a_stage_site_only_when_it_imports_from_outside_the_standard_library(
        build_root_python: tuple[Path, Path], tmp_path: Path, code: str, imported: str | None,
        site_run: bool) -> None:
    """The runners start python3 with -S; `site` (site-packages, `.pth` files) comes with the stage's first
    import from outside the standard library, before that import looks for its module."""
    import subprocess

    python, lib = build_root_python
    script = tmp_path / "stage"
    script.write_text(f"#!{python}\n{code}\n{STAGE_REPORT}")
    runner = REPO / "runners" / "org.osbuild.linux"
    assert runner.read_text().startswith("#!/usr/bin/python3 -S\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(lib), "PYTHONNOUSERSITE": "1"}
    ran = subprocess.run([str(python), "-S", str(runner), str(script)], env=env, capture_output=True, text=True,
                         check=False)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report == {"pth": "ran" if site_run else None, "imported": imported, "site_packages": site_run,
                      "builtins": [True, True, True]}
    # the control: without -S the same stage gets site at once, as any python3 script does
    ran = subprocess.run([str(python), str(runner), str(script)], env=env, capture_output=True, text=True,
                         check=False)
    assert json.loads(ran.stdout)["pth"] == "ran", ran.stderr
