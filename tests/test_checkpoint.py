"""Tests for checkpoint.py: atomic writing, safe loading (bad, damaged, foreign and hostile
files give one clear line and never run code), the training state round trip, and the checks
load_flow makes on the VAE a flow model is sampled with."""

import errno
import io
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import checkpoint
import common
from vae import VAE, VAEConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fail", ["torch.save", "os.replace"])
def test_full_disk_keeps_the_old_checkpoint_and_leaves_no_temp_file(monkeypatch, tmp_path, fail):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, {"step": 1})
    before = path.read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch if fail == "torch.save" else os, fail.split(".")[1], full)
    with pytest.raises(common.UserError, match="(?i)no space left on device.*previous checkpoint"):
        checkpoint.save_checkpoint(path, {"step": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


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
            "text": (text, "not a checkpoint (not a PyTorch file)")}


def test_bad_vae_files_for_train_flow(cli, runs, tmp_path, expect, tiny, flow_args):
    for name, (path, fragment) in bad_files(tmp_path, runs).items():
        args = flow_args(tmp_path / "f")
        args[args.index("--vae") + 1] = path
        rc, out, err = cli(*args)
        assert rc == 2 and "Traceback" not in err, (name, err)
        assert err.count("error:") == 1 and ("file not found" in err or fragment in err), (name, err)
    expect.one_line_error(cli("train_flow.py", "--vae", runs["flow"], "--out", tmp_path / "f", *tiny.cpu),
                          "a checkpoint of kind 'flow', where one of kind 'vae' is needed")


def test_bad_ckpt_files_for_sample(cli, runs, tmp_path, expect):
    for name, (path, fragment) in bad_files(tmp_path, runs).items():
        expect.one_line_error(cli("sample.py", "--ckpt", path), fragment)
    expect.one_line_error(cli("sample.py", "--ckpt", runs["vae"]),
                          "a checkpoint of kind 'vae', where one of kind 'flow' is needed")


def test_bad_ckpt_as_a_real_subprocess(runs, tmp_path, expect, run):
    text = tmp_path / "text.pt"
    text.write_text("hello\n")
    proc = run("sample.py", "--ckpt", text, "--device", "cpu", check=False)
    expect.one_line_error((proc.returncode, proc.stdout, proc.stderr), "not a checkpoint")


def vae_checkpoint_like(runs, path, config=None, **changes):
    """A well-formed VAE checkpoint, optionally of another architecture or with other fields."""
    ckpt = torch.load(runs["vae"], weights_only=True)
    if config is not None:
        ckpt["config"] = config
        model = VAE(VAEConfig.from_dict(config))
        ckpt["ema"] = ckpt["model"] = model.state_dict()
    ckpt.update(changes)
    checkpoint.save_checkpoint(path, ckpt)              # a new digest: well-formed, not damaged
    return path


def test_sample_refuses_a_vae_that_does_not_match_the_flow_model(cli, runs, tmp_path, expect):
    small = dict(image_size=32, base_channels=8, channel_mults=(1, 2, 2), groups=4)
    for config in (dict(small, latent_channels=3), dict(small, channel_mults=(1, 2))):
        path = vae_checkpoint_like(runs, tmp_path / "other.pt", config=config)
        expect.one_line_error(cli("sample.py", "--ckpt", runs["flow"], "--vae", path),
                              "is not the VAE the flow model")
    ckpt = torch.load(runs["vae"], weights_only=True)
    ckpt["ema"]["latent_std"] = ckpt["ema"]["latent_std"] * 2
    checkpoint.save_checkpoint(tmp_path / "stats.pt", ckpt)
    expect.one_line_error(cli("sample.py", "--ckpt", runs["flow"], "--vae", tmp_path / "stats.pt"),
                          "(latent shape or statistics differ)")


def test_damaged_checkpoint_whose_weights_do_not_fit_its_config(cli, runs, tmp_path, expect):
    path = vae_checkpoint_like(runs, tmp_path / "bad.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["base_channels"] = 16
    checkpoint.save_checkpoint(path, ckpt)
    expect.one_line_error(cli("sample.py", "--ckpt", runs["flow"], "--vae", path),
                          "weights do not fit its configuration")


@pytest.mark.parametrize("version", [1, 99])
def test_another_format_version_is_refused_naming_the_fix(runs, tmp_path, version):
    path = vae_checkpoint_like(runs, tmp_path / "v.pt", version=version)
    with pytest.raises(common.UserError, match=f"checkpoint format {version}, this code reads 2; "
                                               f"retrain it"):
        checkpoint.load_vae(path, "cpu")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(cli, runs, tmp_path, how, expect):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = {"format": checkpoint.FORMAT, "version": 1, "kind": "flow", "x": _Evil(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    rc, out, err = cli("sample.py", "--ckpt", path)
    expect.one_line_error((rc, out, err), "--ckpt")
    assert "refused to load" in err or "not a checkpoint" in err
    assert not marker.exists()


def test_a_real_full_disk_is_one_line_and_keeps_the_previous_checkpoint(small_disk):
    path = small_disk / "ckpt.pt"
    checkpoint.save_checkpoint(path, {"step": 1, "w": torch.zeros(1000)})
    before = path.read_bytes()
    with pytest.raises(common.UserError, match="(?i)no space left on device.*previous checkpoint, if "
                                               "any, is intact"):
        checkpoint.save_checkpoint(path, {"step": 2, "w": torch.zeros(200_000)})   # 800 kB
    assert path.read_bytes() == before and sorted(os.listdir(small_disk)) == ["ckpt.pt"]


def test_torch_saves_own_full_disk_error_is_one_line_too(monkeypatch, tmp_path):
    """torch.save reports a full disk as a RuntimeError from its zip writer, not an OSError."""
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, {"step": 1})
    before = path.read_bytes()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))

    def full(obj, f):
        f.write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(common.UserError, match="(?i)could not write .*no space left on device"):
        checkpoint.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_an_unreadable_checkpoint_says_permission_denied_not_corrupt(monkeypatch, runs):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(runs["vae"]))
    monkeypatch.setattr(zipfile, "ZipFile", denied)
    with pytest.raises(common.UserError, match="cannot read it \\(permission denied\\)"):
        checkpoint.load_checkpoint(runs["vae"], "vae")


