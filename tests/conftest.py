"""Fixtures the test files share (pytest finds them here; test files never import each other).

The repository root is on sys.path through pytest.ini's `pythonpath = .`, so tests import the
project's modules by name (`import kl`).

Scripts run on a CPU with tiny settings (`tiny`): as real subprocesses (`run`, `start`) or, for
the many error cases, in-process through the same `sys.exit(run_main(main))` path as
`python script.py` (`cli`). One VAE and one flow run are trained once per session (`runs`) and
are the uninterrupted reference runs of the resume and crash tests.
"""
import json
import os
import re
import runpy
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

import train_flow
import train_vae

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--device", "cpu", "--amp", "off"]
GRID_PAD = 2


@pytest.fixture(scope="session")
def tiny():
    """Flags of the tiny CPU runs: a VAE of VAE_STEPS and a flow model of FLOW_STEPS steps."""
    vae_flags = ["--n-builtin", "64", "--batch-size", "8", "--log-every", "4", "--ckpt-every", "2",
                 "--eval-images", "16", "--seed", "0"] + CPU
    flow_flags = ["--n-builtin", "64", "--batch-size", "8", "--log-every", "3", "--ckpt-every", "2",
                  "--sample-every", "4", "--sample-steps", "2", "--grid-prompts", "3",
                  "--grid-images", "2", "--warmup", "1", "--lr", "1e-3", "--preset", "micro"] + CPU
    return SimpleNamespace(cpu=CPU, vae_steps=16, vae_flags=vae_flags, flow_steps=6,
                           flow_flags=flow_flags)


def child_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(script, *args, timeout=240, check=True, module=False):
    """Run `python script args` in the repository; returns the CompletedProcess (text). An
    argument given as bytes is passed as those bytes (e.g. a prompt that is not UTF-8)."""
    cmd = [sys.executable] + (["-m"] if module else []) + [script]
    cmd += [a if isinstance(a, bytes) else str(a) for a in args]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def run():
    """run(script, *args, timeout=240, check=True, module=False) -> CompletedProcess."""
    return _run


@pytest.fixture(scope="session")
def start():
    """start(script, *args) -> a running Popen of `python script args` (text pipes)."""
    def start(script, *args):
        return subprocess.Popen([sys.executable, script] + [str(a) for a in args], cwd=ROOT,
                                env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return start


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny):
    """The session's reference VAE (tiny.vae_steps straight) and flow run (tiny.flow_steps),
    trained in this process on one thread, as `run`'s subprocesses train (the same bits)."""
    root = tmp_path_factory.mktemp("shared")
    args = ["--out", root / "vae", "--steps", tiny.vae_steps, *tiny.vae_flags, "--threads", 1]
    assert train_vae.main([str(a) for a in args]) == 0
    vae = root / "vae" / "ckpt.pt"
    args = ["--vae", vae, "--out", root / "flow", "--steps", tiny.flow_steps, *tiny.flow_flags,
            "--threads", 1]
    assert train_flow.main([str(a) for a in args]) == 0
    return {"root": root, "vae": vae, "vae_dir": root / "vae", "flow": root / "flow" / "ckpt.pt",
            "flow_dir": root / "flow"}


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """cli(script, *args) -> (exit code, stdout, stderr) of `python script args`, in-process."""
    monkeypatch.chdir(tmp_path)

    def call(script, *args):
        with mock.patch.object(sys, "argv", [script] + [str(a) for a in args]):
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
        out, err = capsys.readouterr()
        return code, out, err
    return call


@pytest.fixture
def one_thread():
    """Many tiny ops: on a shared 2-core machine intra-op threading makes them ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Expect:
    """Assertions and readings several test files use."""

    @staticmethod
    def one_line_error(result, fragment, code=2):
        """(exit code, stdout, stderr): the code, no traceback, one 'error:' line with fragment."""
        rc, out, err = result
        assert rc == code, (rc, out, err)
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and fragment in lines[0], err

    @staticmethod
    def same_weights(ckpt_a, ckpt_b, keys=("model", "ema")):
        a = torch.load(ckpt_a, weights_only=True)
        b = torch.load(ckpt_b, weights_only=True)
        assert a["step"] == b["step"]
        for key in keys:
            assert a[key].keys() == b[key].keys()
            for name, t in a[key].items():
                torch.testing.assert_close(t, b[key][name], rtol=0, atol=1e-6, msg=f"{key}.{name}")

    @staticmethod
    def grid_size(rows, cols, px=32, pad=GRID_PAD):
        """(width, height) of data.save_grid's picture of rows x cols images."""
        return cols * (px + pad) - pad, rows * (px + pad) - pad

    @staticmethod
    def log_lines(folder):
        return [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]

    @staticmethod
    def wait_for_step(proc, step, timeout=120):
        """Read a child's progress lines until it reports `step` (or more)."""
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            m = re.match(r"step (\d+)/", line)
            if m and int(m.group(1)) >= step:
                return int(m.group(1))
            assert time.monotonic() < deadline, "no progress"
        raise AssertionError(f"exited before step {step}: {proc.wait()} {proc.stderr.read()}")


@pytest.fixture(scope="session")
def expect():
    return Expect


@pytest.fixture
def flow_args(runs):
    """flow_args(out, *extra): the argv of a 1-step train_flow.py run on the session's VAE."""
    def args(out, *extra):
        return ["train_flow.py", "--vae", runs["vae"], "--out", out, "--steps", 1,
                "--sample-steps", 1, "--grid-prompts", 2, "--grid-images", 2, "--n-builtin", 64,
                "--batch-size", 8, "--preset", "micro", *CPU, *extra]
    return args


@pytest.fixture
def small_disk(tmp_path):
    """A real, nearly full filesystem: a 512 KiB tmpfs mounted at a temporary folder (needs root
    and a kernel that allows it; skipped with the reason otherwise)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
