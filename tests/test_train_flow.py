"""End-to-end tests of train_flow.py on a CPU with tiny settings (the latent-diffusion recipe):
the files of a run and its falling loss, a folder of the user's images, a resumed run equal to a
straight one, the automatic VAE (beside --out, locked, finished, never deleted), mistakes as one
line before any slow work."""
import argparse
import hashlib
import json
import os
import re
import signal

import pytest
import torch
from PIL import Image

import checkpoint
import common
import data as data_lib
import plan
import runs as runs_lib
import sample
import shapes
import train_flow
import train_vae
from dit import DiT, DiTConfig, dit_preset
from embeddings import null_prompt, prompt_pieces, tokenize
from flow import flow_matching_loss


def test_flow_run_writes_checkpoint_sample_grids_and_log_and_its_loss_falls(runs, expect):
    d = runs["flow_dir"]
    assert sorted(p.name for p in d.iterdir()) == [
        "args.json", "ckpt.pt", "log.jsonl", "loss.png", "prompts.txt", "samples_000004.png",
        "samples_000006.png"]
    ckpt = torch.load(runs["flow"], weights_only=True)
    prompts = ckpt["sample_prompts"]
    grid = Image.open(d / "samples_000006.png")
    assert len(prompts) == 3 and grid.width == expect.grid_size(3, 2, px=64)[0]   # 32 px drawn 2x
    assert grid.height > expect.grid_size(3, 2, px=64)[1]                     # + a label per row
    assert json.loads(grid.text["prompts"]) == prompts and grid.text["steps"] == "2"
    assert (d / "prompts.txt").read_text().splitlines() == prompts
    assert json.loads((d / "args.json").read_text()) == ckpt["args"]
    assert [line["step"] for line in expect.log_lines(d)] == [1, 3, 6]
    # Six noisy steps are too few for the logged losses to fall reliably; on fixed noise the
    # trained weights must beat the initial ones.
    mu = torch.load(runs["vae"], weights_only=True)["latents"]
    assert _fixed_noise_loss(ckpt, ckpt["model"], mu) < _fixed_noise_loss(ckpt, None, mu) - 0.01


def _fixed_noise_loss(ckpt, state, mu):
    info = ckpt["vae"]
    z = (mu - info["latent_mean"].view(1, -1, 1, 1)) / info["latent_std"].view(1, -1, 1, 1)
    captions = data_lib.load_dataset(None, 32, "train", n_builtin=64).captions
    tokens = tokenize(captions, ckpt["config"]["max_prompt_len"])
    null = null_prompt(ckpt["config"]["max_prompt_len"])
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_dict(ckpt["config"]))
    if state is not None:
        model.load_state_dict(state)
    torch.manual_seed(1)
    with torch.no_grad():
        return sum(flow_matching_loss(model, z, tokens, null, 0.0).item() for _ in range(3)) / 3


