"""End-to-end tests of train_flow.py on a CPU with tiny settings (the latent-diffusion recipe):
the files of a run and its falling loss, a folder of the user's images, a resumed run equal to a
straight one, two processes (gloo) with identical weights, mistakes as one line, and the latent
cache rebuilt when it is stale or damaged."""

import json
import re

import torch
from PIL import Image

import checkpoint
import common
import data as data_lib
import shapes
import train_flow
import train_vae
from dit import DiT, DiTConfig
from embeddings import null_prompt, prompt_ids, tokenize
from flow import flow_matching_loss


def test_flow_run_writes_checkpoint_sample_grids_and_log_and_its_loss_falls(runs, expect):
    d = runs["flow_dir"]
    names = sorted(p.name for p in d.iterdir())
    assert names == ["args.json", "ckpt.pt", "latents.pt", "log.jsonl", "loss.png", "prompts.txt",
                     "samples_000004.png", "samples_000006.png"]
    ckpt = torch.load(runs["flow"], weights_only=True)
    prompts = ckpt["sample_prompts"]
    grid = Image.open(d / "samples_000006.png")
    assert grid.width == expect.grid_size(len(prompts), 8, px=64)[0]   # 32 px drawn 2x
    assert grid.height > expect.grid_size(len(prompts), 8, px=64)[1]   # + a label per row
    assert json.loads(grid.text["prompts"]) == prompts and grid.text["steps"] == "2"
    assert (d / "prompts.txt").read_text().splitlines() == prompts
    assert json.loads((d / "args.json").read_text()) == ckpt["args"]
    lines = expect.log_lines(d)
    assert [line["step"] for line in lines if "loss" in line] == [1, 3, 6]
    assert {"VAE (train_vae.py)", "encoding the latent cache", "DiT training",
            "sample grids"} <= set(lines[-1]["seconds"])            # where the time went
    # Six noisy steps are too few for the logged batch losses to fall reliably; on fixed noise
    # the trained weights must beat the initial ones.
    latents = d / "latents.pt"
    assert _fixed_noise_loss(ckpt, ckpt["model"], latents) < _fixed_noise_loss(ckpt, None, latents) - 0.01


def _fixed_noise_loss(ckpt, state, latents_path):
    """The flow matching loss of `state` (None: the initial weights) on the run's latents, with
    fixed t, noise and no prompt dropout."""
    mu = torch.load(latents_path, weights_only=True)["mu"]
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


def test_flow_on_a_folder_of_mixed_modes_skips_the_corrupt_file_with_one_warning(runs, tmp_path, tiny, run):
    data = tmp_path / "imgs"
    data.mkdir()
    base = Image.new("RGB", (40, 36), (200, 30, 30))
    base.save(data / "rgb.png")
    base.convert("RGBA").save(data / "rgba.png")
    base.convert("L").save(data / "grey.png")
    base.convert("P").save(data / "palette.png")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = run("train_flow.py", "--vae", runs["vae"], "--data", data, "--out", tmp_path / "flow",
               "--steps", 1, "--batch-size", 4, "--sample-every", 100, "--sample-steps", 1, *tiny.cpu)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning")]
    skipped = [line for line in warnings if "unreadable" in line]
    assert len(skipped) == 1 and "skipped 1 unreadable" in skipped[0], proc.stderr
    # The shared VAE was trained on the built-in shapes, not on this folder: the run says so.
    assert any("was trained on shapes-32-seed0" in line for line in warnings), proc.stderr
    assert "broken.png" in warnings[0] and "Traceback" not in proc.stderr
    assert "4 images" in proc.stdout
    assert (tmp_path / "flow" / "samples_000001.png").is_file()


