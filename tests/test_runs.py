"""Tests of runs.py: one run per folder (the lock, --resume, --overwrite that never deletes an
input), the stored settings of a resumed run checked like the command line's, the log, the loss
plot, and the averaged weights."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import runs as runs_lib
import train_vae


def open_run(out, *argv, experiment=train_vae.EXPERIMENT):
    return runs_lib.Run(train_vae.parser(), ["--out", str(out), "--device", "cpu", *map(str, argv)],
                    "vae", experiment)


def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("ckpt.pt", "log.jsonl", "notes.txt", "samples_000100.png"):
        (out / name).write_text("x")
    with pytest.raises(common.UserError, match="already holds a run .*continue it with --resume"):
        open_run(out).lock()
    with pytest.raises(common.UserError, match="exclude each other"):
        open_run(out, "--resume", "--overwrite")
    run = open_run(out, "--overwrite")
    run.lock()
    assert "--overwrite: the files ckpt.pt, log.jsonl, samples_000100.png" in capsys.readouterr().err
    assert (out / "ckpt.pt").exists()                       # deleted only when training starts
    model = torch.nn.Linear(1, 1)
    run.begin(model, runs_lib.EMA(model, 0.9), torch.optim.SGD(model.parameters(), 0.1),
              torch.amp.GradScaler("cpu", enabled=False))
    run.close()
    assert sorted(os.listdir(out)) == ["args.json", "notes.txt"]   # not the user's file


def test_overwrite_never_deletes_an_input_and_out_never_lies_inside_data(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_text("the VAE this command reads")
    with pytest.raises(common.UserError, match="would delete a file this command reads as --vae"):
        open_run(out, "--overwrite").lock([("--vae", out / "." / "ckpt.pt")])
    data = tmp_path / "photos"
    data.mkdir()
    with pytest.raises(common.UserError, match="is inside --data"):
        open_run(data / "run", "--data", data).lock()
    assert not (data / "run").exists() and (out / "ckpt.pt").exists()


def test_the_lock_refuses_a_live_command_and_takes_over_a_dead_ones(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(str(os.getppid()))                  # a live process
    with pytest.raises(common.UserError, match=f"in use by another command \\(pid {os.getppid()}\\)"):
        open_run(out).lock()
    (out / ".lock").write_text("")               # made a moment ago, its pid not yet written
    with pytest.raises(common.UserError, match="in use by another command \\(pid \\?\\)"):
        open_run(out).lock()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    for stale in (dead, "not a pid", str(2 ** 40), ""):
        (out / ".lock").write_text(stale)
        os.utime(out / ".lock", (0, 0))                # ("": left empty long ago)
        run = open_run(out)
        run.lock()
        assert (out / ".lock").read_text() == str(os.getpid())
        run.close()
        assert not (out / ".lock").exists()
    assert "removed the stale lock" in capsys.readouterr().err


@pytest.mark.parametrize("theirs", ["pid", ""])          # "": its pid not yet written
def test_of_two_commands_taking_over_one_stale_lock_only_the_first_runs(tmp_path, monkeypatch,
                                                                        theirs):
    theirs = str(os.getppid()) if theirs == "pid" else theirs              # a live process
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("not a pid")                           # a dead command's
    live_owner = runs_lib._live_owner

    def first_takes_it_meanwhile(lock):             # this command saw the lock stale; before it
        seen = live_owner(lock)                     # acts, the other removes it and locks anew
        if seen is None and lock.name == ".lock":
            lock.unlink()
            lock.write_text(theirs)
        return seen

    monkeypatch.setattr(runs_lib, "_live_owner", first_takes_it_meanwhile)
    with pytest.raises(common.UserError, match=f"in use by another command \\(pid {theirs or '.'}\\)"):
        open_run(out).lock()
    assert os.listdir(out) == [".lock"] and (out / ".lock").read_text() == theirs


def test_a_command_that_fails_after_locking_leaves_no_empty_folder(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(common.UserError):
        with open_run(out) as run:
            run.lock()
            assert (out / ".lock").exists()
            raise common.UserError("a mistake found after the lock")
    assert not out.exists()


def test_resume_takes_the_stored_settings_checks_them_and_refuses_another_experiment(runs, tmp_path,
                                                                                    capsys):
    out = runs["vae_dir"]
    run = open_run(out, "--resume", "--lr", "5e-4", "--steps", "99")
    stored = json.loads((out / "args.json").read_text())
    assert run.args.n_builtin == stored["n_builtin"] == 64 and run.args.lr == 5e-4
    assert "resuming with changed settings: --steps 99 (was 16), --lr 0.0005 (was 0.001)" in \
        capsys.readouterr().out
    with pytest.raises(common.UserError, match="--seed 3 \\(was 0\\).* would make another experiment"):
        open_run(out, "--resume", "--seed", "3")
    assert open_run(out, "--resume", "--seed", "3", "--allow-changes").args.seed == 3


def test_a_stored_setting_no_flag_allows_is_refused_on_resume(runs, tmp_path, monkeypatch):
    ckpt = torch.load(runs["vae"], weights_only=True)
    monkeypatch.setattr(runs_lib, "load_checkpoint",
                        lambda *a: {**ckpt, "args": {**ckpt["args"], "batch_size": 10 ** 9}})
    (tmp_path / "ckpt.pt").write_text("x")
    with pytest.raises(common.UserError, match="stored --batch-size 1000000000 is not valid"):
        open_run(tmp_path, "--resume")


def test_a_setting_newer_than_the_run_takes_todays_default_and_says_so(runs, tmp_path,
                                                                        monkeypatch, capsys):
    ckpt = torch.load(runs["vae"], weights_only=True)
    stored = {k: v for k, v in ckpt["args"].items() if k not in ("lr", "grad_clip")}
    monkeypatch.setattr(runs_lib, "load_checkpoint", lambda *a: {**ckpt, "args": stored})
    (tmp_path / "ckpt.pt").write_text("x")
    run = open_run(tmp_path, "--resume", "--grad-clip", "2")
    assert run.args.lr == train_vae.DEFAULTS["lr"] and run.args.grad_clip == 2
    err = capsys.readouterr().err
    assert f"settings newer than this run take today's defaults: --lr {train_vae.DEFAULTS['lr']}" \
        in err and "--grad-clip" not in err
    monkeypatch.undo()
    open_run(runs["vae_dir"], "--resume")                      # a run that stored every setting
    assert "newer" not in capsys.readouterr().err


def test_a_resumed_run_takes_the_optimizer_flags_given_and_a_fresh_fp16_loss_scale(runs,
                                                                                  tmp_path):
    out = tmp_path / "vae"                   # a float32 run: its disabled GradScaler stored {}
    shutil.copytree(runs["vae_dir"], out)
    with open_run(out, "--resume", "--weight-decay", 0.1, "--lr", 5e-4) as run:
        run.lock()
        model, ema, opt, _ = train_vae.build(train_vae.vae_config(run.args), run.args,
                                             run.device, None)
        scaler = torch.amp.GradScaler("cpu", enabled=True)         # as --amp fp16 makes it
        assert run.resume["scaler"] == {}
        assert run.begin(model, ema, opt, scaler) == run.resume["step"]
        assert scaler.get_scale() == 2.0 ** 16                     # GradScaler's initial scale
        assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(5e-4, 0.1)]


def test_a_run_saved_with_more_gpus_resumes_their_random_states_on_fewer(runs, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "vae"
    shutil.copytree(runs["vae_dir"], out)
    restored = []
    with open_run(out, "--resume") as run:
        run.lock()
        run.resume["rng"]["cuda"] = [torch.zeros(8, dtype=torch.uint8)] * 2   # two GPUs then
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)           # one now
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
        model, ema, opt, scaler = train_vae.build(train_vae.vae_config(run.args), run.args,
                                                  torch.device("cpu"), None)
        run.begin(model, ema, opt, scaler)
    assert len(restored) == 1


def test_plot_loss_draws_the_logged_curve(tmp_path):
    log, png = tmp_path / "log.jsonl", tmp_path / "loss.png"
    log.write_text("".join(json.dumps({"step": s, "loss": 10 / s}) + "\n" for s in range(1, 50)))
    runs_lib.plot_loss(log, png)
    pixels = torch.from_numpy(np.array(Image.open(png).convert("L")))
    assert Image.open(png).size == (640, 400) and (pixels < 128).sum() > 500    # a drawn line


def test_ema_follows_the_warmed_up_decay_in_closed_form_float64():
    model = torch.nn.Linear(1, 1, bias=False).double()
    ema, expected = runs_lib.EMA(model, 0.99), model.weight.item()
    for step in range(30):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ema.update(model, step)
        d = min(0.99, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * step
        assert ema.model.weight.item() == pytest.approx(expected, rel=1e-12)


def test_fused_adamw_takes_the_same_steps_as_the_reference_implementation():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    fused = runs_lib.adamw(a.parameters(), 1e-2, (0.9, 0.95), 0.1)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(16, 8)
        for model, opt in ((a, fused), (b, plain)):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


def test_a_run_stopped_early_restarts_though_the_settings_its_script_derives_differ(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    run = open_run(out, "--steps", 7)
    (out / "args.json").write_text(json.dumps({**run.settings(), "steps": 9}))  # sized otherwise
    (out / "log.jsonl").write_text("")
    with pytest.raises(common.UserError, match="already holds a run"):
        run.lock()                                  # another --steps: another run
    run.derived = {"steps"}
    run.lock()                                      # derived by the script (--minutes): the same
    assert run.replaced == ["args.json", "log.jsonl"]
    run.close()