def test_flow_resumed_after_half_the_steps_equals_the_straight_run(cli, runs, tmp_path, expect, tiny,
                                                                   run):
    out = tmp_path / "flow"        # the first half in this process, on one thread as `run`'s
    assert cli("train_flow.py", "--vae", runs["vae"], "--out", out, *tiny.flow_flags, "--steps",
               tiny.flow_steps // 2, "--threads", 1)[0] == 0
    proc = run("train_flow.py", "--resume", "--out", out, "--steps", tiny.flow_steps)
    assert f"resumed {out / 'ckpt.pt'} at step {tiny.flow_steps // 2}" in proc.stdout
    assert f"resuming with changed settings: --steps {tiny.flow_steps} (was 3)" in proc.stdout
    expect.same_weights(out / "ckpt.pt", runs["flow"])
    assert [line["step"] for line in expect.log_lines(out)] == [1, 3, 6]   # no step twice


def test_flow_on_a_folder_of_images_reads_them_once_and_names_the_unreadable(runs, tmp_path, tiny,
                                                                            run):
    data = tmp_path / "imgs"
    data.mkdir()
    base = Image.new("RGB", (40, 36), (200, 30, 30))
    for mode in ("RGB", "RGBA", "L", "P"):
        base.convert(mode).save(data / f"{mode}.png")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = run("train_flow.py", "--vae", runs["vae"], "--data", data, "--out", tmp_path / "flow",
               "--steps", 1, "--batch-size", 4, "--sample-steps", 1, "--preset", "micro", *tiny.cpu)
    assert proc.stdout.count("1 unreadable files skipped: broken.png") == 1
    assert "unreadable" not in proc.stderr and "Traceback" not in proc.stderr
    assert "was trained on shapes-32-seed0" in proc.stderr     # the shared VAE is not this data's
    assert "encoded 4 images" in proc.stdout and (tmp_path / "flow" / "samples_000001.png").is_file()


def _no_images(*args, **kwargs):
    """Stands in for data.build_shapes where a mistake must be found before any image is drawn."""
    raise AssertionError("the built-in images were drawn before the flags were checked")


def test_mistakes_are_one_line_before_any_slow_work_and_make_no_folder(cli, runs, tmp_path, expect,
                                                                      tiny, flow_args, monkeypatch):
    monkeypatch.setattr(data_lib, "build_shapes", _no_images)
    rc, out, err = cli(*flow_args(tmp_path / "f", "--image-size", 40, "--patch-size", 4))
    expect.one_line_error((rc, out, err), "divisible by the VAE factor 4 x patch size 4 = 16")
    args = flow_args(tmp_path / "f")
    args[args.index("--vae") + 1] = tmp_path
    expect.one_line_error(cli(*args), "is a folder; pass its ckpt.pt")
    expect.one_line_error(cli("train_flow.py", "--data", tmp_path / "nowhere", "--out",
                              tmp_path / "f", *tiny.cpu), "folder not found")
    expect.one_line_error(cli("train_vae.py", "--image-size", 33, "--out", tmp_path / "f", *tiny.cpu),
                          "not divisible by the downsampling factor 8")
    assert sorted(os.listdir(tmp_path)) == []                 # no folder, no automatic VAE


def test_resume_restores_the_settings_refuses_another_experiment_and_works_from_anywhere(
        cli, runs, tmp_path, expect, flow_args, monkeypatch):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "ckpt.pt").write_bytes(runs["vae"].read_bytes())
    args = flow_args("f", "--grid-prompts", 1, "--grid-images", 1, "--lr", "3e-4")
    args[args.index("--vae") + 1] = "v/ckpt.pt"                       # relative, as typed
    assert cli(*args)[0] == 0                                         # cli runs in tmp_path
    out = tmp_path / "f"
    for flags, fragment in [(["--seed", 1], "--seed 1 (was 0); --seed would make another"),
                            (["--patch-size", 1], "--patch-size would make another experiment")]:
        expect.one_line_error(cli("train_flow.py", "--out", out, "--resume", "--steps", 2, *flags),
                              fragment)
    rc, _, err = cli("train_flow.py", "--out", out, "--resume", "--patch-size", 1,
                     "--allow-changes", "--steps", 2)
    expect.one_line_error((rc, _, err), "it does not fit this model")
    # a byte-identical copy of its VAE, elsewhere, is the same VAE
    (tmp_path / "v").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    rc, stdout, err = cli("train_flow.py", "--resume", "--out", out, "--steps", 2, "--cfg", 3,
                          "--vae", tmp_path / "moved" / "ckpt.pt")
    assert rc == 0 and "resumed" in stdout, err
    assert "--steps 2 (was 1), --vae" in stdout and "--cfg 3.0 (was 2.0)" in stdout
    settings = json.loads((out / "args.json").read_text())
    assert settings["lr"] == 3e-4 and settings["steps"] == 2          # stored, then changed
    (tmp_path / "moved").rename(tmp_path / "gone")
    expect.one_line_error(cli("train_flow.py", "--out", out, "--resume", "--steps", 3),
                          "file not found; pass the VAE the run was trained with (or a copy)")
    ckpt = torch.load(tmp_path / "gone" / "ckpt.pt", weights_only=True)
    ckpt["elapsed"] += 1.0                          # another VAE file: refused before the images
    checkpoint.save_checkpoint(tmp_path / "other.pt", ckpt)
    monkeypatch.setattr(data_lib, "build_shapes", _no_images)
    expect.one_line_error(cli("train_flow.py", "--out", out, "--resume", "--steps", 3, "--vae",
                              tmp_path / "other.pt"), "the run was trained with another VAE")


