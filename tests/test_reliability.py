"""Bad input, crashes and hostile files: one clear line, a non-zero exit code, no traceback,
nothing lost (issue 7).

Most error cases run the real script file as __main__ inside this process (runpy: the same
`sys.exit(run_main(main))` path as `python script.py`, without paying a torch import per case);
a few run as true subprocesses to check the exit code and stderr end to end. Crash tests (SIGKILL,
SIGINT) and the memory test need a real child process."""

import errno
import os
import pickle
import random
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_flow  # noqa: E402
import train_vae  # noqa: E402
from test_train import (CPU, FLOW_FLAGS, VAE_FLAGS, VAE_STEPS, assert_same_weights,  # noqa: E402
                        child_env, run, shared_runs)
from vae import VAE, VAEConfig  # noqa: E402


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """cli(script, *args) -> (exit code, stdout, stderr) of `python script args`, in-process."""
    monkeypatch.chdir(tmp_path)

    def call(script, *args):
        with mock.patch.object(sys, "argv", [script] + [str(a) for a in args]):
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
        out, err = capsys.readouterr()
        return code, out, err
    return call


def assert_one_line_error(result, fragment, code=2):
    rc, out, err = result
    assert rc == code, (rc, out, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], err


def flow_args(runs, out, *extra):
    return ["train_flow.py", "--vae", runs["vae"], "--out", out, "--steps", 1,
            "--sample-steps", 1, "--n-builtin", 64, "--batch-size", 8, *CPU, *extra]


# -----------------------------------------------------------------------------
# --data and flags


def test_bad_data_folders_are_one_line_errors(cli, tmp_path):
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
        assert_one_line_error(cli("train_vae.py", "--data", data, "--out", tmp_path / "o", *CPU),
                              fragment)


def test_bad_data_as_a_real_subprocess_exits_2_with_one_line(tmp_path):
    proc = run("train_vae.py", "--data", tmp_path / "missing", "--out", tmp_path / "o", *CPU,
               check=False)
    assert_one_line_error((proc.returncode, proc.stdout, proc.stderr), "folder not found")


def test_image_size_not_divisible_by_vae_factor_times_patch(cli, runs, tmp_path):
    assert_one_line_error(cli(*flow_args(runs, tmp_path / "f", "--image-size", 36)),
                          "divisible by the VAE factor 4 x patch size 2 = 8")
    assert_one_line_error(cli("train_vae.py", "--image-size", 33, "--out", tmp_path / "v", *CPU),
                          "not divisible by the downsampling factor 4")


@pytest.mark.parametrize("flag,value", [("--steps", 0), ("--batch-size", -4), ("--lr", 0),
                                        ("--lr", "inf"), ("--lr", "nan"), ("--seed", -1)])
def test_non_positive_numbers_are_argparse_errors(cli, flag, value):
    rc, _, err = cli("train_flow.py", flag, value)
    assert rc == 2 and "usage:" in err and flag in err and "Traceback" not in err


def test_device_and_amp_mistakes(cli, tmp_path, runs):
    if not torch.cuda.is_available():
        assert_one_line_error(cli("train_vae.py", "--device", "cuda", "--out", tmp_path),
                              "CUDA is not available")
        assert_one_line_error(cli("sample.py", "--ckpt", runs["flow"], "--device", "cuda"),
                              "CUDA is not available")
    assert_one_line_error(cli("train_vae.py", "--device", "cpu", "--amp", "fp16", "--out", tmp_path),
                          "--amp fp16 needs CUDA")
    assert_one_line_error(cli("train_vae.py", "--device", "toaster", "--out", tmp_path),
                          "not a device")


def test_unwritable_out_is_one_line(cli, tmp_path, runs):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert_one_line_error(cli("train_vae.py", "--out", a_file / "sub", *CPU), "cannot write there")
    assert_one_line_error(cli("sample.py", "--ckpt", runs["flow"], "--out", a_file / "x.png"),
                          "cannot write there")
    assert_one_line_error(cli("sample.py", "--ckpt", runs["flow"], "--out", tmp_path / "x"),
                          "not an image file name")


# -----------------------------------------------------------------------------
# checkpoints: missing, damaged, hostile, of the wrong kind or version


def bad_files(tmp_path, runs):
    """name -> (path, expected message fragment) for every kind of bad checkpoint file."""
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(runs["vae"].read_bytes()[:100_000])
    rand = tmp_path / "random.pt"
    rand.write_bytes(random.Random(0).randbytes(4096))
    text = tmp_path / "text.pt"
    text.write_text("this is not a checkpoint\n")
    return {"missing": (tmp_path / "nope.pt", "file not found"),
            "folder": (tmp_path, "is a folder"),
            "truncated": (trunc, "truncated or corrupt"),
            "random": (rand, "not a checkpoint"),
            "text": (text, "truncated or corrupt")}


