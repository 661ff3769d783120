"""Tests for runs.py: atomic writes that keep the old file, deferred signals, loss.png, run
folders (refusal, lock, overwrite), the trimmed log and the resumed settings."""

import argparse
import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import common
import runs

ROOT = Path(__file__).resolve().parents[1]


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
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, runs; runs.RunFolder("
                               "sys.argv[1]).claim(); print('locked', flush=True); time.sleep(60)",
                               str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(common.UserError, match=f"in use by another run \\(pid {holder.pid}\\)"):
            runs.RunFolder(out).claim()
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".lock").read_text().split()[0] == str(holder.pid)      # left by the killed run
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:                                          # a live owner named in an unlocked file (older code)
        (out / ".lock").write_text(runs._process_id(other.pid) + "\n")
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
    assert not (out / ".lock").exists() and sorted(os.listdir(out)) == []


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


# ---------------------------------------------------------------------------------------------
# nothing lost, nothing silently wrong (issue 22)


def test_overwrite_deletes_only_the_runs_own_files_and_names_them_first(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("notes.txt", "prompts.txt", "samples_holiday.png", "loss.png", "log.jsonl"):
        (out / name).write_text(name)
    with pytest.raises(common.UserError) as refused:
        runs.RunFolder(out)
    assert "already holds a run (log.jsonl, loss.png, prompts.txt); start over" in str(refused.value)
    assert "--resume" not in str(refused.value)                       # no checkpoint to continue
    folder = runs.RunFolder(out, overwrite=True)
    folder.claim()
    assert "deleting the previous run's files log.jsonl, loss.png, prompts.txt" in \
        capsys.readouterr().err
    folder.release()
    assert sorted(os.listdir(out)) == ["notes.txt", "samples_holiday.png"]


def test_a_run_arriving_while_the_lock_is_being_taken_is_refused(tmp_path, monkeypatch):
    """A second claim made from inside the first one's lock-taking, where the first opens a file
    to write its pid into (old code: between creating an empty .lock and writing the pid, when
    the lock looked stale and was taken twice); where the lock-taking opens no such file, the
    second claim comes right after the first."""
    out = tmp_path / "run"
    out.mkdir()
    tried, won = [], []

    def claim(name):
        tried.append(name)
        try:
            runs.RunFolder(out).claim()
            won.append(name)
        except common.UserError as e:
            assert "in use by another run" in str(e)
    real = os.fdopen

    def second_run_arrives(*args, **kwargs):
        monkeypatch.setattr(os, "fdopen", real)
        claim("second")
        return real(*args, **kwargs)
    monkeypatch.setattr(os, "fdopen", second_run_arrives)
    claim("first")
    monkeypatch.undo()
    if "second" not in tried:
        claim("second")
    assert len(won) == 1, won


def _race_for(out, start, results):
    start.wait()                                              # all claim together
    try:
        runs.RunFolder(out).claim()
        results.put("claimed")
        time.sleep(0.5)                                       # holding it, then gone (stale)
    except common.UserError:
        results.put("refused")


def test_processes_racing_for_a_stale_lock_never_both_take_it(tmp_path):
    fork = multiprocessing.get_context("fork")                # children start with runs loaded
    for race in range(4):                                     # old code: two winners, at times
        out = tmp_path / f"run{race}"
        out.mkdir()
        (out / ".lock").write_text("999999999 1\n")          # its owner is gone
        start, results = fork.Barrier(4), fork.Queue()
        procs = [fork.Process(target=_race_for, args=(out, start, results)) for _ in range(4)]
        for p in procs:
            p.start()
        outcomes = sorted(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        assert outcomes == ["claimed", "refused", "refused", "refused"], (race, outcomes)


def test_a_lock_naming_an_impossible_pid_is_stale_not_a_crash(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("99999999999999999999999 5\n")
    folder = runs.RunFolder(out)
    folder.claim()
    assert "stale lock" in capsys.readouterr().err
    folder.release()


def test_trim_log_drops_torn_blank_and_non_json_lines_instead_of_failing(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 2, "loss": 1.0}\n\n{"step": 4, "loss"\nnot json\n[1, 2]\n'
                   '{"step": 6, "loss": 0.5}\n{"step": 8, "loss": 0.2}\n{"step": 9, "lo')
    runs.plot_loss(log, tmp_path / "loss.png")              # drawn from the readable lines
    assert (tmp_path / "loss.png").is_file()
    runs.trim_log(log, 6)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [2, 6]
    assert "dropped 5 lines that are no log entry" in capsys.readouterr().err


def test_check_output_refuses_an_existing_file_or_an_input_unless_overwrite(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"weights")
    with pytest.raises(common.UserError, match="--export .*ckpt.pt is the file this command "
                                               "reads as --ckpt"):
        runs.check_output(tmp_path / "." / "ckpt.pt", "--export", inputs=[("--ckpt", ckpt)])
    with pytest.raises(common.UserError, match="exists and this command did not write it"):
        runs.check_output(ckpt, "--json")
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "nowhere")                   # a dangling link is a file too
    with pytest.raises(common.UserError, match="exists"):
        runs.check_output(link, "--json")
    with pytest.raises(common.UserError, match="--json .*: cannot write there"):
        runs.check_output(ckpt / "r.json", "--json")
    assert runs.check_output(ckpt, "--export", overwrite=True) == ckpt
    assert runs.check_output(tmp_path / "new.json", "--json") == tmp_path / "new.json"
    assert ckpt.read_bytes() == b"weights"


def test_a_run_stopped_before_its_first_checkpoint_restarts_with_the_same_settings(tmp_path,
                                                                                   capsys):
    out = tmp_path / "run"
    out.mkdir()
    settings = {"lr": 0.001, "data": None, "steps": 10}
    (out / "args.json").write_text(json.dumps(settings))
    (out / "log.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    (out / "notes.txt").write_text("mine")
    with pytest.raises(common.UserError, match=r"stopped before its first checkpoint, with other "
                                               r"settings \(--lr 0.01 \(was 0.001\)\)"):
        runs.RunFolder(out, settings=dict(settings, lr=0.01))
    with pytest.raises(common.UserError, match="stopped before its first checkpoint, there is "
                                               "nothing to resume; start it again"):
        runs.RunFolder(out, resume=True)
    folder = runs.RunFolder(out, settings=settings)
    folder.claim()
    assert "starting it again; deleting the previous run's files args.json, log.jsonl" in \
        capsys.readouterr().err
    folder.release()
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_overwrite_never_deletes_an_input_of_the_command(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"a VAE")
    with pytest.raises(common.UserError, match="would delete ckpt.pt, which this command reads "
                                               "as --vae"):
        runs.RunFolder(out, overwrite=True, inputs=[("--vae", str(out / "ckpt.pt"))])
    assert (out / "ckpt.pt").read_bytes() == b"a VAE"


def test_path_settings_are_stored_absolute_and_compared_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    p = argparse.ArgumentParser()
    p.add_argument("--vae", default=None)
    p.add_argument("--cfg", dest="cfg_scale", type=float, default=4.0)
    args, given = runs.parse_with_given(p, ["--vae", "./v/ckpt.pt", "--cfg", "2"])
    assert args.vae == str(tmp_path / "v" / "ckpt.pt")
    changes = runs.restore_settings(args, given, {"vae": "v/ckpt.pt", "cfg_scale": 4.0}, {"vae"},
                                    False)
    assert changes == {"cfg_scale": 4.0}                     # the same VAE, spelled otherwise
    assert "resuming with changed settings: --cfg 2.0 (was 4.0)" in capsys.readouterr().out


def test_overwrite_says_at_once_which_settings_differ_and_which_files_go(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text(json.dumps({"data": "B", "steps": 5, "lr": 0.001}))
    (out / "loss.png").write_bytes(b"png")
    runs.RunFolder(out, overwrite=True, settings={"data": None, "steps": 5, "lr": 0.002})
    err = capsys.readouterr().err
    assert "--overwrite replaces the run in" in err
    assert "--data None (was B)" in err and "--lr 0.002 (was 0.001)" in err
    assert "args.json, loss.png are deleted when this run starts" in err
    assert (out / "loss.png").exists()                     # nothing deleted before claim()