def test_a_finished_run_is_kept_and_ctrl_c_in_its_last_step_or_grid_still_finishes_it(
        cli, runs, tmp_path, expect, flow_args, monkeypatch):
    out = tmp_path / "flow"
    real_generate = sample.generate

    def interrupted(*a, **k):                               # Ctrl-C while the grid is drawn
        os.kill(os.getpid(), signal.SIGINT)
        return real_generate(*a, **k)
    monkeypatch.setattr(sample, "generate", interrupted)
    rc, _, err = cli(*flow_args(out, "--grid-prompts", 1, "--grid-images", 1))
    assert rc == 130 and f"resume with: python train_flow.py --resume --out {out}" in err, err
    assert (out / "samples_000001.png").is_file()            # the grid, then the checkpoint
    monkeypatch.undo()
    ckpt = (out / "ckpt.pt").read_bytes()
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 1
    expect.one_line_error(cli(*flow_args(out)), f"--out {out} already holds a run")
    rc, stdout, err = cli("train_flow.py", "--out", out, "--resume")
    assert rc == 0 and "is already at step 1 of 1; nothing to do" in stdout, err
    assert (out / "ckpt.pt").read_bytes() == ckpt
    real_log = runs_lib.Run.log

    def log(self, step, *a, **k):                           # Ctrl-C in the last step itself
        os.kill(os.getpid(), signal.SIGINT)
        return real_log(self, step, *a, **k)
    monkeypatch.setattr(runs_lib.Run, "log", log)
    rc, _, err = cli(*flow_args(tmp_path / "last", "--grid-prompts", 1, "--grid-images", 1))
    assert rc == 130 and (tmp_path / "last" / "samples_000001.png").is_file(), err


def test_the_automatic_vae_lives_beside_out_is_finished_if_stopped_and_never_deleted(
        cli, runs, tmp_path, expect, tiny, monkeypatch):
    flags = ["--steps", 1, "--n-builtin", 64, "--batch-size", 8, "--sample-steps", 1, "--preset",
             "micro", *tiny.cpu]
    vae = tmp_path / "runs" / "vae-shapes-32px-seed0-n64-4steps" / "ckpt.pt"
    ckpt = torch.load(runs["vae"], weights_only=True)              # as a stopped run left it
    ckpt.update(step=2, finished=False, args={**ckpt["args"], "steps": 4})
    del ckpt["latents"], ckpt["data_key"]
    checkpoint.save_checkpoint(vae, ckpt)
    monkeypatch.chdir(vae.parent)                                 # any working folder
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "runs" / "flow", "--vae-steps", 4, *flags)
    assert rc == 0 and "finishing the unfinished automatic VAE" in out and "resumed" in out, err
    finished = torch.load(vae, weights_only=True)
    assert finished["finished"] and finished["step"] == 4 and finished["latents"].shape[0] == 64
    assert "encoded" not in out                                   # its latents are reused
    flow = torch.load(tmp_path / "runs" / "flow" / "ckpt.pt", weights_only=True)
    assert flow["vae"]["path"] == str(vae)
    # --overwrite into the automatic VAE's folder would delete the VAE it reads: refused
    rc, _, err = cli("train_flow.py", "--out", vae.parent, "--vae-steps", 4, "--overwrite", *flags)
    expect.one_line_error((rc, _, err), "would delete a file this command reads as --vae")
    assert torch.load(vae, weights_only=True)["finished"]


