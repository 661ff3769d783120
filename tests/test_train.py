"""End-to-end tests of the scripts on a CPU, with tiny settings: train_vae.py -> train_flow.py ->
sample.py produce their files with the right sizes, losses fall, a resumed run equals a straight
one (train_flow here; train_vae in tests/test_reliability.py's crash test), a 2-process gloo run
keeps identical weights, and the same seed gives the same picture.

Every command runs as a real subprocess (cwd = the repository, OMP_NUM_THREADS=1). One VAE and
one flow run are trained once per session (`shared_runs`) and reused, also by
tests/test_reliability.py, as the uninterrupted reference runs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402
import train_vae  # noqa: E402

CPU = ["--device", "cpu", "--amp", "off"]
VAE_STEPS = 16
VAE_FLAGS = ["--n-builtin", "64", "--batch-size", "8", "--log-every", "4", "--ckpt-every", "2",
             "--eval-images", "16", "--seed", "0"] + CPU
FLOW_STEPS = 6
FLOW_FLAGS = ["--n-builtin", "64", "--batch-size", "8", "--log-every", "3", "--ckpt-every", "2",
              "--sample-every", "4", "--sample-steps", "2", "--warmup", "1", "--lr", "1e-3"] + CPU
GRID_PAD = 2


def run(script, *args, timeout=240, check=True, module=False):
    """Run `python script args` in the repository; returns the CompletedProcess (text)."""
    cmd = [sys.executable] + (["-m"] if module else []) + [script] + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def child_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


_RUNS = {}


def shared_runs(tmp_path_factory):
    """The session's reference VAE (VAE_STEPS straight) and flow run (FLOW_STEPS straight)."""
    if not _RUNS:
        root = tmp_path_factory.mktemp("shared")
        run("train_vae.py", "--out", root / "vae", "--steps", VAE_STEPS, *VAE_FLAGS)
        vae = root / "vae" / "ckpt.pt"
        run("train_flow.py", "--vae", vae, "--out", root / "flow", "--steps", FLOW_STEPS,
            *FLOW_FLAGS)
        _RUNS.update(root=root, vae=vae, vae_dir=root / "vae", flow=root / "flow" / "ckpt.pt",
                     flow_dir=root / "flow")
    return _RUNS


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def log_lines(folder):
    return [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]


def grid_size(rows, cols, px=32, pad=GRID_PAD):
    """(width, height) of data.save_grid's picture of rows x cols images."""
    return cols * (px + pad) - pad, rows * (px + pad) - pad


def assert_same_weights(ckpt_a, ckpt_b, keys=("model", "ema")):
    a = torch.load(ckpt_a, weights_only=True)
    b = torch.load(ckpt_b, weights_only=True)
    assert a["step"] == b["step"]
    for key in keys:
        assert a[key].keys() == b[key].keys()
        for name, t in a[key].items():
            torch.testing.assert_close(t, b[key][name], rtol=0, atol=1e-6, msg=f"{key}.{name}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -----------------------------------------------------------------------------
# train_vae -> train_flow -> sample


def test_vae_run_writes_checkpoint_recon_grid_and_log_and_its_loss_falls(runs):
    d = runs["vae_dir"]
    assert sorted(p.name for p in d.iterdir()) == ["ckpt.pt", "log.jsonl", "recon.png"]
    ckpt = train_vae.load_checkpoint(runs["vae"], "vae")
    assert ckpt["step"] == VAE_STEPS and ckpt["version"] == train_vae.FORMAT_VERSION
    assert Image.open(d / "recon.png").size == grid_size(2, 8)     # originals over reconstructions
    lines = log_lines(d)
    progress = [line for line in lines if "loss" in line]
    assert [line["step"] for line in progress] == list(range(4, VAE_STEPS + 1, 4))
    assert progress[-1]["loss"] < progress[0]["loss"]
    assert "heldout_psnr" in lines[-1] and len(lines[-1]["latent_std"]) == 4


def test_flow_run_writes_checkpoint_sample_grids_and_log_and_its_loss_falls(runs):
    d = runs["flow_dir"]
    names = sorted(p.name for p in d.iterdir())
    assert names == ["ckpt.pt", "latents.pt", "log.jsonl", "samples_000004.png",
                     "samples_000006.png"]
    ckpt = torch.load(runs["flow"], weights_only=True)
    n_prompts = len(ckpt["sample_prompts"])
    assert Image.open(d / "samples_000006.png").size == grid_size(n_prompts, 8)
    assert [line["step"] for line in log_lines(d)] == [3, 6]
    # Six noisy steps are too few for the logged batch losses to fall reliably; on fixed noise
    # the trained weights must beat the initial ones.
    latents = d / "latents.pt"
    assert _fixed_noise_loss(ckpt, ckpt["model"], latents) < _fixed_noise_loss(ckpt, None, latents) - 0.01


def _fixed_noise_loss(ckpt, state, latents_path):
    """The flow matching loss of `state` (None: the initial weights) on the run's latents, with
    fixed t, noise and no prompt dropout."""
    import data as data_lib
    from dit import DiT, DiTConfig
    from embeddings import tokenize
    from flow import flow_matching_loss
    mu = torch.load(latents_path, weights_only=True)["mu"]
    info = ckpt["vae"]
    z = (mu - info["latent_mean"].view(1, -1, 1, 1)) / info["latent_std"].view(1, -1, 1, 1)
    captions = data_lib.load_dataset(None, 32, "train", n_builtin=64).captions
    tokens = tokenize(captions, ckpt["config"]["max_prompt_len"])
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_dict(ckpt["config"]))
    if state is not None:
        model.load_state_dict(state)
    torch.manual_seed(1)
    with torch.no_grad():
        return sum(flow_matching_loss(model, z, tokens, 0.0).item() for _ in range(3)) / 3


