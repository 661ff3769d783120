"""Tests for .ci/gpu-check, the prepared GPU check (issue 32, item 4), at toy size on the CPU:
every step leaves a summary line and a result file that parses, checkpoints stay in the run
folders, and a short --budget skips what does not fit, says why, and keeps what it measured."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["bench-dit-micro", "bench-recipe", "vae", "train-micro", "eval-micro"]   # the toy's


def _check(out, *flags, python=sys.executable):
    """bash .ci/gpu-check OUT --toy FLAGS -> (CompletedProcess, seconds, {step: (status, secs,
    what)} from summary.txt)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHON": str(python)}
    t0 = time.time()              # the script's clock: bash's SECONDS reads the wall clock
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "gpu-check"), str(out), "--toy", *flags],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.time() - t0
    lines = (out / "results" / "summary.txt").read_text().splitlines()
    assert lines[0].startswith("# gpu-check") and "toy=1" in lines[0]
    rows = [line.split("\t") for line in lines if not line.startswith("#")]
    assert all(len(r) == 4 and r[2].endswith("s") for r in rows), lines
    return proc, seconds, {name: (status, int(secs[:-1]), what) for name, status, secs, what in rows}


def _result(out, what):
    """The result file a summary line names (its first word), checked to exist and parse."""
    path = out / what.split()[0]
    assert path.parent == out / "results" and path.is_file() and path.stat().st_size > 0, what
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return path.read_text()


def test_toy_check_runs_every_step_and_each_result_parses(tmp_path):
    out = tmp_path / "check"
    proc, seconds, steps = _check(out, "--budget", "120")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(steps) == STEPS
    assert all(status == "ok" for status, _, _ in steps.values()), steps
    assert sum(secs for _, secs, _ in steps.values()) <= seconds + 1

    bench = _result(out, steps["bench-dit-micro"][2])     # the row that sizes the training
    step_row = next(r for r in bench["rows"] if r["what"] == "dit-step")
    assert step_row["img_s"] > 0 and step_row["batch"] == 8 and "error" not in step_row
    recipe = _result(out, steps["bench-recipe"][2])["recipe"]
    assert recipe["minutes"] > 0 and set(recipe["phases"]) >= {"VAE", "DiT"}
    assert "held-out PSNR" in _result(out, steps["vae"][2])

    what = steps["train-micro"][2]
    log = _result(out, what)                             # the run's log.jsonl, copied back
    planned = int(what.split("(")[1].split()[0])         # "(N steps = ...)"
    assert 1 <= planned <= 8 and log[-1]["step"] == planned
    assert f"reached step {planned} at" in what
    assert (out / "results" / "train-micro.png").is_file()          # its last sample grid
    ev = _result(out, steps["eval-micro"][2])
    row = ev["settings"][0]
    assert (row["cfg"], ev["n"]) == (4.0, 8) and math.isfinite(row["fd"])
    assert (out / "runs" / "micro" / "ckpt.pt").is_file()
    # checkpoints stay in the run folders; only small files come back
    assert not list((out / "results").glob("*.pt"))
    assert sum(p.stat().st_size for p in (out / "results").iterdir()) < 1_000_000
    assert "gpu-check:" in proc.stdout and str(out / "results") in proc.stdout


def test_a_short_budget_skips_what_does_not_fit_and_keeps_what_it_measured(tmp_path):
    out = tmp_path / "short"
    budget = 8                        # the first bench fits (the toy estimates 8 s), no VAE does
    proc, seconds, steps = _check(out, "--budget", str(budget))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(steps) == STEPS                            # every step has its line
    assert seconds < budget + 15 + 10                       # the guard (+ TERM grace, start-up)
    first, secs, what = steps["bench-dit-micro"]
    assert first in ("ok", "cut") and secs <= budget + 15
    if first == "ok":                                       # what it measured came back
        assert _result(out, what)["rows"][0]["img_s"] > 0
    for name in ("bench-recipe", "vae"):
        status, secs, what = steps[name]
        assert (status, secs) == ("skipped", 0) and what.startswith("needs ~") and "s left" in what
    assert steps["train-micro"] == ("skipped", 0, "no VAE")
    assert steps["eval-micro"] == ("skipped", 0, "no checkpoint")
    assert not (out / "runs" / "vae").exists()
    assert "# done in" in (out / "results" / "summary.txt").read_text()


def test_a_failed_step_is_recorded_the_check_goes_on_and_exits_1(tmp_path):
    fake = tmp_path / "python"                  # bench.py fails at once, train_vae.py hangs
    fake.write_text('#!/bin/sh\ncase "$1" in bench.py) echo broken >&2; exit 3 ;; '
                    '*) exec sleep 60 ;; esac\n')
    fake.chmod(0o755)
    out = tmp_path / "failing"
    proc, seconds, steps = _check(out, "--budget", "9", python=fake)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert list(steps) == STEPS and seconds < 9 + 10
    for name in ("bench-dit-micro", "bench-recipe"):
        status, _, what = steps[name]
        assert status == "failed (exit 3)" and what.endswith(f"see results/{name}.log")
        assert (out / "results" / f"{name}.log").read_text() == "broken\n"
    assert steps["vae"][0] == "cut" and 7 <= steps["vae"][1] <= 10   # stopped by its time limit
    assert steps["train-micro"] == ("skipped", 0, "no VAE")


def test_usage_errors_exit_2_before_any_work(tmp_path):
    script = str(ROOT / ".ci" / "gpu-check")
    for args in ([], ["--toy"], [str(tmp_path / "a"), "--budget", "soon"],
                 [str(tmp_path / "b"), "--frobnicate"]):
        proc = subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "usage:" in proc.stderr, (args, proc.stderr)
    (tmp_path / "c" / "results").mkdir(parents=True)        # an earlier check's results
    proc = subprocess.run(["bash", script, str(tmp_path / "c"), "--toy"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "new OUTDIR" in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
