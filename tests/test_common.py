"""Tests of common.py: flags refused as they are read, in one line; one-line errors for what a
user can fix; files written whole and never over what the command did not make; the thread count
and the progress line."""
import argparse
import errno
import os
import shlex
import signal

import pytest
import torch

import common

SCRIPTS = ["train_vae.py", "train_flow.py", "sample.py", "evaluate.py", "bench.py"]


def test_flag_types_accept_valid_values_and_refuse_nan_inf_zero_and_absurd_sizes():
    steps = common.positive(int, at_most=100)
    assert steps("7") == 7 and common.positive(float, allow_zero=True)("0") == 0.0
    assert common.finite("-2.5") == -2.5 and common.fraction("0.999") == 0.999
    assert common.seed_value(str(2 ** 63 - 1)) == 2 ** 63 - 1
    for parse, text, why in [(steps, "0", "must be a finite number > 0, got 0"),
                             (steps, "1e3", "expected an integer, got '1e3'"),
                             (steps, "101", "must be at most 100"),
                             (common.positive(float), "nan", "finite"),
                             (common.positive(float), "inf", "finite"),
                             (common.finite, "-inf", "finite"), (common.fraction, "1", "[0, 1)"),
                             (common.seed_value, str(2 ** 63), "at most")]:
        with pytest.raises(argparse.ArgumentTypeError, match=why.replace("[", r"\[").replace(")", r"\)")):
            parse(text)


@pytest.mark.parametrize("script,argv,fragment", [
    ("train_vae.py", ["--steps", "1e3"], "argument --steps: expected an integer, got '1e3'"),
    ("train_vae.py", ["--vae-preset", "huge"], "argument --vae-preset: invalid choice: 'huge'"),
    ("train_flow.py", ["--lr", "-1"], "argument --lr: must be a finite number > 0, got -1"),
    ("train_flow.py", ["--threads", "0"], "must be a finite number > 0, got 0"),
    ("train_flow.py", ["--grid-images", "1" + "0" * 30], "must be at most"),
    ("train_flow.py", ["--n-builtin", "1" + "0" * 30], "must be at most"),
    ("sample.py", ["--cfg", "nan"], "must be a finite number, got nan"),
    ("evaluate.py", ["--n", "0"], "must be a finite number > 0")])
def test_a_flag_mistake_is_one_line_not_the_usage_block(cli, expect, script, argv, fragment):
    rc, out, err = cli(script, *argv)
    expect.one_line_error((rc, out, err), fragment)
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_gives_every_default_and_ends_with_examples(cli, script):
    rc, out, _ = cli(script, "--help")
    assert rc == 0 and "examples:" in out.split("options:")[-1]
    assert "Default: " in out and "Default: None" not in out


@pytest.mark.parametrize("error,code,fragment", [
    (common.UserError("--data x: folder not found"), 2, "error: --data x: folder not found"),
    (OSError(errno.EACCES, "Permission denied", "/root/x"), 2, "error: Permission denied: /root/x"),
    (RuntimeError("CUDA out of memory. Tried to allocate"), 2, "error: out of memory; lower --batch-size"),
    (KeyboardInterrupt(), 130, "interrupted")])
def test_run_main_turns_what_a_user_can_fix_into_one_line(capsys, error, code, fragment):
    def main():
        raise error
    assert common.run_main(main) == code
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_pick_amp_on_a_cpu():
    cpu = torch.device("cpu")
    assert common.pick_amp("off", cpu) is None and common.pick_amp("bf16", cpu) is torch.bfloat16
    assert common.pick_amp("auto", cpu) is (torch.bfloat16 if common.cpu_has_native_bf16() else None)
    with pytest.raises(common.UserError, match="--amp fp16 needs a GPU"):
        common.pick_amp("fp16", cpu)


def test_threads_follow_the_flag_then_omp_num_threads_then_the_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert common.set_threads(None).startswith("CPU threads: 1 (OMP_NUM_THREADS)")
        assert torch.get_num_threads() == 1
        assert common.set_threads(2).startswith("CPU threads: 2 (--threads)")
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 0, 0))
        line = common.set_threads(None)
        assert "physical cores" in line and "busy (load average 99.0" in line
    finally:
        torch.set_num_threads(before)