def test_flow_resumed_after_half_the_steps_equals_the_straight_run(runs, tmp_path, expect, tiny, run):
    out = tmp_path / "flow"
    args = ["--vae", runs["vae"], "--out", out, *tiny.flow_flags]
    run("train_flow.py", *args, "--steps", tiny.flow_steps // 2)
    # The bare resume command the run prints: every other setting comes from the checkpoint.
    proc = run("train_flow.py", "--resume", "--out", out, "--steps", tiny.flow_steps)
    assert f"resumed {out / 'ckpt.pt'} at step {tiny.flow_steps // 2}" in proc.stdout
    assert f"resuming with changed settings: --steps {tiny.flow_steps} (was 3)" in proc.stdout
    expect.same_weights(out / "ckpt.pt", runs["flow"])
    steps = [line["step"] for line in expect.log_lines(out) if "loss" in line]
    assert steps == sorted(set(steps))                          # no step logged twice


def test_two_process_gloo_run_and_its_resume_keep_ranks_identical_and_rank0_writes(
        runs, tmp_path, expect, tiny, run, free_port):
    out = tmp_path / "ddp"
    flags = ["--vae", runs["vae"], "--out", out, "--n-builtin", 64, "--batch-size", 8, "--log-every", 1,
             "--sample-every", 100, "--sample-steps", 1, "--warmup", 1, *tiny.cpu]
    for steps, resume in ((2, []), (3, ["--resume"])):
        proc = run("torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   "train_flow.py", *flags, "--steps", steps, *resume, module=True, timeout=300)
        assert "weights identical on all 2 ranks: yes" in proc.stdout, proc.stdout + proc.stderr
    assert "resumed" in proc.stdout and proc.stdout.count("done: 3 steps") == 1
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "ckpt.pt", "latents.pt",
                                                     "log.jsonl", "loss.png", "prompts.txt",
                                                     "samples_000002.png", "samples_000003.png"]
    assert [line["step"] for line in expect.log_lines(out) if "loss" in line] == [1, 2, 3]
    assert len(torch.load(out / "ckpt.pt", weights_only=True)["rng"]) == 2


# ---------------------------------------------------------------------------------------------
# mistakes and the latent cache


def test_image_size_not_divisible_by_vae_factor_times_patch(cli, runs, tmp_path, expect, tiny, flow_args):
    rc, out, err = cli(*flow_args(tmp_path / "f", "--image-size", 40, "--patch-size", 4))
    expect.one_line_error((rc, out, err), "divisible by the VAE factor 4 x patch size 4 = 16")
    assert "estimate" not in out and not (tmp_path / "f").exists()     # before any slow work
    expect.one_line_error(cli("train_vae.py", "--image-size", 33, "--out", tmp_path / "v", *tiny.cpu),
                          "not divisible by the downsampling factor 4")


def test_resume_with_another_model_configuration_names_the_field_and_flag(
        cli, runs, tmp_path, expect, tiny, flow_args):
    out = tmp_path / "flow"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(runs["flow"].read_bytes())
    rc, _, err = cli(*flow_args(out, "--resume", "--patch-size", 1))
    expect.one_line_error((rc, _, err), "--patch-size 1 (was 2)")
    assert "--patch-size would make another experiment" in err and "--allow-changes" in err
    rc, _, err = cli(*flow_args(out, "--resume", "--patch-size", 1, "--allow-changes", "--steps", 10))
    expect.one_line_error((rc, _, err), "patch_size: checkpoint has 2, now 1; set by --patch-size")
    rc, _, err = cli(*flow_args(out, "--resume", "--preset", "S", "--allow-changes", "--steps", 10))
    expect.one_line_error((rc, _, err), "set by --preset")
    expect.one_line_error(cli(*flow_args(tmp_path / "none", "--resume")), "file not found")
    vae_out = tmp_path / "vae"
    vae_out.mkdir()
    (vae_out / "ckpt.pt").write_bytes(runs["vae"].read_bytes())
    expect.one_line_error(cli("train_vae.py", "--out", vae_out, "--resume", "--image-size", 64,
                              *tiny.cpu), "--image-size 64 (was 32)")
    expect.one_line_error(cli("train_vae.py", "--out", vae_out, "--resume", "--image-size", 64,
                              "--allow-changes", "--steps", 20, *tiny.cpu), "set by --image-size")


def test_latent_cache_is_rebuilt_when_corrupt_or_stale(cli, runs, tmp_path, capsys, flow_args):
    out = tmp_path / "flow"
    out.mkdir()
    (out / "latents.pt").write_bytes(b"garbage")
    rc, stdout, err = cli(*flow_args(out, "--sample-every", 100))
    assert rc == 0 and "latent cache" in stdout and "unreadable" in stdout, err
    # then the cache is valid: reused; another key (data, VAE, size) or count: rebuilt
    vae, _ = checkpoint.load_vae(runs["vae"], "cpu")
    cache, cpu = tmp_path / "latents.pt", torch.device("cpu")
    no_vae_cache = tmp_path / "elsewhere" / "ckpt.pt"
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)

    def latents(key, images):
        return train_flow.cached_latents(tmp_path, no_vae_cache, key, vae, images, cpu, write=True)
    mu = latents("key-a", images)
    capsys.readouterr()
    assert torch.equal(latents("key-a", images), mu)
    assert capsys.readouterr().out == ""
    latents("key-b", images)
    assert "stale" in capsys.readouterr().out
    mu3 = latents("key-b", images[:3])
    assert "stale" in capsys.readouterr().out and mu3.shape[0] == 3
    assert torch.load(cache, weights_only=True)["count"] == 3