def test_an_automatic_vae_of_an_earlier_default_is_used_as_it_is_with_a_note(
        cli, runs, tmp_path, tiny, monkeypatch):
    flags = ["--steps", 1, "--n-builtin", 64, "--batch-size", 8, "--sample-steps", 1,
             "--grid-prompts", 1, "--grid-images", 1, "--preset", "micro", *tiny.cpu]
    vae = tmp_path / "vae-shapes-32px-seed0-n64" / "ckpt.pt"
    ckpt = torch.load(runs["vae"], weights_only=True)              # finished, tiny.vae_steps
    checkpoint.save_checkpoint(vae, ckpt)
    before = vae.read_bytes()
    monkeypatch.setitem(train_vae.DEFAULTS, "steps", ckpt["step"])   # the default it was made by
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "a", *flags)
    assert rc == 0 and "note: the automatic VAE" not in err, err
    monkeypatch.setitem(train_vae.DEFAULTS, "steps", ckpt["step"] + 2)   # the default grew
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "b", *flags)
    assert rc == 0 and f"--steps {ckpt['step']}, the default now {ckpt['step'] + 2}" in err, err
    assert f"delete {vae.parent}" in err and vae.read_bytes() == before   # used, not changed
    monkeypatch.setitem(train_vae.DEFAULTS, "steps", ckpt["step"])
    monkeypatch.setitem(train_vae.DEFAULTS, "decoder_noise", 0.3)       # a setting changed
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "c", *flags)
    assert rc == 0 and f"(--decoder-noise {ckpt['args']['decoder_noise']}, the default now 0.3)" \
        in err, err
    monkeypatch.setitem(train_vae.DEFAULTS, "decoder_noise", ckpt["args"]["decoder_noise"])
    vae_beta = train_vae.vae_beta
    monkeypatch.setattr(train_vae, "vae_beta", lambda args: 1.0)         # beta's default moved
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "e", *flags)
    assert rc == 0 and f"(--beta {ckpt['args']['beta']}, the default now 1.0)" in err, err
    monkeypatch.setattr(train_vae, "vae_beta", vae_beta)
    monkeypatch.setitem(train_vae.DEFAULTS, "latent_channels", 8)       # the channels changed
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "d", *flags)
    assert rc == 0 and "(latent_channels 4, 8 now)" in err, err
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["vae"]["sha1"] == \
        hashlib.sha1(before).hexdigest()


def test_a_damaged_automatic_vae_is_one_line_before_the_images_are_drawn(cli, tmp_path, expect,
                                                                       tiny, monkeypatch):
    vae = tmp_path / "vae-shapes-32px-seed0-n16" / "ckpt.pt"
    vae.parent.mkdir()
    vae.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(data_lib, "build_shapes", _no_images)
    expect.one_line_error(cli("train_flow.py", "--out", tmp_path / "flow", "--n-builtin", 16,
                              *tiny.cpu), f"--vae {vae}: not a checkpoint")
    assert vae.read_bytes() == b"not a checkpoint"


def test_the_lock_is_taken_before_the_automatic_vae_is_trained(cli, tmp_path, expect, tiny):
    out = tmp_path / "flow"
    out.mkdir()
    (out / ".lock").write_text(str(os.getppid()))                 # a live command holds it
    rc, stdout, err = cli("train_flow.py", "--out", out, "--n-builtin", 16, *tiny.cpu)
    expect.one_line_error((rc, stdout, err), "is in use by another command")
    assert "training the automatic VAE" not in stdout and not list(tmp_path.glob("vae-*"))


def test_ctrl_c_in_the_automatic_vae_names_the_train_flow_command(cli, tmp_path, monkeypatch, tiny):
    real_log = runs_lib.Run.log

    def log(self, step, *a, **k):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_log(self, step, *a, **k)
    monkeypatch.setattr(runs_lib.Run, "log", log)
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "flow", "--steps", 1, "--vae-steps",
                       5, "--n-builtin", 16, "--batch-size", 8, *tiny.cpu)
    assert rc == 130 and "resume with: the same python train_flow.py command" in err, err


