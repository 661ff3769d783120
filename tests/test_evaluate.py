"""Tests for evaluate.py: the command line end to end on checkpoints trained here in seconds,
prompt accuracy, the real sets and their floor, the feature extractors, and the tables.

The module fixture runs the real train_vae.main and train_flow.main, with the "32" VAE preset
and the "tiny" DiT preset shrunk for the duration (the real tiny DiT, 9M parameters, takes
minutes on 2 CPU cores), so the checkpoints have exactly the format the scripts write."""

import json
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data as data_lib
import dit
import evaluate as ev
import features as features_lib
import metrics
import shapes
import train_flow
import train_vae
import vae as vae_lib


FAST = ["--feature-steps", "2", "--n-builtin", "64", "--device", "cpu"]  # a barely trained CNN


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(vae_lib.VAE_PRESETS, "32", vae_lib.VAEConfig(
            image_size=32, base_channels=8, channel_mults=(1, 2, 2), groups=4))
        mp.setitem(dit.PRESETS, "tiny", dit.DiTConfig(
            dim=32, depth=1, heads=2, time_dim=32, prompt_dim=32, prompt_depth=1, prompt_heads=2))
        train_vae.main(["--out", str(tmp / "vae"), "--steps", "3", "--batch-size", "8",
                        "--n-builtin", "64", "--log-every", "1", "--device", "cpu", "--amp", "off"])
        train_flow.main(["--vae", str(tmp / "vae/ckpt.pt"), "--out", str(tmp / "flow"),
                         "--steps", "2", "--batch-size", "8", "--n-builtin", "64",
                         "--preset", "tiny", "--sample-every", "1000", "--sample-steps", "1",
                         "--log-every", "1", "--device", "cpu", "--amp", "off"])
    return {"vae": tmp / "vae/ckpt.pt", "flow": tmp / "flow/ckpt.pt", "tmp": tmp}


def _heldout(n):
    return data_lib.load_dataset(None, 32, "test", n_builtin=64, seed=0).subset(range(n))


# ---------------------------------------------------------------------------------------------
# the whole command


def test_cli_json_has_documented_keys_one_row_per_setting_and_accuracies_in_0_1(ckpts, capsys):
    out = ckpts["tmp"] / "results.json"
    assert ev.main(["--ckpt", str(ckpts["flow"]), "--n", "16", "--cfg", "1", "4",
                    "--steps", "2", "--json", str(out)] + FAST) == 0
    r = json.loads(out.read_text())
    assert {"checkpoint", "features", "n", "settings", "vae"} <= set(r)
    assert r["n"] == 16 and "not comparable to published FID" in r["features"]
    assert [(s["cfg"], s["steps"]) for s in r["settings"]] == [(1.0, 2), (4.0, 2)]
    for s in r["settings"]:
        accs = [f"{k}_acc" for k in ("shape", "color", "size", "count", "background", "position")]
        assert {"fd", "floor_fd", "kid", "floor_kid", "precision", "recall", "seconds"} <= set(s)
        assert all(0.0 <= s[k] <= 1.0 for k in accs)
        assert s["floor_fd"] == r["settings"][0]["floor_fd"]  # one floor for every setting
    assert {"psnr", "ssim", "kl_nats_per_dim", "latent_mean", "latent_std", "rfid"} <= set(r["vae"])
    assert len(r["vae"]["latent_mean"]) == len(r["vae"]["latent_std"]) == 4
    printed = capsys.readouterr().out
    assert "cfg 4 steps 2:" in printed and "elapsed" in printed  # a progress line per setting
    assert "floor_fd" in printed and "psnr" in printed  # the tables