# ---------------------------------------------------------------------------------------------
# a run folder belongs to one run; an unfinished VAE is finished, never used


def _unfinished_copy(runs, path):
    """The session's VAE checkpoint as a periodic save at half its steps would look."""
    ckpt = torch.load(runs["vae"], weights_only=True)
    ckpt.update(step=8, finished=False, latent_mean=torch.zeros(4), latent_std=torch.ones(4))
    for key in ("model", "ema"):
        ckpt[key]["latent_mean"], ckpt[key]["latent_std"] = torch.zeros(4), torch.ones(4)
    checkpoint.save_checkpoint(path, ckpt)
    return path


def test_an_interrupted_automatic_vae_is_resumed_to_completion_not_used(cli, runs, tmp_path, tiny):
    vae = _unfinished_copy(runs, tmp_path / "runs" / "vae-shapes-32px-seed0-n64" / "ckpt.pt")
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "flow", "--steps", 1, "--n-builtin", 64,
                       "--batch-size", 8, "--sample-every", 100, "--sample-steps", 1, *tiny.cpu)
    assert rc == 0, err
    assert "runs/vae-shapes-32px-seed0-n64/ckpt.pt is unfinished" in out and "resumed" in out
    finished = torch.load(vae, weights_only=True)
    assert finished["finished"] and finished["step"] == tiny.vae_steps
    assert not bool((finished["latent_std"] == 1).all())
    flow = torch.load(tmp_path / "flow" / "ckpt.pt", weights_only=True)
    assert torch.equal(flow["vae"]["latent_std"], finished["latent_std"])


def test_an_older_finished_automatic_vae_is_used_as_is_with_a_note(cli, runs, tmp_path, tiny):
    vae = tmp_path / "runs" / "vae-shapes-32px-seed0-n64" / "ckpt.pt"   # finished, 16 steps
    vae.parent.mkdir(parents=True)
    vae.write_bytes(runs["vae"].read_bytes())
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "flow", "--steps", 1, "--n-builtin", 64,
                       "--batch-size", 8, "--sample-every", 100, "--sample-steps", 1, *tiny.cpu)
    assert rc == 0, err
    assert (f"note: runs/vae-shapes-32px-seed0-n64/ckpt.pt was trained for {tiny.vae_steps} "
            f"steps, fewer than train_vae.py's default of {train_vae.DEFAULTS['steps']} "
            f"now; using it as is") in out
    assert vae.read_bytes() == runs["vae"].read_bytes()               # not retrained or resumed
    flow = torch.load(tmp_path / "flow" / "ckpt.pt", weights_only=True)
    assert flow["vae"]["path"] == str(vae.resolve())


def test_an_unfinished_or_folder_vae_is_refused_in_one_line(cli, runs, tmp_path, expect, flow_args):
    args = flow_args(tmp_path / "f")
    args[args.index("--vae") + 1] = _unfinished_copy(runs, tmp_path / "v" / "ckpt.pt")
    expect.one_line_error(cli(*args), "this VAE is unfinished (step 8 of 16")
    args[args.index("--vae") + 1] = tmp_path / "v"
    expect.one_line_error(cli(*args), "is a folder; pass its ckpt.pt")
    assert not (tmp_path / "f").exists()                      # a failed command makes no folder


def test_a_finished_flow_run_is_not_overwritten_and_its_resume_draws_nothing(
        cli, runs, tmp_path, expect, flow_args):
    out = tmp_path / "flow"
    assert cli(*flow_args(out, "--sample-every", 100))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".pt", ".png")}
    expect.one_line_error(cli(*flow_args(out)), f"--out {out} already holds a run")
    rc, stdout, err = cli("train_flow.py", "--out", out, "--resume")
    assert rc == 0 and "is already at step 1 of 1; nothing to do" in stdout, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".pt", ".png")} == before


