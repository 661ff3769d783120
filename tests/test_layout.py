"""Tests of the project's layout ("the house"): the import graph of the top-level files has no
cycle and no function-local import of a project module; the math files load no other project
module, so each can be copied alone; scripts (and plan.py, train_flow.py's planning) stand on
top; every "Offers:" index in a module docstring names exactly what the module defines."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob("*.py")}
STANDALONE = ["kl", "attention", "flow", "metrics", "common", "shapes"]
SCRIPTS = {"train_vae", "train_flow", "evaluate", "bench"}
LIBRARIES = sorted(set(MODULES) - SCRIPTS)


def _imports(path):
    """[(imported project module, at module top level?)] of one file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module.split(".")[0]]
        else:
            continue
        found += [(name, id(node) in top) for name in names if name in MODULES]
    return found


def test_import_graph_has_no_cycle_and_no_function_local_project_import():
    graph = {}
    for name, path in MODULES.items():
        imports = _imports(path)
        assert all(at_top for _, at_top in imports), f"{name}.py imports inside a function"
        graph[name] = {m for m, _ in imports if m != name}
    done, on_path = set(), []

    def visit(node):
        assert node not in on_path, f"import cycle: {' -> '.join(on_path + [node])}"
        if node in done:
            return
        on_path.append(node)
        for nxt in graph[node]:
            visit(nxt)
        on_path.pop()
        done.add(node)
    for name in graph:
        visit(name)


def test_scripts_stand_on_top():
    importers = {name: {m for m, _ in _imports(path)} for name, path in MODULES.items()}
    for leaf in ("evaluate", "bench"):
        assert not [m for m, imps in importers.items() if leaf in imps], f"{leaf}.py is imported"
    for name, imps in importers.items():   # only the scripts above them import the trainers,
        training = imps & {"train_vae", "train_flow"}  # and plan.py (train_flow's) train_vae.py
        allowed = {"train_flow": {"train_vae"}, "bench": {"train_vae", "train_flow"},
                   "plan": {"train_vae"}}.get(name, set())
        assert training <= allowed, f"{name}.py imports {training}"
    assert {m for m, imps in importers.items() if "plan" in imps} == {"train_flow"}


def test_standalone_files_load_no_other_project_module():
    """Each in turn in one fresh interpreter, the project's modules forgotten in between."""
    code = (f"import importlib, json, sys, torch\n"
            f"project, loads = {sorted(MODULES)!r}, {{}}\n"
            f"for name in {STANDALONE!r}:\n"
            f"    importlib.import_module(name)\n"
            f"    loads[name] = sorted(m for m in project if m in sys.modules and m != name)\n"
            f"    for m in project:\n"
            f"        sys.modules.pop(m, None)\n"
            f"print(json.dumps(loads))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    loads = json.loads(out)
    assert list(loads) == STANDALONE
    assert not any(loads.values()), f"these also load other project modules: {loads}"


def _offers(path):
    """The names after "Offers:" in the module docstring (up to a blank line), or None."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    m = re.search(r"^Offers:(.*?)(?:\n\s*\n|\Z)", doc, re.S | re.M)
    return None if m is None else [n.strip() for n in m.group(1).replace("\n", " ").split(",")]


def _defined(path):
    """Public functions and classes defined at the top of a file, and every top-level name."""
    tree = ast.parse(path.read_text())
    public, names = set(), set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
            if not node.name.startswith("_"):
                public.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                elts = target.elts if isinstance(target, ast.Tuple) else [target]
                names |= {t.id for t in elts if isinstance(t, ast.Name)}
    return public, names


@pytest.mark.parametrize("name", LIBRARIES)
def test_offers_index_names_exactly_what_the_module_defines(name):
    offers = _offers(MODULES[name])
    assert offers is not None, f"{name}.py's docstring has no 'Offers:' index"
    public, names = _defined(MODULES[name])
    assert not set(offers) - names, f"{name}.py offers what it does not define: {set(offers) - names}"
    assert not public - set(offers), f"{name}.py does not list {sorted(public - set(offers))}"


# What a Windows Python lacks: these modules, and these functions of `os`.
POSIX_ONLY = ("fcntl", "resource", "pwd", "grp", "termios")
POSIX_OS = ("fchmod", "fchown", "sched_getaffinity", "getloadavg", "sysconf", "fork", "getuid")
WITHOUT_POSIX = (f"import os, runpy, sys\n"
                 f"sys.modules.update(dict.fromkeys({POSIX_ONLY!r}))\n"
                 f"for name in {POSIX_OS!r}:\n"
                 f"    if hasattr(os, name):\n"
                 f"        delattr(os, name)\n")


def test_every_module_imports_and_the_smoke_run_works_without_posix_only_calls(tmp_path):
    """As on Windows: no fcntl, resource, ..., nor os.fchmod, os.sysconf, ... The smoke test of
    README (at toy sizes: DiT-micro) trains, resumes and samples."""
    out = tmp_path / "smoke"
    code = WITHOUT_POSIX + (
        f"for name in {sorted(MODULES)!r}:\n"
        f"    __import__(name)\n"
        f"def run(script, *argv):\n"
        f"    sys.argv = [script, *argv]\n"
        f"    try:\n"
        f"        runpy.run_path(script, run_name='__main__')\n"
        f"    except SystemExit as e:\n"
        f"        assert not e.code, (script, e.code)\n"
        f"tiny = ['--n-builtin', '32', '--batch-size', '8', '--sample-steps', '1', '--device', 'cpu',"
        f" '--grid-prompts', '1', '--grid-images', '2', '--preset', 'micro']\n"
        f"run('train_flow.py', '--steps', '2', '--vae-steps', '2', '--out', {str(out)!r}, *tiny)\n"
        f"run('train_flow.py', '--resume', '--steps', '3', '--out', {str(out)!r})\n"
        f"run('sample.py', '--ckpt', {str(out / 'ckpt.pt')!r}, '--n', '1', '--sample-steps', '1',"
        f" '--out', {str(tmp_path / 's.png')!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and (tmp_path / "s.png").is_file()
    assert "step 3/3" in proc.stdout