def test_bad_vae_files_for_train_flow(cli, runs, tmp_path):
    for name, (path, fragment) in bad_files(tmp_path, runs).items():
        args = flow_args(runs, tmp_path / "f")
        args[args.index("--vae") + 1] = path
        rc, out, err = cli(*args)
        assert rc == 2 and "Traceback" not in err, (name, err)
        assert err.count("error:") == 1 and ("file not found" in err or fragment in err), (name, err)
    assert_one_line_error(cli("train_flow.py", "--vae", runs["flow"], "--out", tmp_path / "f", *CPU),
                          "this is a flow checkpoint from train_flow.py (pass it as --ckpt)")


def test_bad_ckpt_files_for_sample(cli, runs, tmp_path):
    for name, (path, fragment) in bad_files(tmp_path, runs).items():
        assert_one_line_error(cli("sample.py", "--ckpt", path), fragment)
    assert_one_line_error(cli("sample.py", "--ckpt", runs["vae"]),
                          "this is a vae checkpoint from train_vae.py (pass it as --vae)")


def test_bad_ckpt_as_a_real_subprocess(runs, tmp_path):
    text = tmp_path / "text.pt"
    text.write_text("hello\n")
    proc = run("sample.py", "--ckpt", text, "--device", "cpu", check=False)
    assert_one_line_error((proc.returncode, proc.stdout, proc.stderr), "not a readable checkpoint")


def vae_checkpoint_like(runs, path, config=None, **changes):
    """A well-formed VAE checkpoint, optionally of another architecture or with other fields."""
    ckpt = torch.load(runs["vae"], weights_only=True)
    if config is not None:
        ckpt["config"] = config
        model = VAE(VAEConfig.from_dict(config))
        ckpt["ema"] = ckpt["model"] = model.state_dict()
    ckpt.update(changes)
    torch.save(ckpt, path)
    return path


def test_sample_refuses_a_vae_that_does_not_match_the_flow_model(cli, runs, tmp_path):
    small = dict(image_size=32, base_channels=8, channel_mults=(1, 2, 2), groups=4)
    cases = {"latent channels 3 vs 4": dict(small, latent_channels=3),
             "latent size 16x16 vs 8x8": dict(small, channel_mults=(1, 2))}
    for fragment, config in cases.items():
        path = vae_checkpoint_like(runs, tmp_path / "other.pt", config=config)
        assert_one_line_error(cli("sample.py", "--ckpt", runs["flow"], "--vae", path), fragment)
    ckpt = torch.load(runs["vae"], weights_only=True)
    ckpt["ema"]["latent_std"] = ckpt["ema"]["latent_std"] * 2
    torch.save(ckpt, tmp_path / "stats.pt")
    assert_one_line_error(cli("sample.py", "--ckpt", runs["flow"], "--vae", tmp_path / "stats.pt"),
                          "latent statistics differ")