def test_resume_refuses_another_experiment_and_lists_other_changes(cli, runs, tmp_path, expect,
                                                                   flow_args):
    out = tmp_path / "flow"
    assert cli(*flow_args(out, "--sample-every", 100))[0] == 0
    expect.one_line_error(cli("train_flow.py", "--out", out, "--resume", "--steps", 2, "--seed", 1),
                          "--seed 1 (was 0); --seed would make another experiment")
    expect.one_line_error(cli("train_flow.py", "--out", out, "--resume", "--steps", 2,
                              "--n-builtin", 32), "--n-builtin would make another experiment")
    rc, stdout, err = cli("train_flow.py", "--out", out, "--resume", "--steps", 2, "--lr", "1e-4")
    assert rc == 0, err
    assert "resuming with changed settings: --steps 2 (was 1), --lr 0.0001 (was 0.001)" in stdout
    assert "64 images" in stdout and "batch 8" in stdout       # the stored data and batch size


def test_a_damaged_checkpoint_is_refused_naming_the_file(cli, runs, tmp_path, expect):
    data = bytearray(runs["flow"].read_bytes())
    for k in range(32):                                        # 32 flipped bits inside the weights
        data[len(data) // 2 + 997 * k] ^= 1 << (k % 8)
    (tmp_path / "flow").mkdir()
    bad = tmp_path / "flow" / "ckpt.pt"
    bad.write_bytes(bytes(data))
    expect.one_line_error(cli("sample.py", "--ckpt", bad), f"--ckpt {bad}: damaged file (checksum")
    expect.one_line_error(cli("train_flow.py", "--out", tmp_path / "flow", "--resume"),
                          "damaged file (checksum mismatch")


def test_the_images_are_encoded_once_by_the_vae_run_and_its_latents_reused(runs, tmp_path, cli,
                                                                           flow_args):
    vae_cache = runs["vae_dir"] / "latents.pt"
    rc, stdout, err = cli(*flow_args(tmp_path / "flow", "--sample-every", 100))
    assert rc == 0 and "encoded 64 images" not in stdout, stdout + err   # no second encoding
    train = data_lib.load_dataset(None, 32, "train", n_builtin=64, seed=0)
    vae, _ = checkpoint.load_vae(runs["vae"], "cpu")
    mu = train_vae.encode_means(vae, train.images, torch.device("cpu"))
    for cache in (vae_cache, tmp_path / "flow" / "latents.pt"):       # the flow run keeps a copy
        assert torch.equal(torch.load(cache, weights_only=True)["mu"], mu)


def test_a_latent_cache_holding_nan_is_rebuilt(cli, runs, tmp_path, flow_args):
    out = tmp_path / "flow"
    assert cli(*flow_args(out, "--sample-every", 100))[0] == 0
    cache = torch.load(out / "latents.pt", weights_only=True)
    cache["mu"][0, 0, 0, 0] = float("nan")
    checkpoint.save_checkpoint(out / "latents.pt", cache)
    rc, stdout, err = cli(*flow_args(out, "--sample-every", 100, "--overwrite"))
    assert rc == 0 and "is damaged (it holds inf/NaN); rebuilding it" in stdout, err
    assert torch.isfinite(torch.load(out / "latents.pt", weights_only=True)["mu"]).all()


def test_a_diverging_flow_run_stops_naming_the_step(cli, runs, tmp_path, flow_args):
    rc, _, err = cli(*flow_args(tmp_path / "f", "--lr", "1e9", "--steps", 30, "--warmup", 0,
                                "--log-every", 10, "--sample-every", 100))
    assert rc == 2 and "Traceback" not in err
    assert re.search(r"(diverging\)|loss became (nan|inf)|weights became inf/NaN) by step \d+", err), err


def test_the_automatic_vae_is_one_per_dataset_and_vae_steps_makes_a_smoke_test_fast(
        cli, tmp_path, tiny):
    flags = ["--steps", 1, "--n-builtin", 32, "--batch-size", 8, "--sample-every", 100,
             "--sample-steps", 1, "--vae-steps", 2, *tiny.cpu]
    data = tmp_path / "my photos"
    data.mkdir()
    for i in range(24):
        Image.new("RGB", (32, 32), (10 * i, 90, 200)).save(data / f"{i}.png")
    assert cli("train_flow.py", "--out", tmp_path / "a", *flags)[0] == 0
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "b", "--data", data, *flags)
    assert rc == 0, err
    builtin, folder = sorted(p.parent.name for p in (tmp_path / "runs").glob("*/ckpt.pt"))[::-1]
    assert builtin == "vae-shapes-32px-seed0-n32-2steps"
    assert folder.startswith("vae-my_photos-") and folder.endswith("-32px-2steps")
    folder_vae = torch.load(tmp_path / "runs" / folder / "ckpt.pt", weights_only=True)
    assert folder_vae["step"] == 2 and folder_vae["data"] == str(data)
    assert "was trained on" not in err                           # its own VAE: no mismatch warning


