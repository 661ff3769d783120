"""End-to-end tests of train_vae.py on a CPU with tiny settings (Algorithm 7): the files of a
run, its falling loss; user mistakes as one line with exit status 2; NaN, out of memory,
SIGKILL at random moments and Ctrl-C lose nothing, and a resumed run equals a straight one."""

import json
import os
import random
import re
import shlex
import signal
import time

import pytest
import torch
from PIL import Image

import checkpoint
import common
import data as data_lib
import train_vae


def test_vae_run_writes_checkpoint_recon_grid_and_log_and_its_loss_falls(runs, expect, tiny):
    d = runs["vae_dir"]
    assert sorted(p.name for p in d.iterdir()) == ["args.json", "ckpt.pt", "log.jsonl",
                                                   "loss.png", "recon.png"]
    assert json.loads((d / "args.json").read_text()) == checkpoint.load_checkpoint(
        runs["vae"], "vae")["args"]                                 # the settings it ran with
    ckpt = checkpoint.load_checkpoint(runs["vae"], "vae")
    assert ckpt["step"] == tiny.vae_steps and ckpt["version"] == checkpoint.FORMAT_VERSION
    # originals over reconstructions, 32 px drawn 2x like the sample grids
    assert Image.open(d / "recon.png").size == expect.grid_size(2, 8, px=64)
    lines = expect.log_lines(d)
    progress = [line for line in lines if "loss" in line]
    assert [line["step"] for line in progress] == [1] + list(range(4, tiny.vae_steps + 1, 4))
    assert ckpt["finished"] and ckpt["latents"].shape == (64, 4, 8, 8)   # recipe step 2's
    assert progress[-1]["loss"] < progress[0]["loss"]
    assert "heldout_psnr" in lines[-1] and len(lines[-1]["latent_std"]) == 4


# ---------------------------------------------------------------------------------------------
# mistakes: one line, exit 2, nothing lost


def test_bad_data_folders_are_one_line_errors(cli, tmp_path, expect, tiny):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"{i}.png").write_bytes(os.urandom(64))
    cases = [(tmp_path / "missing", "folder not found"), (empty, "no image files found"),
             (corrupt, "none of the 3 image files could be read"),
             (corrupt / "0.png", "is a file, not a folder")]
    for data, fragment in cases:
        expect.one_line_error(cli("train_vae.py", "--data", data, "--out", tmp_path / "o", *tiny.cpu),
                              fragment)


def test_bad_data_as_a_real_subprocess_exits_2_with_one_line(tmp_path, expect, tiny, run):
    proc = run("train_vae.py", "--data", tmp_path / "missing", "--out", tmp_path / "o", *tiny.cpu,
               check=False)
    expect.one_line_error((proc.returncode, proc.stdout, proc.stderr), "folder not found")


def test_device_and_amp_mistakes(cli, tmp_path, runs, expect, monkeypatch):
    def slow_work(*args, **kwargs):
        raise AssertionError("data loaded before the flags were checked")
    monkeypatch.setattr(data_lib, "load_dataset", slow_work)
    if not torch.cuda.is_available():
        expect.one_line_error(cli("train_vae.py", "--device", "cuda", "--out", tmp_path),
                              "CUDA is not available")
        expect.one_line_error(cli("sample.py", "--ckpt", runs["flow"], "--device", "cuda"),
                              "CUDA is not available")
    for script in ("train_vae.py", "train_flow.py"):
        expect.one_line_error(cli(script, "--device", "cpu", "--amp", "fp16", "--out", tmp_path),
                              "--amp fp16 needs a GPU")
    expect.one_line_error(cli("evaluate.py", "--ckpt", runs["flow"], "--device", "cpu", "--amp",
                              "fp16"), "--amp fp16 needs a GPU")
    expect.one_line_error(cli("train_vae.py", "--device", "toaster", "--out", tmp_path),
                          "not a device")


