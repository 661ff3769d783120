"""Tests of README.md as a guide: the blocks it marks runnable run as written, it stays short,
and every relative link and figure path of README.md and RESULTS.md exists.

A fenced ```bash or ```python block directly under a line `<!-- runnable -->` is runnable. Only
quick blocks may be marked: the smoke-test command (`python train_flow.py` with small --steps,
--vae-steps and --n-builtin into runs/smoke) and the "Use it from Python" snippet, which loads
the smoke run's checkpoint. Any other marked block fails `test_runnable_blocks_are_known_kinds`,
so a slow command marked by mistake fails loudly instead of slowing the suite.

`test_runnable_blocks_run` does what a reader does after cloning: it copies the repository's
top-level *.py files into a temporary folder, runs the bash commands there (`python` is this
interpreter, OMP_NUM_THREADS=1), then the Python snippet in the same folder.
"""
import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "RESULTS.md"
MARK = "<!-- runnable -->"
MAX_README_LINES = 300
SMOKE_OUT = "runs/smoke"
SMOKE_CKPT = f"{SMOKE_OUT}/ckpt.pt"
SMOKE_LIMITS = {"--steps": 50, "--vae-steps": 50, "--n-builtin": 1000,   # largest allowed values
                "--sample-steps": 50}


def runnable_blocks(text):
    """[(language, code)] of the fenced blocks directly under a MARK line, in README order."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARK:
            continue
        fence = lines[i + 1].strip() if i + 1 < len(lines) else ""
        language = fence[3:].strip()
        assert fence.startswith("```") and language in ("bash", "python"), (
            f"README.md line {i + 1}: {MARK} must sit directly above a ```bash or ```python "
            f"block, not {fence!r}")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"README.md line {i + 2}: the block is never closed"
        blocks.append((language, "\n".join(lines[i + 2:end])))
    return blocks


def bash_commands(code):
    """The commands of a bash block as argv lists: backslash-continued lines joined, comments
    and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", code)
    commands = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [argv for argv in commands if argv]


def smoke_problem(argv):
    """Why argv is not a quick smoke run of train_flow.py into runs/smoke, or None."""
    if argv[:2] != ["python", "train_flow.py"]:
        return f"not `python train_flow.py ...`: {shlex.join(argv)}"
    flags = argv[2:]
    if len(flags) % 2:
        return f"flags are not --name value pairs: {flags}"
    given = dict(zip(flags[::2], flags[1::2]))
    unknown = set(given) - set(SMOKE_LIMITS) - {"--out"}
    if unknown:
        return f"flags this test does not know to be quick: {sorted(unknown)}"
    if given.get("--out") != SMOKE_OUT:
        return f"--out must be {SMOKE_OUT} (the Python snippet loads {SMOKE_CKPT})"
    for flag, limit in SMOKE_LIMITS.items():
        if flag not in given or not given[flag].isdigit() or int(given[flag]) > limit:
            return f"{flag} must be given, at most {limit}: {given.get(flag)}"
    return None


def snippet_problem(code):
    """Why a Python block is not the quick "Use it from Python" snippet, or None."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        return f"not valid Python: {e}"
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    slow = imported & {"train_flow", "train_vae", "evaluate", "bench"}
    if slow:
        return f"imports a slow script: {sorted(slow)}"
    paths = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
             and isinstance(n.value, str) and n.value.endswith(".pt")}
    if paths != {SMOKE_CKPT}:
        return f"must load {SMOKE_CKPT} and no other checkpoint, loads {sorted(paths)}"
    return None


def kind(language, code):
    """'smoke' or 'python api' for a block this test knows how to run; AssertionError otherwise."""
    if language == "bash":
        commands = bash_commands(code)
        assert commands, "an empty runnable bash block"
        problems = [p for p in map(smoke_problem, commands) if p]
        assert not problems, f"a runnable bash block that is not the quick smoke run: {problems}"
        return "smoke"
    problem = snippet_problem(code)
    assert problem is None, f"a runnable python block that is not the quick snippet: {problem}"
    return "python api"


def test_runnable_blocks_are_known_kinds():
    blocks = runnable_blocks(README.read_text())
    kinds = [kind(language, code) for language, code in blocks]
    assert kinds == ["smoke", "python api"], (
        f"README.md should mark the smoke test, then the Python snippet, runnable: {kinds}")


@pytest.mark.slow
def test_runnable_blocks_run(tmp_path):
    for path in ROOT.glob("*.py"):
        shutil.copy(path, tmp_path / path.name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    blocks = runnable_blocks(README.read_text())
    for language, code in blocks:
        if language != "bash":
            continue
        kind(language, code)
        for argv in bash_commands(code):
            proc = subprocess.run([sys.executable] + argv[1:], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    run = tmp_path / SMOKE_OUT
    assert (run / "ckpt.pt").is_file()
    grids = sorted(run.glob("samples_*.png"))
    assert grids, f"no samples_*.png in {run}"
    Image.open(grids[-1]).verify()
    image_size = json.loads((run / "args.json").read_text())["image_size"]

    before = set(tmp_path.glob("*.png"))
    for language, code in blocks:
        if language != "python":
            continue
        kind(language, code)
        (tmp_path / "readme_snippet.py").write_text(code + "\n")
        proc = subprocess.run([sys.executable, "readme_snippet.py"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    written = sorted(set(tmp_path.glob("*.png")) - before)
    assert written, "the Python snippet wrote no PNG file"
    for path in written:
        with Image.open(path) as image:
            assert image.size == (image_size, image_size), (path.name, image.size)


def test_readme_is_a_short_guide_that_names_the_test_command():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES, (
        f"README.md has {len(text.splitlines())} lines; measurements belong in RESULTS.md")
    assert "python -m pytest" in text


def _outside_code(text):
    """The lines of a markdown text that are not inside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    keep = "".join(c for c in text if c.isalnum() or c in " -_"
                   or unicodedata.category(c).startswith("M"))
    return keep.replace(" ", "-")


def anchors(path):
    """The heading anchors of a markdown file, with GitHub's -1, -2 ... for repeated headings."""
    seen, found = {}, set()
    for line in _outside_code(path.read_text()):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


@pytest.mark.parametrize("name", ["README.md", "RESULTS.md"])
def test_every_relative_link_and_figure_exists(name):
    path = ROOT / name
    text = "\n".join(re.sub(r"`[^`]*`", "", line) for line in _outside_code(path.read_text()))
    targets = LINK.findall(text)
    assert targets, f"{name} has no links at all: the pattern is wrong"
    broken = []
    for target in targets:
        if re.match(r"[a-z][a-z0-9+.-]*:", target):           # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part) if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT)}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{name}: " + "; ".join(broken)