def test_damaged_checkpoint_whose_weights_do_not_fit_its_config(cli, runs, tmp_path):
    path = vae_checkpoint_like(runs, tmp_path / "bad.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["base_channels"] = 16
    torch.save(ckpt, path)
    assert_one_line_error(cli("sample.py", "--ckpt", runs["flow"], "--vae", path),
                          "weights do not fit its configuration")


def test_unknown_format_version_is_a_clear_error(runs, tmp_path):
    path = vae_checkpoint_like(runs, tmp_path / "v99.pt", version=99)
    with pytest.raises(train_vae.UserError, match="format version 99 is not supported"):
        train_vae.load_vae(path, "cpu")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(cli, runs, tmp_path, how):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = {"format": train_vae.FORMAT, "version": 1, "kind": "flow", "x": _Evil(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    rc, out, err = cli("sample.py", "--ckpt", path)
    assert_one_line_error((rc, out, err), "--ckpt")
    assert "refused to load" in err or "not a checkpoint" in err
    assert not marker.exists()
    # the latent cache is loaded the same safe way: refused, rebuilt, nothing runs
    cache = tmp_path / "latents.pt"
    torch.save({"key": _Evil(marker)}, cache)
    vae, _ = train_vae.load_vae(runs["vae"], "cpu")
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    train_flow.cached_latents(cache, "k", vae, images, torch.device("cpu"), write=True)
    assert not marker.exists() and torch.load(cache, weights_only=True)["key"] == "k"


# -----------------------------------------------------------------------------
# --resume with other settings


def test_resume_with_another_model_configuration_names_the_field_and_flag(cli, runs, tmp_path):
    out = tmp_path / "flow"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(runs["flow"].read_bytes())
    rc, _, err = cli(*flow_args(runs, out, "--resume", "--patch-size", 1))
    assert_one_line_error((rc, _, err), "patch_size: checkpoint has 2, now 1; set by --patch-size")
    rc, _, err = cli(*flow_args(runs, out, "--resume", "--preset", "S"))
    assert_one_line_error((rc, _, err), "set by --preset")
    assert_one_line_error(cli(*flow_args(runs, tmp_path / "none", "--resume")), "file not found")
    vae_out = tmp_path / "vae"
    vae_out.mkdir()
    (vae_out / "ckpt.pt").write_bytes(runs["vae"].read_bytes())
    assert_one_line_error(cli("train_vae.py", "--out", vae_out, "--resume", "--image-size", 64, *CPU),
                          "set by --image-size")


# -----------------------------------------------------------------------------
# prompts


def test_unicode_empty_and_overlong_prompts(cli, runs, tmp_path):
    prompts = ["🙂 a red circle", "红色的圆", "دائرة حمراء", "", "x" * 500]
    args = ["sample.py", "--ckpt", runs["flow"], "--n", 1, "--steps", 1, "--out", tmp_path / "p.png"]
    for p in prompts:
        args += ["--prompt", p]
    rc, out, err = cli(*args)
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "truncated" in warnings[0] and "xxxx" in warnings[0]
    assert Image.open(tmp_path / "p.png").size == (32, 5 * 34 - 2)


def test_a_prompt_that_is_not_utf8_is_one_line(runs, tmp_path):
    cmd = [sys.executable, "sample.py", "--ckpt", str(runs["flow"]), "--prompt", b"caf\xe9"]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert_one_line_error((proc.returncode, proc.stdout, proc.stderr), "not valid UTF-8")


# -----------------------------------------------------------------------------
# compile, out of memory, full disk, NaN


def test_maybe_compile_falls_back_to_eager_with_a_warning(monkeypatch, capsys):
    model = torch.nn.Linear(2, 2)
    x = torch.randn(3, 2)

    def no_compiler(m):
        raise RuntimeError("no C++ compiler found")
    monkeypatch.setattr(torch, "compile", no_compiler)
    net, compiled = train_vae.maybe_compile(model, torch.device("cpu"), True)
    assert net is model and not compiled
    assert "warning: torch.compile failed" in capsys.readouterr().err

    def fails_on_first_call(m):                  # the real failure mode: compile is lazy
        def call(*a):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return call
    monkeypatch.setattr(torch, "compile", fails_on_first_call)
    net, _ = train_vae.maybe_compile(model, torch.device("cpu"), True)
    assert torch.equal(net(x), model(x)) and torch.equal(net(x), model(x))
    err = capsys.readouterr().err
    assert err.count("warning: torch.compile failed") == 1 and "running eagerly" in err
    assert train_vae.maybe_compile(model, torch.device("cpu"), None) == (model, False)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried ..."),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_names_the_batch_size_to_lower(monkeypatch, tmp_path, error):
    def oom(*a, **k):
        raise error
    monkeypatch.setattr(train_vae, "vae_loss", oom)
    with pytest.raises(train_vae.UserError, match=r"--batch-size 8; lower it, e\.g\. --batch-size 4"):
        train_vae.main(["--out", str(tmp_path), "--batch-size", "8", "--n-builtin", "16", *CPU])


@pytest.mark.parametrize("fail", ["torch.save", "os.replace"])
def test_full_disk_keeps_the_old_checkpoint_and_leaves_no_temp_file(monkeypatch, tmp_path, fail):
    path = tmp_path / "ckpt.pt"
    train_vae.save_checkpoint(path, {"step": 1})
    before = path.read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch if fail == "torch.save" else os, fail.split(".")[1], full)
    with pytest.raises(train_vae.UserError, match="No space left on device.*previous checkpoint"):
        train_vae.save_checkpoint(path, {"step": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(cli, runs, tmp_path):
    out = tmp_path / "vae"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(runs["vae"].read_bytes())
    before = (out / "ckpt.pt").read_bytes()
    rc, out_text, err = cli("train_vae.py", "--out", out, *VAE_FLAGS, "--resume", "--lr", "1e30",
                            "--steps", VAE_STEPS + 4, "--log-every", 1, "--ckpt-every", 100)
    assert_one_line_error((rc, out_text, err), "by step")
    assert re.search(r"(loss became (nan|inf)|weights became inf/NaN) by step 1[78]", err), err
    assert (out / "ckpt.pt").read_bytes() == before
    assert not list(out.glob("*.tmp"))


# -----------------------------------------------------------------------------
# latent cache


def test_latent_cache_is_rebuilt_when_corrupt_or_stale(cli, runs, tmp_path, capsys):
    out = tmp_path / "flow"
    out.mkdir()
    (out / "latents.pt").write_bytes(b"garbage")
    rc, stdout, err = cli(*flow_args(runs, out, "--sample-every", 100))
    assert rc == 0 and "latent cache" in stdout and "unreadable" in stdout, err
    # then the cache is valid: reused; another key (data, VAE, size) or count: rebuilt
    vae, _ = train_vae.load_vae(runs["vae"], "cpu")
    cache, cpu = tmp_path / "latents.pt", torch.device("cpu")
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    mu = train_flow.cached_latents(cache, "key-a", vae, images, cpu, write=True)
    capsys.readouterr()
    assert torch.equal(train_flow.cached_latents(cache, "key-a", vae, images, cpu, write=True), mu)
    assert capsys.readouterr().out == ""
    train_flow.cached_latents(cache, "key-b", vae, images, cpu, write=True)
    assert "stale" in capsys.readouterr().out
    mu3 = train_flow.cached_latents(cache, "key-b", vae, images[:3], cpu, write=True)
    assert "stale" in capsys.readouterr().out and mu3.shape[0] == 3
    assert torch.load(cache, weights_only=True)["count"] == 3


# -----------------------------------------------------------------------------
# crashes: SIGKILL at random moments, Ctrl-C


def start(script, *args):
    return subprocess.Popen([sys.executable, script] + [str(a) for a in args], cwd=ROOT,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_step(proc, step, timeout=120):
    """Read the child's progress lines until it reports `step` (or more)."""
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        m = re.match(r"step (\d+)/", line)
        if m and int(m.group(1)) >= step:
            return int(m.group(1))
        assert time.monotonic() < deadline, "no progress"
    raise AssertionError(f"exited before step {step}: {proc.wait()} {proc.stderr.read()}")


def test_sigkill_at_random_moments_then_resume_equals_the_straight_run(runs, tmp_path):
    out = tmp_path / "vae"
    args = ["--out", out, *VAE_FLAGS, "--steps", VAE_STEPS]
    rng = random.Random(1234)
    for kill in range(3):
        resume = ["--resume"] if (out / "ckpt.pt").exists() else []
        proc = start("train_vae.py", *args, *resume)
        wait_for_step(proc, 4 * (kill + 1))               # training, checkpoints being written
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.wait()
        ckpt = train_vae.load_checkpoint(out / "ckpt.pt", "vae", flag="--resume")   # always loads
        assert ckpt["step"] % 2 == 0 and ckpt["step"] >= 2
    run("train_vae.py", *args, "--resume")
    assert_same_weights(out / "ckpt.pt", runs["vae"])
    assert not list(out.glob("*.tmp"))                     # leftovers of the kills are cleaned


def test_ctrl_c_saves_exits_130_and_resume_continues(tmp_path):
    out = tmp_path / "vae"
    args = ["--out", out, *VAE_FLAGS]
    proc = start("train_vae.py", *args, "--steps", 1000, "--log-every", 1)
    wait_for_step(proc, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "resume with: python train_vae.py --resume" in err
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step >= 2
    done = run("train_vae.py", *args, "--steps", step + 2, "--resume")
    assert f"at step {step}" in done.stdout and f"step {step + 2}/{step + 2}" in done.stdout


def test_ctrl_c_before_the_training_loop_exits_130_without_traceback(cli, monkeypatch, tmp_path):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("data.load_dataset", interrupted)
    rc, _, err = cli("train_vae.py", "--out", tmp_path, *CPU)
    assert rc == 130 and "interrupted" in err and "Traceback" not in err


# -----------------------------------------------------------------------------
# load


@pytest.mark.slow
def test_long_tiny_run_does_not_grow_in_memory(tmp_path):
    steps = 1500
    proc = start("train_vae.py", "--out", tmp_path, "--image-size", 16, "--batch-size", 2,
                 "--n-builtin", 64, "--steps", steps, "--log-every", 50, "--ckpt-every", 500,
                 "--eval-images", 8, *CPU)
    wait_for_step(proc, steps // 3)
    early = vm_rss_mb(proc.pid)
    wait_for_step(proc, steps)
    late = vm_rss_mb(proc.pid)
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert late - early < 30, (early, late)


def vm_rss_mb(pid):
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024