def test_args_json_round_trips_into_a_resumed_run_and_loss_png_is_redrawn(cli, runs, tmp_path,
                                                                         flow_args):
    out = tmp_path / "flow"
    assert cli(*flow_args(out, "--steps", 4, "--log-every", 2, "--lr", "3e-4"))[0] == 0
    settings = json.loads((out / "args.json").read_text())
    first = (out / "loss.png").read_bytes()
    assert Image.open(out / "loss.png").size == (640, 400)
    rc, stdout, err = cli("train_flow.py", "--out", out, "--resume", "--steps", 6)
    assert rc == 0 and "resuming with changed settings: --steps 6 (was 4)" in stdout, err
    resumed = json.loads((out / "args.json").read_text())
    assert resumed == dict(settings, steps=6)                     # lr 3e-4 and the rest restored
    assert (out / "loss.png").read_bytes() != first               # two more points drawn


def test_the_estimate_scales_with_the_counts_and_never_moves_the_random_state(one_thread):
    args, _ = train_flow.parse_args(["--batch-size", "4", "--grid-prompts", "1", "--grid-images",
                                     "2", "--sample-steps", "3", "--device", "cpu", "--amp", "off"])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    one = train_flow.estimate_phases(args, torch.device("cpu"), 1, 1, 256, 1, 1, 16)
    assert torch.equal(torch.get_rng_state(), state)               # the run's numbers stay put
    assert list(one) == ["VAE", "encoding", "DiT", "sample grids"] and min(one.values()) > 0
    assert train_flow.estimate_phases(args, torch.device("cpu"), 1, 0, 0, 0, 0, 16) == {}
    many = train_flow.estimate_phases(args, torch.device("cpu"), 1, 1000, 0, 0, 0, 16)
    assert 100 * one["VAE"] < many["VAE"] < 10_000 * one["VAE"]   # ~1000x, timing noise aside


# ---------------------------------------------------------------------------------------------
# resume from anywhere (issue 22)


def test_resume_works_from_another_folder_and_names_the_flags_it_changes(
        cli, runs, tmp_path, monkeypatch, flow_args):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "ckpt.pt").write_bytes(runs["vae"].read_bytes())
    args = flow_args("f", "--sample-every", 100, "--grid-prompts", 1, "--grid-images", 1)
    args[args.index("--vae") + 1] = "v/ckpt.pt"                       # relative, as typed
    assert cli(*args)[0] == 0                                         # cli runs in tmp_path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc, stdout, err = cli("train_flow.py", "--resume", "--out", tmp_path / "f", "--steps", 2,
                          "--cfg", 2)
    assert rc == 0 and "resumed" in stdout, err                       # no --vae given
    assert "resuming with changed settings: --steps 2 (was 1), --cfg 2.0 (was 4.0)" in stdout
    assert torch.load(tmp_path / "f" / "ckpt.pt", weights_only=True)["args"]["vae"] == \
        str(tmp_path / "v" / "ckpt.pt")                               # stored absolute


# ---------------------------------------------------------------------------------------------
# a newcomer's first hour (issue 23)


def test_a_missing_data_folder_fails_before_anything_is_trained(cli, tmp_path, expect, tiny):
    rc, out, err = cli("train_flow.py", "--data", tmp_path / "nowhere", "--out", tmp_path / "f",
                       "--steps", 1, *tiny.cpu)
    expect.one_line_error((rc, out, err), "folder not found")
    assert "training the VAE first" not in out and not (tmp_path / "runs").exists()


def test_ctrl_c_in_the_automatic_vae_names_the_train_flow_command(cli, tmp_path, monkeypatch, tiny):
    stops = iter([False, False, True])                     # Ctrl-C during the VAE's second step

    class Stopped(train_vae.StopFlag):
        @property
        def stop(self):
            return next(stops, True)
    monkeypatch.setattr(train_vae, "StopFlag", Stopped)
    monkeypatch.setattr(Stopped, "exit_code", 130)
    rc, out, err = cli("train_flow.py", "--out", tmp_path / "flow", "--steps", 1, "--vae-steps",
                       5, "--n-builtin", 16, "--batch-size", 8, *tiny.cpu)
    assert rc == 130 and "resume with: the same python train_flow.py command" in err, err
    assert "python train_vae.py --resume" not in err