def test_ctrl_c_as_the_automatic_vae_finishes_stops_before_the_dit(cli, tmp_path, monkeypatch,
                                                                   tiny):
    real_report = train_vae.report_heldout

    def report(*a, **k):                       # after the VAE's last step: its final phase
        os.kill(os.getpid(), signal.SIGINT)
        return real_report(*a, **k)
    monkeypatch.setattr(train_vae, "report_heldout", report)
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "flow", "--steps", 1, "--vae-steps",
                       2, "--n-builtin", 16, "--batch-size", 8, "--preset", "micro", *tiny.cpu)
    assert rc == 130 and "resume with: the same python train_flow.py command" in err, err
    vae = tmp_path / "vae-shapes-32px-seed0-n16-2steps" / "ckpt.pt"
    assert checkpoint.load_checkpoint(vae, "vae")["finished"]
    assert "DiT-micro" not in out and not (tmp_path / "flow").exists()


def test_an_automatic_vae_begun_by_another_seed_is_finished_or_if_unsaved_started_over(
        cli, tmp_path, monkeypatch, tiny):
    data = tmp_path / "imgs"                   # a folder's VAE: one per folder and size
    data.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 30, 30)).save(data / f"{i}.png")
    flags = ["--data", data, "--steps", 1, "--batch-size", 4, "--sample-steps", 1,
             "--grid-prompts", 1, "--grid-images", 1, "--preset", "micro", *tiny.cpu]
    real_log = runs_lib.Run.log

    def log(self, step, *a, **k):              # Ctrl-C at the VAE's step 2: saved there
        if self.kind == "vae" and step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_log(self, step, *a, **k)
    monkeypatch.setattr(runs_lib.Run, "log", log)
    assert cli("train_flow.py", "--out", tmp_path / "a", "--seed", 1, "--vae-steps", 4,
               *flags)[0] == 130
    monkeypatch.undo()
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "b", "--vae-steps", 4, *flags)
    assert rc == 0 and "finishing the unfinished automatic VAE" in out, err
    vae = next(tmp_path.glob("vae-imgs-*-4steps")) / "ckpt.pt"
    ckpt = checkpoint.load_checkpoint(vae, "vae")
    assert ckpt["finished"] and ckpt["step"] == 4 and ckpt["args"]["seed"] == 1

    def killed(*a, **k):                       # killed as it would write its first checkpoint
        raise KeyboardInterrupt
    monkeypatch.setattr("runs.save_checkpoint", killed)
    assert cli("train_flow.py", "--out", tmp_path / "c", "--seed", 1, "--vae-steps", 2,
               *flags)[0] == 130
    monkeypatch.undo()
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "d", "--vae-steps", 2, *flags)
    assert rc == 0 and "starting again a run stopped early" in err and "--seed 0 (was 1)" in err
    vae = next(tmp_path.glob("vae-imgs-*-2steps")) / "ckpt.pt"
    assert checkpoint.load_checkpoint(vae, "vae")["args"]["seed"] == 0


def test_a_short_run_says_it_never_leaves_the_warm_up(cli, tmp_path, runs, flow_args, expect):
    rc, out, err = cli(*flow_args(tmp_path / "f", "--warmup", 200, "--log-every", 50))
    assert rc == 0, err
    assert "--steps 1 is shorter than the learning-rate warm-up (--warmup 200)" in out
    assert out.count("step 1/1 loss") == 1 and (tmp_path / "f" / "loss.png").is_file()


def test_a_diverging_flow_run_stops_naming_the_step(cli, runs, tmp_path, flow_args):
    rc, _, err = cli(*flow_args(tmp_path / "f", "--lr", "1e5", "--steps", 30, "--warmup", 0,
                                "--log-every", 10))
    assert rc == 2 and "Traceback" not in err
    assert re.search(r"(diverging\)|loss became (nan|inf)|weights became inf/NaN) by step \d+", err), err


