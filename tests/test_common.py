"""Tests for common.py: the argparse types, run_main's one-line errors, the device/precision
choice, the compile fallback, the EMA, the progress log and the NaN / out-of-memory guards."""

import argparse
import errno
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
from data import DataError


@pytest.mark.parametrize("flag,value", [("--steps", 0), ("--batch-size", -4), ("--lr", 0),
                                        ("--lr", "inf"), ("--lr", "nan"), ("--seed", -1)])
def test_non_positive_numbers_are_argparse_errors(cli, flag, value):
    rc, _, err = cli("train_flow.py", flag, value)
    assert rc == 2 and "usage:" in err and flag in err and "Traceback" not in err


def test_maybe_compile_falls_back_to_eager_with_a_warning(monkeypatch, capsys):
    model = torch.nn.Linear(2, 2)
    x = torch.randn(3, 2)

    def no_compiler(m):
        raise RuntimeError("no C++ compiler found")
    monkeypatch.setattr(torch, "compile", no_compiler)
    net, compiled = common.maybe_compile(model, torch.device("cpu"), True)
    assert net is model and not compiled
    assert "warning: torch.compile failed" in capsys.readouterr().err

    def fails_on_first_call(m):                  # the real failure mode: compile is lazy
        def call(*a):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return call
    monkeypatch.setattr(torch, "compile", fails_on_first_call)
    net, _ = common.maybe_compile(model, torch.device("cpu"), True)
    assert torch.equal(net(x), model(x)) and torch.equal(net(x), model(x))
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile failed") == 1 and "running eagerly" in err
    assert common.maybe_compile(model, torch.device("cpu"), None) == (model, False)


def test_argparse_types_accept_valid_and_reject_invalid_values():
    assert common.positive(int)("3") == 3 and common.positive(float, allow_zero=True)("0") == 0.0
    assert common.fraction("0.5") == 0.5 and common.seed_value("0") == 0
    for parse, text in [(common.positive(int), "0"), (common.positive(float), "nan"),
                        (common.positive(int), "x"), (common.fraction, "1"),
                        (common.fraction, "-0.1"), (common.seed_value, str(2 ** 63))]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_help_ends_each_flag_with_its_default_unless_the_text_names_it():
    p = argparse.ArgumentParser(formatter_class=common.HelpFormatter)
    p.add_argument("--steps", type=int, default=7, help="training steps")
    p.add_argument("--lr", type=float, default=0.5, help="learning rate. Default: half")
    text = " ".join(p.format_help().split())
    assert "training steps. Default: 7" in text and "Default: half" in text
    assert "Default: 0.5" not in text