def test_maybe_compile_falls_back_to_eager_with_one_warning(monkeypatch, capsys):
    model = torch.nn.Linear(2, 2)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nmore")
    monkeypatch.setattr(torch, "compile", lambda m: broken)
    call = common.maybe_compile(model, torch.device("cpu"), True)
    x = torch.ones(1, 2)
    assert torch.equal(call(x), model(x)) and torch.equal(call(x), model(x))
    assert capsys.readouterr().err.count("warning: torch.compile failed (RuntimeError: no C++") == 1
    assert call._orig_mod is model and common.maybe_compile(model, torch.device("cpu"), None) is model


def test_atomic_write_keeps_the_old_file_and_no_temporary_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")

    def full_disk(f):
        f.write(b"par")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(common.UserError, match="could not write .*no space left on device"):
        common.atomic_write(path, full_disk)

    def torch_full_disk(f):                       # what torch.save says on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64")
    with pytest.raises(common.UserError, match="could not write"):
        common.atomic_write(path, torch_full_disk)
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_atomic_write_replaces_a_symlink_never_writes_through_it_and_keeps_foreign_temps(tmp_path):
    target, link = tmp_path / "target.png", tmp_path / "a.png"
    target.write_bytes(b"keep")
    link.symlink_to(target)
    (tmp_path / "a.png.important.tmp").write_bytes(b"user's")      # not ours: never deleted
    (tmp_path / ".a.png.abcd1234.tmp").write_bytes(b"stale")       # ours, from a killed run
    common.atomic_write(link, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"keep" and not link.is_symlink() and link.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["a.png", "a.png.important.tmp", "target.png"]
    with pytest.raises(common.UserError, match="appeared while this command ran"):
        common.atomic_write(link, lambda f: f.write(b"other"), replace=False)   # no clobber
    assert link.read_bytes() == b"new"


def test_a_signal_during_a_write_arrives_after_the_file_is_complete(tmp_path):
    got = []
    old = signal.signal(signal.SIGINT, lambda *a: got.append(os.path.exists(tmp_path / "f")))
    try:
        common.atomic_write(tmp_path / "f", lambda f: (os.kill(os.getpid(), signal.SIGINT),
                                                       f.write(b"x")))
    finally:
        signal.signal(signal.SIGINT, old)
    assert got == [True]


def test_check_output_refuses_an_existing_file_unless_overwrite_and_an_input_always(tmp_path):
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "new.png"
    ckpt.write_bytes(b"x")
    assert common.check_output(out, "--out") == out
    with pytest.raises(common.UserError, match="exists and this command did not write it"):
        common.check_output(ckpt, "--out")
    assert common.check_output(ckpt, "--out", overwrite=True) == ckpt
    for overwrite in (False, True):
        with pytest.raises(common.UserError, match="is the file this command reads as --ckpt"):
            common.check_output(tmp_path / "." / "ckpt.pt", "--export", overwrite, [("--ckpt", ckpt)])
    with pytest.raises(common.UserError, match="is a folder"):
        common.check_output(tmp_path, "--out")


def test_a_quoted_path_reads_back_as_one_word_of_a_command(monkeypatch):
    for path in ("runs/flow", "my runs/flow 2", "it's", "$HOME/x", "a;b"):
        assert shlex.split(f"python x.py --out {common.quoted(path)}")[-1] == path
    monkeypatch.setattr(common.os, "name", "nt")                 # cmd.exe and PowerShell
    assert common.quoted("my runs\\flow") == '"my runs\\flow"'
    assert common.quoted("runs\\flow") == "runs\\flow" and common.quoted("it's") == '"it\'s"'


def test_progress_leaves_paused_work_out_of_the_rate_and_prints_when_forced(capsys, monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 20.0, 20.0])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    progress = common.Progress("step", 100, images_per_unit=8, every=1e9)
    with progress.paused():                        # 10 s of checkpointing
        pass
    entry = progress.update(10, {"loss": 0.5}, force=True)
    assert entry["img_per_s"] == 8.0 and entry["step"] == 10 and entry["loss"] == 0.5
    assert capsys.readouterr().out.startswith("step 10/100 loss 0.5 | 8 img/s | ETA")


def test_median_time_calls_warmup_plus_repeats_times_and_returns_median_of_timed_calls():
    ticks = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])   # durations 1, 3, 2 -> median 2
    calls, syncs = [], []
    result = common.median_time(lambda: calls.append(1), warmup=2, repeats=3,
                                sync=lambda: syncs.append(1), clock=lambda: next(ticks))
    assert len(calls) == 2 + 3
    assert result == 2.0
    assert len(syncs) == 2 * 3          # before starting and before stopping each timed call
