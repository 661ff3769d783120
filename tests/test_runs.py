"""Tests for runs.py: atomic writes that keep the old file, deferred signals, loss.png, run
folders (refusal, lock, overwrite), the trimmed log and the resumed settings."""

import argparse
import errno
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import common
import runs


def test_check_writable_refuses_a_folder_it_cannot_write_and_makes_nothing(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for bad in (a_file, a_file / "sub"):
        with pytest.raises(common.UserError, match="cannot write there"):
            runs.check_writable(bad)
    runs.check_writable(tmp_path / "new" / "run")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_parse_with_given_tells_flags_set_on_the_command_line_from_defaults():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--resume", action="store_true")
    args, given = runs.parse_with_given(p, ["--lr", "0.1", "--resume"])
    assert (args.steps, args.lr, args.resume) == (5, 0.1, True)
    assert given == {"lr", "resume"}


def test_restore_settings_takes_stored_values_lists_changes_and_refuses_new_experiments(capsys):
    saved = {"lr": 0.5, "steps": 100, "seed": 3, "data": None, "out": "elsewhere"}
    args = argparse.Namespace(lr=0.1, steps=7, seed=0, data=None, out="here", resume=True)
    changes = runs.restore_settings(args, {"lr", "out", "resume"}, saved, {"seed", "data"}, False)
    assert (args.lr, args.steps, args.seed, args.out) == (0.1, 100, 3, "here")
    assert changes == {"lr": 0.5}
    assert "resuming with changed settings: --lr 0.1 (was 0.5)" in capsys.readouterr().out
    args = argparse.Namespace(lr=0.5, steps=100, seed=9, data="x", out="here")
    with pytest.raises(common.UserError, match=r"--seed 9 \(was 3\), --data x \(was None\); "
                                               r"--seed, --data would make another experiment.*"
                                               r"--allow-changes"):
        runs.restore_settings(args, {"seed", "data"}, saved, {"seed", "data"}, False)
    assert runs.restore_settings(args, {"seed", "data"}, saved, {"seed", "data"}, True) == \
        {"seed": 3, "data": None}


def test_run_folder_refuses_a_folder_holding_a_run_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    folder = runs.RunFolder(out)
    assert not out.exists()                                   # nothing made before claim
    folder.claim()
    (out / "ckpt.pt").write_bytes(b"x")
    (out / "samples_000010.png").write_bytes(b"x")
    (out / "latents.pt").write_bytes(b"cache")
    folder.release()
    with pytest.raises(common.UserError, match=r"already holds a run \(ckpt\.pt, samples_000010"
                                               r"\.png\); continue it with --resume, start over "
                                               r"with --overwrite"):
        runs.RunFolder(out)
    runs.RunFolder(out, resume=True).release()
    again = runs.RunFolder(out, overwrite=True)
    again.claim()
    assert sorted(p.name for p in out.iterdir()) == [".lock", "latents.pt"]   # the cache stays
    again.release()
    with pytest.raises(common.UserError, match="nothing to resume"):
        runs.RunFolder(tmp_path / "empty", resume=True)
    with pytest.raises(common.UserError, match="exclude each other"):
        runs.RunFolder(out, resume=True, overwrite=True)


def test_run_folder_lock_refuses_a_live_second_writer_and_recovers_a_stale_lock(tmp_path, capsys):
    out = tmp_path / "run"
    first = runs.RunFolder(out)
    first.claim()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(runs._process_id(other.pid) + "\n")   # a live owner
        with pytest.raises(common.UserError, match=f"in use by another run \\(pid {other.pid}\\)"):
            runs.RunFolder(out).claim()
    finally:
        other.kill()
        other.wait()
    stale = runs.RunFolder(out)
    stale.claim()                                 # its owner is gone: the lock is taken over
    assert "stale lock" in capsys.readouterr().err
    assert (out / ".lock").read_text().split()[0] == str(os.getpid())
    stale.release()
    assert not (out / ".lock").exists()


def test_a_command_that_fails_before_writing_leaves_no_empty_folder(tmp_path):
    folder = runs.RunFolder(tmp_path / "a" / "b")
    folder.claim()
    folder.release()                              # nothing was written: the folder goes again
    assert not (tmp_path / "a" / "b").exists()


def test_trim_log_drops_the_lines_after_the_resumed_step(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6, 8)))
    runs.trim_log(log, 4)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [2, 4]


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"old")

    def fails(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(common.UserError, match="could not write .*No space left on device.*"
                                               "previous picture, if any, is intact"):
        runs.atomic_write(path, fails, "picture")
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["x.png"]


def test_a_signal_during_a_deferred_block_arrives_after_it(monkeypatch):
    seen = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(("handler", signum)))
    try:
        with runs.signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("block done")
        assert seen == ["block done", ("handler", signal.SIGTERM)]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_plot_loss_draws_the_logged_curve_and_redraws_it_with_more_points(tmp_path):
    log, png = tmp_path / "log.jsonl", tmp_path / "loss.png"
    log.write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2, 4)))
    runs.plot_loss(log, png)
    first = png.read_bytes()
    image = np.asarray(Image.open(png))
    assert image.shape == (400, 640, 3) and (image != 255).any(axis=2).sum() > 500   # ink
    with open(log, "a") as f:
        f.write(json.dumps({"step": 8, "loss": 0.1}) + "\n")
    runs.plot_loss(log, png)
    assert png.read_bytes() != first