def test_several_trainings_are_summarized_by_median_and_range(ckpts, capsys):
    out = ckpts["tmp"] / "three.json"
    flow = str(ckpts["flow"])
    assert ev.main(["--ckpt", flow, flow, "--n", "8", "--cfg", "4", "--sample-steps", "2",
                    "--json", str(out)] + FAST) == 0
    r = json.loads(out.read_text())
    one = r["runs"][0]["settings"][0]
    (row,) = r["summary"]["settings"]
    assert len(r["runs"]) == 2 and (row["cfg"], row["steps"]) == (4.0, 2)
    for key in ("shape_acc", "color_acc", "fd"):                  # the same model twice: no spread
        assert row[key] == {"median": one[key], "min": one[key], "max": one[key]}
    assert "median (min-max) over 2 trainings" in capsys.readouterr().out
    runs = [{"settings": [{"cfg": 4.0, "steps": 50, "shape_acc": a}], "vae": {"psnr": p}}
            for a, p in [(0.9, 30.0), (0.5, 32.0), (0.7, 31.0)]]
    summary = ev.summarize(runs)
    assert summary["settings"][0]["shape_acc"] == {"median": 0.7, "min": 0.5, "max": 0.9}
    assert summary["vae"]["psnr"] == {"median": 31.0, "min": 30.0, "max": 32.0}


def test_vae_only_cli_psnr_equals_independent_computation(ckpts):
    out = ckpts["tmp"] / "vae.json"
    assert ev.main(["--vae", str(ckpts["vae"]), "--n", "12", "--json", str(out)] + FAST) == 0
    r = json.loads(out.read_text())
    assert r["settings"] == [] and r["vae"]["n"] == 12
    vae, _ = checkpoint.load_vae(ckpts["vae"], "cpu")
    x = _heldout(12).images.double() / 255  # [0, 1]
    with torch.no_grad():
        mu, _ = vae.encode(x.float() * 2 - 1)
        x_hat = ((vae.decode(mu).clamp(-1, 1) + 1) / 2).double()
    mse = ((x - x_hat) ** 2).flatten(1).mean(1)
    expected = float((10 * torch.log10(1 / mse)).mean())
    assert abs(r["vae"]["psnr"] - expected) < 1e-3
    recons = data_lib.from_model_range(vae.decode(mu).clamp(-1, 1))
    shape_hits = [shapes.score_attributes(shapes.read_attributes(img), a)["shape"]
                  for img, a in zip(recons, _heldout(12).attributes)]
    assert r["vae"]["recon_acc"]["shape_acc"] == pytest.approx(np.mean(shape_hits))


class _BlurVAE(torch.nn.Module):
    """A stand-in VAE: the latent is the image average-pooled k x k, decoded by nearest upsampling
    (k = 1: a perfect autoencoder)."""

    def __init__(self, k):
        super().__init__()
        self.k = k

    def encode(self, x):
        mu = torch.nn.functional.avg_pool2d(x, self.k)
        return mu, torch.zeros_like(mu)

    def decode(self, z):
        return torch.nn.functional.interpolate(z, scale_factor=self.k, mode="nearest")


def test_recon_accuracy_is_the_checkers_on_a_perfect_vae_and_drops_when_detail_is_lost():
    held = _heldout(60)
    flat = lambda x: x.float().flatten(1)  # noqa: E731  (features only feed rFID here)
    perfect = ev.evaluate_vae_section(_BlurVAE(1), held.images, flat, "cpu", 25, held.attributes)
    assert perfect["recon_acc"]["shape_acc"] == 1.0 and perfect["recon_acc"]["color_acc"] == 1.0
    assert perfect["psnr"] == float("inf")
    blurred = ev.evaluate_vae_section(_BlurVAE(4), held.images, flat, "cpu", 25, held.attributes)
    assert blurred["recon_acc"]["shape_acc"] < 0.8  # 4x4 blocks: outlines are gone
    assert "recon_acc" not in ev.evaluate_vae_section(_BlurVAE(1), held.images, flat, "cpu")


def _write_folder(root, classes, per_class, sidecar=None):
    rng = np.random.default_rng(0)
    for c, rgb in classes.items():
        folder = root / c if c else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{c}{i}.png")
            if sidecar is not None:
                (folder / f"{c}{i}.txt").write_text(sidecar(c, i))


def test_class_folder_reports_class_accuracy_beside_its_classifier_accuracy(ckpts):
    root = ckpts["tmp"] / "classes"
    _write_folder(root, {"red": (220, 30, 30), "blue": (30, 30, 220)}, per_class=20)
    out = ckpts["tmp"] / "classes.json"
    ev.main(["--ckpt", str(ckpts["flow"]), "--data", str(root), "--n", "8", "--cfg", "1",
             "--steps", "1", "--json", str(out)] + FAST + ["--feature-steps", "10"])
    r = json.loads(out.read_text())
    assert r["prompt_accuracy"].startswith("a classifier of the 2 classes")
    assert 0.0 <= r["settings"][0]["class_acc"] <= 1.0
    assert r["classifier_test_acc"] == 1.0  # red vs blue noise is easy
    assert r["n"] == 8