def test_hold_out_pairs_leaves_those_pairs_out_of_the_dit_only(cli, runs, tmp_path, expect,
                                                               flow_args):
    out = tmp_path / "pairs"
    rc, stdout, err = cli(*flow_args(out, "--hold-out-pairs", "--grid-prompts", 64,
                                     "--grid-images", 1))
    assert rc == 0, err
    _, captions, attrs = shapes.render_shapes(64, 0, 32)
    kept = [c for c, a in zip(captions, attrs) if not shapes.held_out_objects(a)]
    assert f"composition benchmark: {64 - len(kept)} of 64 training images" in stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["hold_out_pairs"] is True and 64 - len(kept) >= 8
    assert ckpt["sample_prompts"] == list(dict.fromkeys(kept))     # the DiT's captions: no pair
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "0.png")
    expect.one_line_error(cli(*flow_args(tmp_path / "f2", "--hold-out-pairs", "--data", folder)),
                          "--hold-out-pairs needs the built-in shapes")


def test_the_model_reads_its_longest_caption_and_keeps_the_words_as_written(runs):
    _, captions, _ = shapes.render_shapes(64, 0, 32)
    ckpt = torch.load(runs["flow"], weights_only=True)
    longest = 1 + max(len(prompt_pieces(c)) for c in captions)           # BOS + its words
    assert ckpt["config"]["max_prompt_len"] == -(-longest // 8) * 8 == 16
    counts = {}
    for caption in captions:
        for word in caption.split():
            counts[word] = counts.get(word, 0) + 1
    assert ckpt["caption_words"] == counts


def test_the_training_steps_and_the_sampler_never_read_a_value_back_from_the_device(monkeypatch):
    """On a GPU a value read back (`.item()`, `bool(t)`, `.tolist()`, ...) waits for the queue to
    drain; the steps of both trainers and the guided Euler loop make none, so a GPU runs them
    back to back (issue 32, item 1). Every such read is made to fail while they run."""
    cpu = torch.device("cpu")
    args = argparse.Namespace(**train_flow.DEFAULTS, seed=0)
    model, ema, opt, scaler = train_flow.build(dit_preset("tiny", max_prompt_len=16, depth=1),
                                               args, cpu, None)
    z, tokens, null = torch.randn(4, 4, 8, 8), tokenize(["a red circle"] * 4, 16), null_prompt(16)
    vae_args = argparse.Namespace(**train_vae.DEFAULTS, seed=0, vae_preset=None)
    vae, vae_ema, vae_opt, vae_scaler = train_vae.build(train_vae.vae_config(vae_args), vae_args,
                                                        cpu, None)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)

    def read_back(*a, **k):
        raise AssertionError("a value was read back from the device")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_flow.train_step(model, model, ema, opt, scaler, z, tokens, null, 0, args, None)
    train_vae.train_step(vae, vae, vae_ema, vae_opt, vae_scaler, images, 0, vae_args, None)
    with torch.no_grad():
        x = sample.euler_sample(sample.guided_field(model, tokens, null, 4.0, (0.2, 1.0)), z, 3)
    monkeypatch.undo()
    assert loss.ndim == 0 and torch.isfinite(x).all() and x.shape == z.shape
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))   # it stepped


def test_the_learning_rate_warms_up_holds_and_cools_down_to_zero_as_written():
    cpu = torch.device("cpu")
    z, tokens, null = torch.randn(2, 4, 8, 8), tokenize(["a red circle"] * 2, 16), null_prompt(16)
    for cooldown, tail in [(0.4, [1, 0.75, 0.5, 0.25]), (0.0, [1, 1, 1, 1])]:
        args = argparse.Namespace(**{**train_flow.DEFAULTS, "steps": 10, "warmup": 3,
                                     "cooldown": cooldown}, seed=0)
        model, ema, opt, scaler = train_flow.build(dit_preset("tiny", max_prompt_len=16, depth=1),
                                                   args, cpu, None)
        rates = []
        for step in range(10):
            train_flow.train_step(model, model, ema, opt, scaler, z, tokens, null, step, args, None)
            rates.append(opt.param_groups[0]["lr"] / args.lr)
        assert rates == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1] + tail, abs=1e-12)