def test_unwritable_out_is_one_line(cli, tmp_path, runs, expect, tiny):
    a_file = tmp_path / "file"
    a_file.write_text("")
    expect.one_line_error(cli("train_vae.py", "--out", a_file / "sub", *tiny.cpu), "cannot write there")
    expect.one_line_error(cli("sample.py", "--ckpt", runs["flow"], "--out", a_file / "x.png"),
                          "cannot write there")
    for name in ("x", "x.psd", "x.xbm"):     # no suffix; read only; Pillow writes no RGB there
        expect.one_line_error(cli("sample.py", "--ckpt", runs["flow"], "--out", tmp_path / name),
                              "not an image file name")


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried ..."),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_names_the_batch_size_to_lower(cli, monkeypatch, tmp_path, error, tiny, expect):
    def oom(*a, **k):
        raise error
    monkeypatch.setattr("vae.vae_loss", oom)
    expect.one_line_error(cli("train_vae.py", "--out", tmp_path, "--batch-size", 8, "--n-builtin", 16,
                              *tiny.cpu), "out of memory; lower --batch-size")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(cli, runs, tmp_path, expect, tiny):
    out = tmp_path / "vae"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(runs["vae"].read_bytes())
    before = (out / "ckpt.pt").read_bytes()
    rc, out_text, err = cli("train_vae.py", "--out", out, *tiny.vae_flags, "--resume", "--lr", "1e30",
                            "--steps", tiny.vae_steps + 4, "--log-every", 1, "--ckpt-every", 100)
    expect.one_line_error((rc, out_text, err), "by step")
    assert re.search(r"(loss became (nan|inf)|weights became inf/NaN) by step 1[78]", err), err
    assert (out / "ckpt.pt").read_bytes() == before
    assert not list(out.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# crashes: SIGKILL at random moments, Ctrl-C; memory


def test_sigkill_at_random_moments_then_resume_equals_the_straight_run(
        runs, tmp_path, expect, tiny, run, start):
    out = tmp_path / "vae"
    args = ["--out", out, *tiny.vae_flags, "--steps", tiny.vae_steps]
    rng = random.Random(1234)
    for kill in range(2):
        resume = ["--resume"] if (out / "ckpt.pt").exists() else []
        proc = start("train_vae.py", *args, *resume)
        expect.wait_for_step(proc, 4 * (kill + 1))               # training, checkpoints being written
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.wait()
        ckpt = checkpoint.load_checkpoint(out / "ckpt.pt", "vae", flag="--resume")   # always loads
        assert ckpt["step"] % 2 == 0 and ckpt["step"] >= 2
    run("train_vae.py", *args, "--resume")
    expect.same_weights(out / "ckpt.pt", runs["vae"])
    assert not list(out.glob("*.tmp"))                     # leftovers of the kills are cleaned


def test_sigterm_saves_an_unfinished_checkpoint_and_a_bare_resume_continues(
        cli, tmp_path, expect, tiny, start):
    """A real signal to a real process (Ctrl-C's SIGINT, the same handler, stops the first writer
    of the lock test below)."""
    out = tmp_path / "my vae"                   # the printed command quotes it
    proc = start("train_vae.py", "--out", out, *tiny.vae_flags, "--steps", 1000, "--log-every", 1)
    expect.wait_for_step(proc, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    command = err.split("resume with: ")[1].splitlines()[0]
    assert shlex.split(command) == ["python", "train_vae.py", "--resume", "--out", str(out)]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    step = ckpt["step"]
    assert step >= 2 and ckpt["finished"] is False
    with pytest.raises(common.UserError, match="this VAE is unfinished .* train_vae.py --resume"):
        checkpoint.load_vae(out / "ckpt.pt", "cpu")                 # never used as it is
    rc, done, err = cli("train_vae.py", "--resume", "--out", out, "--steps", step + 2)  # stored
    assert rc == 0 and f"at step {step}" in done and f"step {step + 2}/{step + 2}" in done, err
    assert "64 images" in done and "--steps 1002" not in done
    assert "resuming with changed settings: --steps " + str(step + 2) in done
    assert torch.load(out / "ckpt.pt", weights_only=True)["finished"]


def test_a_second_signal_during_a_save_never_tears_the_file_or_prints_a_traceback(
        cli, tmp_path, tiny, monkeypatch):
    """Both signals land while torch.save is writing (from inside the file's write()): the file
    is finished first, then the second signal stops the run, with one line and exit 130."""
    real_save = torch.save

    def save_while_signalled(obj, f):
        class Interrupting:
            def __init__(self):
                self.sent = 0

            def write(self, data):
                if self.sent < 2:
                    self.sent += 1
                    os.kill(os.getpid(), signal.SIGINT)
                return f.write(data)

            def flush(self):
                f.flush()
        real_save(obj, Interrupting())
    monkeypatch.setattr(torch, "save", save_while_signalled)
    out = tmp_path / "vae"
    rc, _, err = cli("train_vae.py", "--out", out, *tiny.vae_flags, "--steps", 6)
    assert rc == 130 and "Traceback" not in err, err
    ckpt = checkpoint.load_checkpoint(out / "ckpt.pt", "vae")        # complete: every CRC right
    assert ckpt["step"] == 2 and not list(out.glob("*.tmp"))


def test_a_folder_of_under_20_images_says_its_psnr_is_on_training_images(cli, tmp_path, tiny):
    data = tmp_path / "imgs"
    data.mkdir()
    for i in range(5):
        Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(data / f"{i}.png")
    rc, out, err = cli("train_vae.py", "--data", data, "--out", tmp_path / "v", "--steps", 2,
                       "--batch-size", 2, *tiny.cpu)
    assert rc == 0, err
    assert "training-image (none held out) PSNR" in out
    assert "held-out PSNR" not in out
    # a folder of images gets 8 latent channels and beta 1.0 (the built-in shapes 4 and 0.25),
    # and the run stores the beta it trained with, not "by the data"
    ckpt = checkpoint.load_checkpoint(tmp_path / "v" / "ckpt.pt", "vae")
    assert ckpt["latents"].shape[1] == 8 and ckpt["args"]["beta"] == 1.0
    assert "beta 1.0" in out


def test_latent_channels_and_beta_follow_the_data_unless_given(tmp_path):
    def k_beta(*argv):
        args = train_vae.parser().parse([str(a) for a in argv])[0]
        return train_vae.vae_config(args).latent_channels, train_vae.vae_beta(args)
    assert [k_beta(), k_beta("--data", tmp_path),
            k_beta("--data", tmp_path, "--latent-channels", 4, "--beta", 0.25),
            k_beta("--latent-channels", 16, "--beta", 0)] == [(4, 0.25), (8, 1.0), (4, 0.25), (16, 0)]


def test_a_finished_run_is_not_overwritten_and_resume_says_it_is_done(cli, runs, tmp_path, expect,
                                                                      tiny):
    out = tmp_path / "vae"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(runs["vae"].read_bytes())
    (out / "log.jsonl").write_text('{"step": 16, "loss": 1.0}\n')
    before = (out / "ckpt.pt").read_bytes()
    rc, _, err = cli("train_vae.py", "--out", out, *tiny.vae_flags, "--steps", 2)
    expect.one_line_error((rc, _, err), "already holds a run (ckpt.pt, log.jsonl)")
    assert "--resume" in err and "--overwrite" in err
    rc, stdout, err = cli("train_vae.py", "--out", out, "--resume")
    assert rc == 0 and "is finished at step 16; nothing to do" in stdout, err
    assert (out / "ckpt.pt").read_bytes() == before
    rc, stdout, err = cli("train_vae.py", "--out", out, *tiny.vae_flags, "--steps", 2, "--overwrite")
    assert rc == 0, err
    assert [line["step"] for line in expect.log_lines(out)] == [1, 2, 2]   # progress + final report
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_a_second_writer_is_locked_out_while_the_first_runs_on(cli, tmp_path, expect, tiny, start):
    out = tmp_path / "vae"
    first = start("train_vae.py", "--out", out, *tiny.vae_flags, "--steps", 400, "--log-every", 1,
                  "--ckpt-every", 1)
    try:
        expect.wait_for_step(first, 3)
        rc, _, err = cli("train_vae.py", "--out", out, "--resume", *tiny.cpu)
        expect.one_line_error((rc, _, err), f"is in use by another command (pid {first.pid})")
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 130 and "resume with:" in err, err   # it was not disturbed
    finally:
        first.kill()
    assert checkpoint.load_checkpoint(out / "ckpt.pt", "vae")["step"] >= 3
    assert not (out / ".lock").exists()


def test_resume_keeps_the_log_free_of_repeated_steps_and_its_clock_running(cli, tmp_path, expect,
                                                                          tiny):
    out = tmp_path / "vae"
    flags = ["--out", out, *tiny.vae_flags, "--log-every", 2]
    assert cli("train_vae.py", *flags, "--steps", 4)[0] == 0
    with open(out / "log.jsonl", "a") as f:                 # logged after the last checkpoint
        f.write('{"step": 6, "loss": 1.0, "time": 99.0}\n')
    rc, _, err = cli("train_vae.py", "--out", out, "--resume", "--steps", 8)
    assert rc == 0, err
    progress = [line for line in expect.log_lines(out) if "loss" in line]
    assert [line["step"] for line in progress] == [1, 2, 4, 6, 8]     # no step twice
    times = [line["time"] for line in progress]
    assert times == sorted(times) and 99.0 not in times


def test_diverging_loss_stops_like_a_nan_naming_the_step_and_checkpoint(cli, tmp_path, tiny):
    rc, _, err = cli("train_vae.py", "--out", tmp_path / "v", *tiny.vae_flags, "--steps", 40,
                     "--lr", "1e9", "--log-every", 20)
    assert rc == 2 and "Traceback" not in err
    assert re.search(r"(diverging\)|loss became (nan|inf)|weights became inf/NaN) by step \d+; "
                     r"stopped without saving", err), err


def test_ctrl_c_before_the_training_loop_exits_130_without_traceback(cli, monkeypatch, tmp_path, tiny):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("data.load_dataset", interrupted)
    rc, _, err = cli("train_vae.py", "--out", tmp_path, *tiny.cpu)
    assert rc == 130 and "interrupted" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# runs that restart, logs that are never written through (issue 22)


def test_a_run_stopped_before_its_first_checkpoint_restarts_with_the_same_command(
        cli, tmp_path, tiny, monkeypatch, expect):
    out = tmp_path / "vae"
    args = ["train_vae.py", "--out", out, *tiny.vae_flags, "--steps", 4, "--ckpt-every", 100,
            "--log-every", 1, "--n-builtin", 16]

    def killed(*a, **k):                       # the process dies as it would write its checkpoint
        raise KeyboardInterrupt
    monkeypatch.setattr("runs.save_checkpoint", killed)
    assert cli(*args)[0] == 130
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["args.json", "log.jsonl", "loss.png"]   # no checkpoint
    expect.one_line_error(cli("train_vae.py", "--out", out, "--resume"),
                          "stopped before its first checkpoint; start it again with its command")
    rc, stdout, err = cli(*args)
    assert rc == 0, err
    assert "starting again a run stopped early: the files args.json, log.jsonl, loss.png" in err
    assert [line["step"] for line in expect.log_lines(out)] == [1, 2, 3, 4, 4]   # not twice
    assert checkpoint.load_checkpoint(out / "ckpt.pt", "vae")["finished"]


def test_resume_through_a_symlinked_log_with_a_torn_line_copies_it_and_goes_on(
        cli, runs, tmp_path, tiny, expect):
    out = tmp_path / "vae"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(runs["vae"].read_bytes())
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text((runs["vae_dir"] / "log.jsonl").read_text() + '\n{"step": 17, "lo')
    before = elsewhere.read_text()
    (out / "log.jsonl").symlink_to(elsewhere)
    rc, stdout, err = cli("train_vae.py", "--out", out, "--resume", "--steps", tiny.vae_steps + 1,
                          "--log-every", 1)
    assert rc == 0 and "Traceback" not in err, err
    assert elsewhere.read_text() == before                      # never written through
    assert not (out / "log.jsonl").is_symlink()
    steps = [line["step"] for line in expect.log_lines(out)]
    assert steps[-2:] == [tiny.vae_steps + 1] * 2 and "dropped 2 line(s)" in err


def test_a_batch_size_nothing_can_hold_is_refused_at_parse_time(cli, tmp_path, tiny):
    for flag, value in [("--batch-size", 99999999999999999999999), ("--steps", 10 ** 12)]:
        rc, _, err = cli("train_vae.py", "--out", tmp_path / "v", flag, value, *tiny.cpu)
        assert rc == 2 and "usage:" not in err and flag in err and "at most" in err, err
    assert not (tmp_path / "v").exists()
