"""The package layout: no import cycle between modules or stage folders, no torch on the launcher side, the
frozen entry points working from a non-editable install, and old module paths refused with their new home."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Dict, Iterable, List, Set

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "launcher"
# Stages and entry points that run on the submitting host: they must never import these, not even lazily.
LAUNCHER_SIDE = ("config", "plan", "render", "launch", "prepare", "cli", "slurm_job", "ds_configs", "reference",
                 "errors", "_moved", "__init__", "__main__")
HEAVY = ("torch", "deepspeed", "transformers", "datasets", "accelerate", "peft", "safetensors")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> Dict[str, Set[str]]:
    """module -> the package's modules it imports (any import statement, lazy ones inside functions too)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    top = root.name
    graph: Dict[str, Set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        targets: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names: List[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod when it exists.
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for name in names:
                while name and name not in files and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in files and name != mod and name.split(".")[0] == top:
                    targets.add(name)
        graph[mod] = targets
    return graph


def cycles(graph: Dict[str, Iterable[str]]) -> List[List[str]]:
    """Strongly connected components with more than one node (Tarjan), i.e. the import circles."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def stage_of(module: str) -> str:
    """launcher.render.sbatch -> render; launcher.cli -> cli (top-level modules are their own stage)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycle_between_modules_or_folders():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and "launcher.prepare" in graph["launcher.cli"]
    assert cycles(graph) == [], "import circle between modules"
    stages: Dict[str, Set[str]] = {}
    for mod, targets in graph.items():
        stages.setdefault(stage_of(mod), set()).update(stage_of(t) for t in targets if stage_of(t) != stage_of(mod))
    assert cycles(stages) == [], "import circle between stage folders"
    # The pipeline's direction, spelled out: later stages use earlier ones, never the reverse.
    assert "prepare" not in stages["launch"] | stages["render"] | stages["config"] | stages["plan"]
    assert not stages["config"] & {"render", "launch", "plan"} and not stages["render"] & {"launch", "plan"}
    assert "worker" not in set().union(*(v for k, v in stages.items() if k != "worker"))


def test_cycle_detector_finds_a_circle(tmp_path):
    """The check above would fail on a circle: a package with a -> b -> c -> a (one import lazy) is caught."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("def f():\n    import pkg.a\n")
    (pkg / "d.py").write_text("import pkg.a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]


def test_launcher_side_never_imports_torch():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        mod = module_name(path, PACKAGE)
        if stage_of(mod) not in LAUNCHER_SIDE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{mod}: {n}" for n in names if n.split(".")[0] in HEAVY]
    assert offenders == []


def test_old_module_paths_name_their_new_home():
    code = ("import importlib\n"
            "for old in ('launcher.consolidate', 'launcher.schema', 'launcher.rundir', 'launcher.worker.tokenizer'):\n"
            "    try:\n        importlib.import_module(old)\n    except ImportError as exc:\n        print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [
        "launcher.consolidate has moved to launcher.export: locate (finding the checkpoint), zero_state (reading "
        "ZeRO state), shards (writing shards and the index), hf_dir (export())",
        "launcher.schema has moved to launcher.config.schema",
        "launcher.rundir has moved to launcher.render.rundir (file texts) and launcher.launch.rundir (writing, "
        "resume check)",
        "launcher.worker.tokenizer has moved to launcher.models.tokenizer",
    ]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A wheel of the checkout installed (not editable) into a fresh venv; its dependencies are borrowed from the
    test venv through a .pth line, which adds that site-packages as a plain path, so the checkout's editable
    finder (a .pth *in* that dir) is never loaded and only the wheel's own files can be imported."""
    tmp = tmp_path_factory.mktemp("wheel")
    # From a copy of the sources: setuptools reuses a checkout's build/lib, which can hold what pyproject omits.
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info",
                                                             "__pycache__", ".ruff_cache", ".pytest_cache"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    wheel = next((tmp / "dist").glob("launcher-*.whl"))
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                           "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, env=_clean_env())
    assert inst.returncode == 0 and (venv / "bin" / "launcher").is_file(), inst.stdout + inst.stderr
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path("
                                "'purelib'))"], capture_output=True, text=True, check=True).stdout.strip())
    (site / "_deps_from_test_venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv


def _clean_env() -> Dict[str, str]:
    """No PYTHONPATH (it would put a checkout ahead of the installed wheel)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run_installed(venv: Path, args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    env = _clean_env()
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_non_editable_install_runs_every_entry_point(installed, tmp_path):
    py = str(installed / "bin" / "python")
    where = _run_installed(installed, [py, "-c", "import launcher, os; print(os.path.dirname(launcher.__file__))"],
                           tmp_path)
    site_pkg = Path(where.stdout.strip())
    assert site_pkg.is_relative_to(installed), f"imported launcher from {site_pkg}, not the wheel"
    shipped = {p.relative_to(site_pkg).as_posix() for p in site_pkg.rglob("*.py")}
    in_checkout = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    assert in_checkout <= shipped, f"left out of the wheel (pyproject packages): {sorted(in_checkout - shipped)}"
    assert (site_pkg / "conf" / "zero" / "stage3.yaml").is_file()

    def ok(args: List[str]) -> str:
        res = _run_installed(installed, args, tmp_path)
        assert res.returncode == 0, f"{args}: {res.stderr[-2000:]}"
        return res.stdout

    assert "Usage: launcher [train]" in ok([str(installed / "bin" / "launcher"), "--help"])
    assert ok([py, "-m", "launcher", "--help"]) == ok([py, "-m", "launcher.reference"])
    ok([py, "-m", "launcher", "zero=stage3", "model=llama3_8b", "hardware=8xh100", "precision=bf16", "dry_run=true"])
    ds = json.loads(next(tmp_path.glob("runs/*/ds_config.json")).read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 32
    launch_sh = next(tmp_path.glob("runs/*/launch.sh")).read_text()
    assert "--module launcher.worker" in launch_sh
    plan = json.loads(ok([py, "-m", "launcher.plan", "model=llama3_8b", "hardware=8xa100", "format=json"]))
    assert plan["model"] == "llama3_8b" and plan["candidates"]
    assert "usage: python -m launcher.export" in ok([py, "-m", "launcher.export", "--help"])
    assert "wrote 24 files" in ok([py, "-m", "launcher.ds_configs", str(tmp_path / "ds")])
    assert "usage: launcher.worker" in ok([py, "-m", "launcher.worker", "--help"])
    job = _run_installed(installed, [py, "-m", "launcher.slurm_job"], tmp_path)  # outside a job: one line, exit 2
    assert job.returncode == 2 and job.stderr.strip().splitlines() == [
        "launcher: error: slurm: not inside a SLURM job; submit with: sbatch [--nodes=N] slurm/train.sbatch "
        "[overrides]"]