def test_a_one_step_run_reports_step_1_draws_loss_png_and_names_export(cli, runs, tmp_path,
                                                                       flow_args, expect):
    rc, out, err = cli(*flow_args(tmp_path / "f", "--log-every", 50, "--sample-every", 100))
    assert rc == 0, err
    assert out.count("step 1/1 loss") == 1 and (tmp_path / "f" / "loss.png").is_file()
    assert [line["step"] for line in expect.log_lines(tmp_path / "f") if "loss" in line] == [1]
    assert "--export model.pt --export-dtype bf16" in out


def test_the_defaults_are_one_recipe_on_every_device_and_auto_picks_apple_gpus(monkeypatch):
    assert "cuda" not in train_flow.DEFAULTS and "cpu" not in train_flow.DEFAULTS
    assert train_flow.parse_args([])[0].preset == "tiny" and train_vae.DEFAULTS["steps"] == 3000
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert common.pick_device("auto") == torch.device("mps")


def test_train_vae_preset_is_vae_preset_and_the_old_spelling_works_with_a_note(cli, tmp_path, tiny):
    assert train_vae.parse_args(["--preset", "64"])[0].vae_preset == "64"
    rc, _, err = cli("train_vae.py", "--preset", "nope", "--out", tmp_path / "v", *tiny.cpu)
    assert rc == 2 and "--preset is now --vae-preset" in err and "--vae-preset nope" in err


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
    assert torch.load(out / "latents.pt", weights_only=True)["mu"].shape[0] == 64   # VAE: all
    plain = tmp_path / "plain"
    assert cli(*flow_args(plain, "--sample-every", 100))[0] == 0
    expect.one_line_error(cli("train_flow.py", "--out", plain, "--resume", "--steps", 2,
                              "--hold-out-pairs"), "--hold-out-pairs would make another experiment")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(folder / f"{i}.png")
    expect.one_line_error(cli(*flow_args(tmp_path / "f2", "--hold-out-pairs", "--data", folder)),
                          "--hold-out-pairs needs the built-in shapes")


def test_prompt_words_trains_on_word_aligned_tokens_and_resume_keeps_them(cli, runs, tmp_path,
                                                                         expect, flow_args):
    out = tmp_path / "words"
    rc, stdout, err = cli(*flow_args(out, "--prompt-words", "--sample-every", 100))
    assert rc == 0, err
    assert "token positions (a word starts a new token)" in stdout
    _, captions, _ = shapes.render_shapes(64, 0, 32)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    longest = max(len(prompt_ids(c, 4)) for c in captions)
    assert ckpt["config"]["prompt_words"] is True and ckpt["args"]["prompt_words"] is True
    assert ckpt["config"]["max_prompt_len"] == -(-longest // 8) * 8
    counts = {}
    for caption in captions:
        for word in caption.split():
            counts[word] = counts.get(word, 0) + 1
    assert ckpt["caption_words"] == counts          # shapes captions: lower case, no punctuation
    rc, _, err = cli("train_flow.py", "--out", out, "--resume", "--steps", 2, "--sample-steps", 1)
    assert rc == 0, err                                               # --prompt-words restored
    assert torch.load(out / "ckpt.pt", weights_only=True)["config"]["prompt_words"] is True
    plain = tmp_path / "plain"
    assert cli(*flow_args(plain, "--sample-every", 100))[0] == 0
    expect.one_line_error(cli("train_flow.py", "--out", plain, "--resume", "--steps", 2,
                              "--prompt-words"), "--prompt-words would make another experiment")


def test_a_run_saved_before_prompt_words_existed_resumes(cli, runs, tmp_path, flow_args):
    out = tmp_path / "old"
    assert cli(*flow_args(out, "--sample-every", 100))[0] == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    del ckpt["config"]["prompt_words"]
    checkpoint.save_checkpoint(out / "ckpt.pt", ckpt)
    rc, _, err = cli("train_flow.py", "--out", out, "--resume", "--steps", 2, "--sample-steps", 1)
    assert rc == 0, err
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