# ---------------------------------------------------------------------------------------------
# checkpoints that prove their bytes; configurations checked before anything is built


def _small_checkpoint(path):
    g = torch.Generator().manual_seed(0)
    obj = {"format": checkpoint.FORMAT, "version": checkpoint.FORMAT_VERSION, "kind": "vae",
           "step": 3, "config": {"base_channels": 8, "channel_mults": (1, 2)},
           "model": {"w": torch.randn(16, 8, generator=g), "b": torch.arange(6.0)},
           "ema": {"w": torch.randn(40, generator=g).bfloat16()}, "prompts": ["a red circle", ""],
           "optimizer": {}, "scaler": {}, "rng": [], "args": {"lr": 1e-3}, "finished": False}
    checkpoint.save_checkpoint(path, obj)
    return obj


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def _zip_regions(data):
    """(kind, start, end) of every part of a zip file: local headers, member data, central
    directory entries, end records (zip64's and the classic one)."""
    regions = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = archive.infolist()
    for info in members:
        o = info.header_offset
        n, m = struct.unpack("<HH", data[o + 26:o + 30])
        regions += [("local header", o, o + 30 + n + m),
                    ("data", o + 30 + n + m, o + 30 + n + m + info.compress_size)]
    end = data.rindex(b"PK\x05\x06")
    o = struct.unpack("<I", data[end + 16:end + 20])[0]
    while data[o:o + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack("<HHH", data[o + 28:o + 34])
        regions.append(("central directory", o, o + 46 + n + m + k))
        o += 46 + n + m + k
    return regions + [("end record", o, len(data))]


def _flip(data, pos, bit):
    flipped = bytearray(data)
    flipped[pos] ^= 1 << bit
    return bytes(flipped)


def test_a_flipped_directory_flag_in_the_zip_directory_is_refused_not_read_as_garbage(tmp_path):
    """torch reads an entry whose DOS "directory" attribute is set as empty, and returns
    uninitialised memory for that tensor (which may, by chance, hold the right bytes); zipfile's
    CRC check passes. The digest refuses every such file whose tensor came out different."""
    path = tmp_path / "ckpt.pt"
    original = _small_checkpoint(path)                     # kept: its memory is not reused
    data = path.read_bytes()
    entries = [(start, data[start + 46:start + 46 + struct.unpack("<H", data[start + 28:start + 30])[0]])
               for kind, start, _ in _zip_regions(data) if kind == "central directory"]
    tensors = [start for start, name in entries if b"/data/" in name]
    assert len(tensors) == 3
    refused = 0
    for start in tensors:
        bad = tmp_path / "bad.pt"
        bad.write_bytes(_flip(data, start + 38, 4))          # external attributes: 0x10
        try:
            loaded = checkpoint.load_checkpoint(bad, "vae")
        except common.UserError as e:
            assert f"{bad}: damaged file" in str(e)
            refused += 1
            continue
        assert _same(loaded, original), "a tensor was read as other bytes, silently"
    assert refused >= 1


def test_bit_flips_anywhere_in_a_checkpoint_are_refused_in_one_line_or_harmless(tmp_path):
    path, bad = tmp_path / "ckpt.pt", tmp_path / "flipped.pt"
    original = _small_checkpoint(path)
    data = path.read_bytes()
    regions = _zip_regions(data)
    assert {kind for kind, _, _ in regions} == {"local header", "data", "central directory",
                                                "end record"}
    flips = []
    for kind, start, end in regions:
        if kind == "central directory":              # what zipfile and torch read as flags:
            flips += [(start + 6, 4), (start + 8, 0), (start + 8, 5), (start + 8, 6),
                      (start + 10, 3), (start + 38, 4)]   # version, encrypted, patched, strong
    rng = random.Random(22)                             # encryption, method, DOS directory
    for kind, start, end in regions:                    # ~250 random bits over every part
        flips += [(rng.randrange(start, end), rng.randrange(8)) for _ in range(
            min(12, 2 * (end - start)))]
    outcomes = {"refused": 0, "harmless": 0}
    for pos, bit in flips:
        bad.write_bytes(_flip(data, pos, bit))
        try:
            loaded = checkpoint.load_checkpoint(bad, "vae")
        except common.UserError as e:
            assert str(bad) in str(e) and "\n" not in str(e)
            outcomes["refused"] += 1
            continue
        except Exception as e:
            raise AssertionError(f"byte {pos} bit {bit}: {type(e).__name__}: {e}") from None
        assert _same(loaded, original), f"byte {pos} bit {bit}: loaded something else, silently"
        outcomes["harmless"] += 1
    assert outcomes["refused"] > 100 and sum(outcomes.values()) == len(flips) > 200, outcomes


def test_an_edited_checkpoint_or_one_without_its_digest_is_refused(runs, tmp_path):
    ckpt = torch.load(runs["vae"], weights_only=True)
    assert ckpt["digest"] == checkpoint._digest(ckpt)
    ckpt["ema"]["decoder.out.weight" if "decoder.out.weight" in ckpt["ema"] else
                next(iter(ckpt["ema"]))].view(-1)[0] += 1
    torch.save(ckpt, tmp_path / "edited.pt")                 # every CRC right, the digest stale
    del ckpt["digest"]
    torch.save(ckpt, tmp_path / "none.pt")
    for name in ("edited.pt", "none.pt"):
        with pytest.raises(common.UserError, match="does not match its digest"):
            checkpoint.load_vae(tmp_path / name, "cpu")


def test_a_hostile_configuration_allocates_nothing_before_it_is_refused(runs, tmp_path, expect):
    ckpt = torch.load(runs["flow"], weights_only=True)
    ckpt["config"].update(dim=8192, depth=48)                # ~40G parameters if it were built
    checkpoint.save_checkpoint(tmp_path / "hostile.pt", ckpt)
    code = ("import resource, runpy, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
            "sys.argv = ['sample.py', '--ckpt', sys.argv[1], '--device', 'cpu', '--out', sys.argv[2]]\n"
            "try:\n"
            "    runpy.run_path('sample.py', run_name='__main__')\n"
            "finally:\n"
            "    print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hostile.pt"),
                           str(tmp_path / "x.png")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - t0
    rss_mb = int(proc.stderr.split("maxrss")[-1]) / 1024
    err = proc.stderr.split("maxrss")[0]
    expect.one_line_error((proc.returncode, proc.stdout, err), "weights do not fit its configuration")
    assert rss_mb < 1024 and seconds < 30, (rss_mb, seconds)


@pytest.mark.parametrize("where,field,value,fragment", [
    ("flow", "heads", 0, "heads = 0"), ("flow", "patch_size", 0, "patch_size = 0"),
    ("flow", "heads", "4", "heads = '4'"), ("flow", "mlp_ratio", float("nan"), "mlp_ratio = nan"),
    ("flow", "image_size", "32", "image size"), ("vae", "groups", 0, "groups = 0"),
    ("vae", "attn_heads", 0, "attn_heads = 0"), ("vae", "image_size", "32", "image_size = '32'"),
    ("vae", "groups", 3, "describes no model (ValueError: groups=3 does not divide")])
def test_zero_or_wrongly_typed_config_values_are_one_line(cli, runs, tmp_path, expect, flow_args,
                                                          where, field, value, fragment):
    ckpt = torch.load(runs[where], weights_only=True)
    (ckpt if field == "image_size" and where == "flow" else ckpt["config"])[field] = value
    bad = checkpoint.save_checkpoint(tmp_path / "bad.pt", ckpt) or tmp_path / "bad.pt"
    if where == "flow":
        expect.one_line_error(cli("sample.py", "--ckpt", bad, "--out", tmp_path / "x.png"), fragment)
        return
    expect.one_line_error(cli("sample.py", "--ckpt", runs["flow"], "--vae", bad, "--out",
                              tmp_path / "x.png"), fragment)
    args = flow_args(tmp_path / "f")
    args[args.index("--vae") + 1] = bad
    expect.one_line_error(cli(*args), fragment)
    assert not (tmp_path / "f").exists()


def test_a_flow_checkpoint_passed_as_a_vae_is_named_as_such(cli, runs, expect):
    expect.one_line_error(cli("sample.py", "--ckpt", runs["flow"], "--vae", runs["flow"]),
                          "a checkpoint of kind 'flow', where one of kind 'vae' is needed")


@pytest.mark.parametrize("field,value", [("input_size", 65536), ("max_prompt_len", 65536),
                                         ("depth", 100000)])
def test_a_configuration_claiming_a_huge_model_is_refused_before_anything_is_built(
        runs, tmp_path, field, value):
    ckpt = torch.load(runs["flow"], weights_only=True)
    ckpt["config"][field] = value
    checkpoint.save_checkpoint(tmp_path / "huge.pt", ckpt)
    t0 = time.perf_counter()
    with pytest.raises(common.UserError, match=f"configuration describes no model \\({field} = "):
        checkpoint.load_flow(tmp_path / "huge.pt")
    assert time.perf_counter() - t0 < 5