def test_sample_grid_has_a_row_per_prompt_and_same_seed_gives_same_png(runs, tmp_path):
    args = ["--ckpt", runs["flow"], "--n", 3, "--steps", 2, "--seed", 7, "--prompt", "a red circle",
            "--prompt", "", "--device", "cpu"]
    run("sample.py", *args, "--out", tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").size == grid_size(2, 3)
    assert sample.main([str(a) for a in args] + ["--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert sample.main([str(a) for a in args] + ["--cfg", "1", "--out", str(tmp_path / "c.png")]) == 0
    assert Image.open(tmp_path / "c.png").size == grid_size(2, 3)
    assert (tmp_path / "c.png").read_bytes() != (tmp_path / "a.png").read_bytes()


# -----------------------------------------------------------------------------
# user folders, resume, several processes


def test_flow_on_a_folder_of_mixed_modes_skips_the_corrupt_file_with_one_warning(runs, tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    base = Image.new("RGB", (40, 36), (200, 30, 30))
    base.save(data / "rgb.png")
    base.convert("RGBA").save(data / "rgba.png")
    base.convert("L").save(data / "grey.png")
    base.convert("P").save(data / "palette.png")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = run("train_flow.py", "--vae", runs["vae"], "--data", data, "--out", tmp_path / "flow",
               "--steps", 1, "--batch-size", 4, "--sample-every", 100, "--sample-steps", 1, *CPU)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning")]
    skipped = [line for line in warnings if "unreadable" in line]
    assert len(skipped) == 1 and "skipped 1 unreadable" in skipped[0], proc.stderr
    # The shared VAE was trained on the built-in shapes, not on this folder: the run says so.
    assert any("was trained on shapes-32-seed0" in line for line in warnings), proc.stderr
    assert "broken.png" in warnings[0] and "Traceback" not in proc.stderr
    assert "4 images" in proc.stdout
    assert (tmp_path / "flow" / "samples_000001.png").is_file()


def test_flow_resumed_after_half_the_steps_equals_the_straight_run(runs, tmp_path):
    out = tmp_path / "flow"
    args = ["--vae", runs["vae"], "--out", out, *FLOW_FLAGS]
    run("train_flow.py", *args, "--steps", FLOW_STEPS // 2)
    proc = run("train_flow.py", *args, "--steps", FLOW_STEPS, "--resume")
    assert f"resumed {out / 'ckpt.pt'} at step {FLOW_STEPS // 2}" in proc.stdout
    assert_same_weights(out / "ckpt.pt", runs["flow"])


def test_two_process_gloo_run_and_its_resume_keep_ranks_identical_and_rank0_writes(runs, tmp_path):
    out = tmp_path / "ddp"
    flags = ["--vae", runs["vae"], "--out", out, "--n-builtin", 64, "--batch-size", 8, "--log-every", 1,
             "--sample-every", 100, "--sample-steps", 1, "--warmup", 1, *CPU]
    for steps, resume in ((2, []), (3, ["--resume"])):
        proc = run("torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   "train_flow.py", *flags, "--steps", steps, *resume, module=True, timeout=300)
        assert "weights identical on all 2 ranks: yes" in proc.stdout, proc.stdout + proc.stderr
    assert "resumed" in proc.stdout and proc.stdout.count("done: 3 steps") == 1
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "latents.pt", "log.jsonl",
                                                     "samples_000002.png", "samples_000003.png"]
    assert [line["step"] for line in log_lines(out)] == [1, 2, 3]    # one writer, no duplicates
    assert len(torch.load(out / "ckpt.pt", weights_only=True)["rng"]) == 2