def test_a_folder_trains_its_own_default_steps_unless_given_or_resumed():
    """The DiT's default steps depend on the data (DEFAULTS' folder_steps on a --data folder,
    `steps` on the shapes); a given --steps, a resumed run's stored steps and --minutes win."""
    def settled(*argv, resume=None):
        args, given = train_flow.parser().parse([str(a) for a in argv])
        run = argparse.Namespace(args=args, flags_given=given, resume=resume)
        plan.settle_steps(run, train_flow.DEFAULTS["folder_steps"])
        return run.args.steps, run.derived
    folder, shapes_steps = train_flow.DEFAULTS["folder_steps"], train_flow.DEFAULTS["steps"]
    assert folder > shapes_steps
    assert settled("--data", "photos") == (folder, set())
    assert settled() == (shapes_steps, set())
    assert settled("--data", "photos", "--steps", 7) == (7, set())
    assert settled("--data", "photos", resume={"step": 3}) == (shapes_steps, set())  # Run restores
    assert settled("--data", "photos", "--minutes", 5) == (folder, {"steps", "vae_steps"})
    assert f"Default: {shapes_steps}, {folder} on a --data folder" in " ".join(
        train_flow.parser().format_help().split())


def test_minutes_sizes_both_trainings_to_the_budget_from_timed_steps(cli, tmp_path, tiny, expect,
                                                                    monkeypatch):
    timed = []

    def median_time(fn, repeats=3, **_):     # each phase's step "takes" 0.1 s (bench.py's recipe
        timed.append(repeats)                # test runs them for real)
        return 0.1
    monkeypatch.setattr(common, "median_time", median_time)
    monkeypatch.setattr(plan, "median_time", median_time)
    flags = ["--n-builtin", 64, "--batch-size", 8, "--sample-every", 4, "--sample-steps", 2,
             "--grid-prompts", 2, "--grid-images", 2, "--log-every", 100, "--preset", "micro",
             *tiny.cpu]
    expect.one_line_error(cli("train_flow.py", "--out", tmp_path / "f", "--minutes", 1,
                              "--steps", 5, *flags), "--minutes sizes --steps and --vae-steps")
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "f", "--minutes", 0.03, *flags)
    assert rc == 0 and timed == [3, 3, 3], err          # a VAE step, a DiT step, a grid step
    # 1.8 s = 4.51 steps x (0.1 + 0.1 x 2 / 4 grid steps + 0.1 x 6000 / 2930 VAE) + a grid
    steps = json.loads((tmp_path / "f" / "args.json").read_text())["steps"]
    assert steps == 4 and "--minutes 0.03: 4 DiT steps (0.100 s each) and 8 VAE steps" in out
    vae = torch.load(tmp_path / "vae-shapes-32px-seed0-n64-0.03min" / "ckpt.pt", weights_only=True)
    assert vae["step"] == 8 and vae["finished"]
    # a resumed run keeps its sized steps and finds its VAE; --minutes there is refused
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "f", "--resume", "--steps", 6, *flags)
    assert rc == 0 and torch.load(tmp_path / "f" / "ckpt.pt", weights_only=True)["step"] == 6, err
    expect.one_line_error(cli("train_flow.py", "--out", tmp_path / "f", "--resume", "--minutes",
                              1, *flags), "--minutes sizes a new run")
    # with the VAE there, the whole budget goes to the DiT; a budget below one step is refused
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "g", "--minutes", 0.03, *flags)
    assert rc == 0 and "--minutes 0.03: 10 DiT steps (0.100 s each), from" in out, err
    expect.one_line_error(cli("train_flow.py", "--out", tmp_path / "h", "--minutes", 0.001,
                              *flags), "--minutes 0.001 is too short here")