@pytest.mark.parametrize("error,code,fragment", [
    (common.UserError("--data x: folder not found"), 2, "error: --data x: folder not found"),
    (DataError("no images"), 2, "error: no images"),
    (OSError(errno.ENOSPC, "No space left on device", "/full/ckpt.pt"), 2,
     "error: No space left on device: /full/ckpt.pt"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_run_main_turns_user_errors_disk_errors_and_ctrl_c_into_one_line(capsys, error, code,
                                                                         fragment):
    def main():
        raise error
    assert common.run_main(main) == code
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert common.run_main(lambda: 0) == 0


def test_pick_amp_on_cpu():
    cpu = torch.device("cpu")
    assert common.pick_amp("off", cpu) is None
    assert common.pick_amp("bf16", cpu) is torch.bfloat16
    assert common.pick_amp("auto", cpu) is (torch.bfloat16 if common.cpu_has_native_bf16() else None)
    with pytest.raises(common.UserError, match="--amp fp16 needs CUDA"):
        common.pick_amp("fp16", cpu)
    with pytest.raises(common.UserError, match="not a device"):
        common.pick_device("toaster")


def test_ema_follows_the_warmed_up_decay_in_closed_form_float64():
    model = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = common.EMA(model, decay=0.9)
    expected = 0.0
    for step in range(30):
        with torch.no_grad():
            model.weight.fill_(float(step + 1))
        ema.update(model, step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * (step + 1)
        assert ema.model.weight.item() == pytest.approx(expected, rel=1e-12)
    assert not ema.model.weight.requires_grad and not ema.model.training


def test_progress_prints_a_line_and_appends_one_json_object_per_report(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    progress = common.Progress(log, total_steps=10, start_step=0, batch_size=4)
    progress.report(5, {"loss": 0.25})
    progress.report(10, {"loss": 0.125})
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(line["step"], line["loss"]) for line in lines] == [(5, 0.25), (10, 0.125)]
    assert all(line["img_per_s"] > 0 for line in lines)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 5/10 loss 0.25 |") and "ETA" in out[0]


def test_loss_guard_names_the_step_and_the_checkpoint_for_nan_loss_or_weights(tmp_path):
    model = torch.nn.Linear(2, 2)
    guard = common.LossGuard(tmp_path / "ckpt.pt")
    guard.check(1.0, 3, model)                                     # all finite: quiet
    with pytest.raises(common.UserError, match=r"loss became nan by step 3; .*ckpt\.pt"):
        guard.check(float("nan"), 3)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(common.UserError, match="weights became inf/NaN by step 4"):
        guard.check(None, 4, model)


def test_loss_guard_stops_a_loss_that_grows_by_orders_of_magnitude(tmp_path):
    guard = common.LossGuard(tmp_path / "ckpt.pt")
    guard.reference(2.0)                          # the first step's loss
    for step, loss in enumerate([1.5, 0.9, 0.5, 0.8, 30.0], start=1):   # noisy, 60x the lowest
        guard.check(loss, step)
    with pytest.raises(common.UserError, match=r"loss grew from 0\.5 to 2\.8e\+23 \(diverging\) "
                                               r"by step 6; stopped without saving.*ckpt\.pt"):
        guard.check(2.8e23, 6)
    early = common.LossGuard(tmp_path / "ckpt.pt")
    early.reference(2.0)                          # exploding before the first check is caught too
    with pytest.raises(common.UserError, match="diverging"):
        early.check(5e3, 50)


def test_out_of_memory_is_recognised_and_names_a_smaller_batch():
    assert common.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried ..."))
    assert common.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not common.is_oom(RuntimeError("shape mismatch"))
    assert "--batch-size 32" in str(common.oom_error(64))


def test_check_writable_refuses_a_folder_it_cannot_write_and_makes_nothing(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for bad in (a_file, a_file / "sub"):
        with pytest.raises(common.UserError, match="cannot write there"):
            common.check_writable(bad)
    common.check_writable(tmp_path / "new" / "run")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_finite_type_and_every_float_flag_reject_nan_and_inf():
    assert common.finite("-2.5") == -2.5
    for text in ("nan", "inf", "-inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.finite(text)


@pytest.mark.parametrize("script,flag", [("train_vae.py", "--beta"), ("train_vae.py", "--sigma"),
                                         ("train_flow.py", "--cfg"), ("train_flow.py", "--p-uncond"),
                                         ("sample.py", "--cfg"), ("evaluate.py", "--cfg")])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_float_flags_refuse_nan_and_inf_at_parse_time(cli, script, flag, value):
    rc, _, err = cli(script, flag, value)
    assert rc == 2 and "usage:" in err and flag in err and "Traceback" not in err


def test_parse_with_given_tells_flags_set_on_the_command_line_from_defaults():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--resume", action="store_true")
    args, given = common.parse_with_given(p, ["--lr", "0.1", "--resume"])
    assert (args.steps, args.lr, args.resume) == (5, 0.1, True)
    assert given == {"lr", "resume"}


def test_restore_settings_takes_stored_values_lists_changes_and_refuses_new_experiments(capsys):
    saved = {"lr": 0.5, "steps": 100, "seed": 3, "data": None, "out": "elsewhere"}
    args = argparse.Namespace(lr=0.1, steps=7, seed=0, data=None, out="here", resume=True)
    changes = common.restore_settings(args, {"lr", "out", "resume"}, saved, {"seed", "data"}, False)
    assert (args.lr, args.steps, args.seed, args.out) == (0.1, 100, 3, "here")
    assert changes == {"lr": 0.5}
    assert "resuming with changed settings: --lr 0.1 (was 0.5)" in capsys.readouterr().out
    args = argparse.Namespace(lr=0.5, steps=100, seed=9, data="x", out="here")
    with pytest.raises(common.UserError, match=r"--seed 9 \(was 3\), --data x \(was None\); "
                                               r"--seed, --data would make another experiment.*"
                                               r"--allow-changes"):
        common.restore_settings(args, {"seed", "data"}, saved, {"seed", "data"}, False)
    assert common.restore_settings(args, {"seed", "data"}, saved, {"seed", "data"}, True) == \
        {"seed": 3, "data": None}


def test_run_folder_refuses_a_folder_holding_a_run_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    folder = common.RunFolder(out)
    assert not out.exists()                                   # nothing made before claim
    folder.claim()
    (out / "ckpt.pt").write_bytes(b"x")
    (out / "samples_000010.png").write_bytes(b"x")
    (out / "latents.pt").write_bytes(b"cache")
    folder.release()
    with pytest.raises(common.UserError, match=r"already holds a run \(ckpt\.pt, samples_000010"
                                               r"\.png\); continue it with --resume, start over "
                                               r"with --overwrite"):
        common.RunFolder(out)
    common.RunFolder(out, resume=True).release()
    again = common.RunFolder(out, overwrite=True)
    again.claim()
    assert sorted(p.name for p in out.iterdir()) == [".lock", "latents.pt"]   # the cache stays
    again.release()
    with pytest.raises(common.UserError, match="nothing to resume"):
        common.RunFolder(tmp_path / "empty", resume=True)
    with pytest.raises(common.UserError, match="exclude each other"):
        common.RunFolder(out, resume=True, overwrite=True)


def test_run_folder_lock_refuses_a_live_second_writer_and_recovers_a_stale_lock(tmp_path, capsys):
    out = tmp_path / "run"
    first = common.RunFolder(out)
    first.claim()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(common._process_id(other.pid) + "\n")   # a live owner
        with pytest.raises(common.UserError, match=f"in use by another run \\(pid {other.pid}\\)"):
            common.RunFolder(out).claim()
    finally:
        other.kill()
        other.wait()
    stale = common.RunFolder(out)
    stale.claim()                                 # its owner is gone: the lock is taken over
    assert "stale lock" in capsys.readouterr().err
    assert (out / ".lock").read_text().split()[0] == str(os.getpid())
    stale.release()
    assert not (out / ".lock").exists()


def test_a_command_that_fails_before_writing_leaves_no_empty_folder(tmp_path):
    folder = common.RunFolder(tmp_path / "a" / "b")
    folder.claim()
    folder.release()                              # nothing was written: the folder goes again
    assert not (tmp_path / "a" / "b").exists()


def test_trim_log_drops_the_lines_after_the_resumed_step(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6, 8)))
    common.trim_log(log, 4)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [2, 4]


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"old")

    def fails(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(common.UserError, match="could not write .*No space left on device.*"
                                               "previous picture, if any, is intact"):
        common.atomic_write(path, fails, "picture")
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["x.png"]


def test_a_signal_during_a_deferred_block_arrives_after_it(monkeypatch):
    seen = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(("handler", signum)))
    try:
        with common.signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("block done")
        assert seen == ["block done", ("handler", signal.SIGTERM)]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_mps_falls_back_to_the_cpu_with_one_line_where_it_is_missing(capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert common.pick_device("mps") == torch.device("cpu")
    assert capsys.readouterr().err.strip() == \
        "warning: --device mps: MPS is not available on this machine; using the CPU"
    assert common.pick_amp("auto", torch.device("mps")) is None       # autocast only when asked
    assert common.device_defaults({"cpu": 1, "cuda": 2}, torch.device("mps")) == 1


def test_phase_prints_progress_with_an_eta_and_a_last_line(capsys, monkeypatch):
    clock = iter([0.0, 6.0, 7.0, 12.0, 13.0])                # seconds at each update
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    phase = common.Phase("encoding 100 images", 100)         # every 5 s
    phase.update(50)                                         # 6 s: half done -> ETA 6 s
    phase.update(60)                                         # 7 s: too soon for another line
    phase.update(100)                                        # 12 s: the end
    assert capsys.readouterr().out.splitlines() == ["encoding 100 images: 50/100 in 6 s, ETA 6 s",
                                                    "encoding 100 images: 100/100 in 12 s, done"]


def test_plot_loss_draws_the_logged_curve_and_redraws_it_with_more_points(tmp_path):
    log, png = tmp_path / "log.jsonl", tmp_path / "loss.png"
    log.write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2, 4)))
    common.plot_loss(log, png)
    first = png.read_bytes()
    image = np.asarray(Image.open(png))
    assert image.shape == (400, 640, 3) and (image != 255).any(axis=2).sum() > 500   # ink
    with open(log, "a") as f:
        f.write(json.dumps({"step": 8, "loss": 0.1}) + "\n")
    common.plot_loss(log, png)
    assert png.read_bytes() != first


@pytest.mark.parametrize("script", ["train_vae.py", "train_flow.py", "sample.py", "evaluate.py",
                                    "bench.py", "dit.py"])
def test_every_help_ends_with_examples(cli, script):
    rc, out, _ = cli(script, "--help")
    examples = out[out.rindex("example"):].splitlines()
    assert rc == 0 and 3 <= len(examples) <= 4 and all(f"python {script}" in line
                                                        for line in examples[1:])