def test_unlabelled_folder_skips_prompt_accuracy_and_says_so(ckpts, capsys):
    root = ckpts["tmp"] / "plain"
    _write_folder(root, {"": (128, 128, 128)}, per_class=12)  # 12 images: n capped to 6
    out = ckpts["tmp"] / "plain.json"
    ev.main(["--ckpt", str(ckpts["flow"]), "--data", str(root), "--n", "8", "--cfg", "1",
             "--steps", "1", "--json", str(out)] + FAST)
    r = json.loads(out.read_text())
    captured = capsys.readouterr()
    assert "prompt accuracy skipped" in captured.out
    assert "using n = 6" in captured.err
    assert r["n"] == 6 and not any(k.endswith("_acc") for k in r["settings"][0])


@pytest.mark.parametrize("case", ["missing", "vae_as_flow"])
def test_bad_ckpt_exits_2_with_one_line_naming_the_flag(ckpts, case, run):
    path = ckpts["tmp"] / "nope.pt" if case == "missing" else ckpts["vae"]
    proc = run("evaluate.py", "--ckpt", path, "--device", "cpu", check=False, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--ckpt" in lines[0] and "Traceback" not in proc.stderr
    assert ("not found" if case == "missing" else "vae checkpoint") in lines[0]


def test_prompt_accuracy_is_one_on_real_images_and_lower_on_shuffled_pairs():
    real = _heldout(32)
    acc = ev.prompt_accuracy(real.images, real.attributes)
    assert acc == {f"{k}_acc": 1.0 for k in ("shape", "color", "size", "count", "background",
                                              "position")}
    shuffled = real.attributes[1:] + real.attributes[:1]
    wrong = ev.prompt_accuracy(real.images, shuffled)
    assert all(wrong[k] <= acc[k] for k in acc)
    assert wrong["shape_acc"] < 0.6 and wrong["color_acc"] < 0.6


def test_composition_accuracy_splits_seen_prompts_from_held_out_pairs():
    real = _heldout(200)
    held = [shapes.held_out_objects(a) for a in real.attributes]
    seen = [i for i, h in enumerate(held) if not h]
    acc = ev.composition_accuracy(real.images, real.attributes)
    assert acc["seen_n"] == len(seen) and acc["held_out_n"] == sum(map(len, held)) > 30
    assert all(acc[k] >= 0.98 for k in acc if k.endswith("_acc"))   # real images: all right
    rolled = real.attributes[1:] + real.attributes[:1]               # each image, another prompt
    wrong = ev.composition_accuracy(real.images, rolled)
    seen = [i for i, a in enumerate(rolled) if not shapes.held_out_objects(a)]
    subset = ev.prompt_accuracy(real.images[seen], [rolled[i] for i in seen])
    assert {k: wrong[f"seen_{k}"] for k in subset} == subset          # seen: prompt accuracy
    assert wrong["held_out_pair_acc"] < 0.3 and wrong["held_out_color_acc"] < 0.5


def test_a_hold_out_pairs_run_is_evaluated_seen_against_held_out(ckpts, capsys):
    tmp = ckpts["tmp"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(dit.PRESETS, "tiny", dit.DiTConfig(
            dim=32, depth=1, heads=2, time_dim=32, prompt_dim=32, prompt_depth=1, prompt_heads=2))
        train_flow.main(["--vae", str(ckpts["vae"]), "--out", str(tmp / "pairs"), "--steps", "1",
                         "--batch-size", "8", "--n-builtin", "64", "--hold-out-pairs",
                         "--sample-every", "1000", "--sample-steps", "1", "--device", "cpu",
                         "--amp", "off"])
    out = tmp / "pairs.json"
    assert ev.main(["--ckpt", str(tmp / "pairs/ckpt.pt"), "--n", "24", "--cfg", "4",
                    "--sample-steps", "1", "--json", str(out)] + FAST) == 0
    (row,) = json.loads(out.read_text())["settings"]
    held = [shapes.held_out_objects(a) for a in _heldout(24).attributes]
    assert row["seen_n"] == sum(not h for h in held) and row["held_out_n"] == sum(map(len, held))
    assert 0 <= row["held_out_pair_acc"] <= row["held_out_shape_acc"] <= 1
    assert "composition (a --hold-out-pairs run)" in capsys.readouterr().out
    plain = SimpleNamespace(data=None, n_builtin=None, vae=None)      # other runs: no split
    assert ev.load_models(plain, ckpts["flow"], torch.device("cpu"))[2].hold_out_pairs is False


def test_real_vs_real_floor_is_smaller_than_real_vs_noise():
    test = data_lib.load_dataset(None, 32, "test", n_builtin=64, seed=0)
    torch.manual_seed(0)
    features = features_lib.TrainedFeatureNet(features_lib.FeatureNet(40).eval())  # untrained: cheap, still telling
    real_a, real_b = ev.real_sets(None, test, 64, 32, seed=0)
    assert len(real_a) == len(real_b) == 64
    assert not set(real_a.captions) & set(real_b.captions) or \
        not any(torch.equal(a, b) for a in real_a.images for b in real_b.images)  # disjoint
    noise = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    m = metrics.distribution_metrics(features(real_a.images), features(noise), features(real_b.images),
                                kid_subsets=10)
    assert m["floor_fd"] < m["fd"] / 2
    assert m["floor_kid"] < m["kid"]


def test_prompt_task_tells_classes_from_free_captions_and_no_captions():
    def images(captions):
        return data_lib.ImageSet(torch.zeros(len(captions), 3, 8, 8, dtype=torch.uint8), captions)

    assert ev.prompt_task(None, _heldout(4)).kind == "attributes"
    classes = ev.prompt_task("f", images(["cat", "dog"] * 10))
    assert classes.kind == "classes" and classes.classes == ["cat", "dog"]
    assert ev.prompt_task("f", images([f"photo {i}" for i in range(20)])).kind == "none"
    assert ev.prompt_task("f", images([""] * 20)).note.startswith("skipped")
    assert ev.prompt_task("f", images(["cat"] * 20)).kind == "none"


def test_rotation_task_labels_each_image_with_its_rotation():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    images, labels = ev.rotation_task(x)
    assert images.shape == (8, 3, 4, 4) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(images[3], torch.rot90(x[1], 1, dims=(1, 2)))
    assert torch.equal(torch.rot90(images[5], 2, dims=(1, 2)), x[1])


def test_builtin_feature_labels_are_shape_times_8_plus_colour_of_leftmost_object():
    real = _heldout(10)
    _, labels = ev.feature_task(real, ev.prompt_task(None, real))
    for a, y in zip(real.attributes, labels.tolist()):
        first = a["objects"][0]
        assert y == shapes.SHAPES.index(first["shape"]) * 8 + list(shapes.COLORS).index(first["color"])


def test_with_inception_features_are_inceptions_and_class_folders_still_get_a_classifier(monkeypatch):
    fake = features_lib.FeatureExtractor("inception-fake", lambda x: x.float().mean(dim=(2, 3)))
    monkeypatch.setattr(ev, "load_inception", lambda path, device: fake)
    colours = torch.tensor([[220, 30, 30], [30, 30, 220]], dtype=torch.uint8)
    images = data_lib.ImageSet(colours[torch.arange(16) % 2][:, :, None, None].expand(-1, -1, 16, 16)
                               .contiguous(), ["red", "blue"] * 8)
    args = ev.parse_args(["--feature-steps", "1"])
    task = ev.prompt_task("folder", images)
    features, classifier = ev.pick_features(args, images, images, task, "cpu")
    assert features is fake
    assert classifier is not None and classifier.test_accuracy is not None
    plain = data_lib.ImageSet(images.images, [""] * 16)
    assert ev.pick_features(args, plain, plain, ev.prompt_task("folder", plain), "cpu") == (fake, None)


# ---------------------------------------------------------------------------------------------
# feature extractors and tables


class _NotInception(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10]                               # (N, 10), not (N, 2048)


def test_another_torchscript_model_as_inception_is_one_line(ckpts, tmp_path, cli, expect):
    path = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(_NotInception()), str(path))
    expect.one_line_error(cli("evaluate.py", "--vae", ckpts["vae"], "--inception", path, *FAST),
                          "not the FID Inception-v3 (it returns (2, 10) for 2 images")


def test_format_table_aligns_columns():
    rows = [{"model": "dit-s", "fd": 12.3456, "kid": 0.00123},
            {"model": "dit-b", "fd": 7.5}]
    lines = ev.format_table(rows, ["model", "fd", "kid"]).splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["model", "fd", "kid"]
    assert lines[2].split() == ["dit-s", "12.35", "0.00123"]
    assert lines[3].split() == ["dit-b", "7.5", "-"]
    # numeric columns are right-aligned: the numbers end where the header ends
    assert lines[2].index("12.35") + len("12.35") == lines[0].index("fd") + len("fd")


# ---------------------------------------------------------------------------------------------
# the --json output is checked before the evaluation and never clobbers (issue 22)


def _no_evaluation(*args, **kwargs):
    return {"settings": [], "vae": {}, "evaluated": True}


def test_json_never_replaces_a_file_it_did_not_write_unless_overwrite(ckpts, monkeypatch, tmp_path):
    monkeypatch.setattr(ev, "evaluate_checkpoint", _no_evaluation)     # the refusal comes first
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(ckpts["flow"].read_bytes())
    before = ckpt.read_bytes()
    with pytest.raises(ev.UserError, match="is the file this command reads as --ckpt"):
        ev.main(["--ckpt", str(ckpt), "--json", str(ckpt)] + FAST)
    other = tmp_path / "vae-copy.pt"
    other.write_bytes(b"a checkpoint")
    with pytest.raises(ev.UserError, match="exists and this command did not write it"):
        ev.main(["--ckpt", str(ckpt), "--json", str(other)] + FAST)
    assert ckpt.read_bytes() == before and other.read_bytes() == b"a checkpoint"
    assert ev.main(["--ckpt", str(ckpt), "--json", str(other), "--overwrite"] + FAST) == 0
    assert json.loads(other.read_text())["evaluated"]


def test_an_unwritable_json_path_fails_before_the_evaluation(ckpts, monkeypatch, tmp_path):
    def evaluation_started(*args, **kwargs):
        raise AssertionError("the evaluation ran before --json was checked")
    monkeypatch.setattr(ev, "evaluate_checkpoint", evaluation_started)
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ev.UserError, match="--json .*file: cannot write there"):
        ev.main(["--ckpt", str(ckpts["flow"]), "--json", str(a_file / "r.json")] + FAST)


@pytest.mark.parametrize("seed", ["-1", str(2 ** 64), "1.5"])
def test_evaluate_seed_is_bounded_like_the_other_scripts(cli, seed):
    rc, _, err = cli("evaluate.py", "--seed", seed)
    assert rc == 2 and "usage:" in err and "--seed" in err and "Traceback" not in err


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(3, 4)

    def forward(self, x):
        return self.l(x)


def test_a_torchscript_file_with_a_swapped_data_pkl_is_refused_with_its_reason(tmp_path):
    torch.jit.save(torch.jit.script(_Linear()), str(tmp_path / "a.pt"))
    torch.jit.save(torch.jit.script(_NotInception()), str(tmp_path / "b.pt"))
    with zipfile.ZipFile(tmp_path / "a.pt") as a, zipfile.ZipFile(tmp_path / "b.pt") as b:
        swapped = next(n for n in b.namelist() if n.endswith("/data.pkl"))
        with zipfile.ZipFile(tmp_path / "swapped.pt", "w") as out:
            for name in a.namelist():
                out.writestr(name, b.read(swapped) if name.endswith("/data.pkl") else a.read(name))
    args = ev.parse_args(["--inception", str(tmp_path / "swapped.pt")])
    with pytest.raises(ev.UserError) as refused:
        ev.pick_features(args, None, None, None, "cpu")
    reason = str(refused.value).split("not a TorchScript model (")[1].rstrip(")")
    assert reason.strip() and "\n" not in str(refused.value), str(refused.value)
