"""Tests for evaluate.py: the command line end to end on the session's checkpoints (trained by
train_vae.py and train_flow.py in tests/conftest.py), prompt accuracy and its composition split,
the real sets and their floor, the choice of features, the tables, and the one-line refusals
(flags, checkpoints, --inception, --json) that come before any slow work."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data as data_lib
import evaluate as ev
import features as features_lib
import metrics
import shapes

FAST = ["--feature-steps", "2", "--n-builtin", "64", "--device", "cpu"]  # a barely trained CNN
ACCURACIES = [f"{k}_acc" for k in ("shape", "color", "size", "count", "background", "position")]
REFERENCES = [f"{ref}_{k}" for ref in ("floor", "ceiling")
              for k in ("fd", "kid", "precision", "recall")]


def _heldout(n):
    return data_lib.load_dataset(None, 32, "test", n_builtin=64, seed=0).subset(range(n))


def _evaluate(tmp_path, *argv):
    """evaluate.main(argv + FAST) with --json; returns the JSON it wrote."""
    out = tmp_path / "results.json"
    assert ev.main([*map(str, argv), "--json", str(out), *FAST]) == 0
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# the whole command


def test_a_missing_second_checkpoint_is_one_line_before_the_first_is_evaluated(
        cli, runs, tmp_path, expect, monkeypatch):
    def no_images(*args, **kwargs):
        raise AssertionError("the first checkpoint's evaluation began")
    monkeypatch.setattr(data_lib, "load_dataset", no_images)
    expect.one_line_error(cli("evaluate.py", "--ckpt", runs["flow"], tmp_path / "gone.pt"),
                          "file not found")


def test_two_trainings_give_full_results_and_a_summary_of_median_and_range(runs, tmp_path, capsys):
    r = _evaluate(tmp_path, "--ckpt", runs["flow"], runs["flow"], "--n", 16, "--cfg", 1, 4,
                  "--sample-steps", 2)
    first = r["runs"][0]
    assert {"checkpoint", "features", "n", "settings", "vae"} <= set(first)
    assert first["n"] == 16 and "not comparable to published FID" in first["features"]
    assert [(s["cfg"], s["steps"]) for s in first["settings"]] == [(1.0, 2), (4.0, 2)]
    for s in first["settings"]:
        assert {"fd", "floor_fd", "kid", "floor_kid", "precision", "recall", "seconds"} <= set(s)
        assert all(0.0 <= s[k] <= 1.0 for k in ACCURACIES)
        assert {k: s[k] for k in REFERENCES} == {k: first["settings"][0][k] for k in REFERENCES}
        assert all(np.isfinite(s[k]) for k in REFERENCES)       # one floor, one ceiling for all
        assert 0.0 <= s["copy_share"] <= 1.0
    vae = first["vae"]
    assert {"psnr", "ssim", "kl_nats_per_dim", "latent_mean", "latent_std", "rfid"} <= set(vae)
    assert len(vae["latent_mean"]) == len(vae["latent_std"]) == 4
    rows = r["summary"]["settings"]
    assert [(row["cfg"], row["steps"]) for row in rows] == [(1.0, 2), (4.0, 2)]
    for key in ACCURACIES[:2] + ["fd", "ceiling_fd", "copy_share"]:  # the same model twice:
        one = first["settings"][1][key]                                 # no spread
        assert rows[1][key] == {"median": one, "min": one, "max": one}
    printed = capsys.readouterr().out
    assert "cfg 4 steps 2:" in printed and "elapsed" in printed  # a progress line per setting
    header = next(line for line in printed.splitlines() if "floor_fd" in line).split()
    assert header.index("floor_fd") < header.index("ceiling_fd") < header.index("fd")
    assert "copy_share" in header and "psnr" in printed  # the tables
    assert "median (min-max) over 2 trainings" in printed


def test_summarize_takes_median_min_and_max_of_every_number():
    runs = [{"settings": [{"cfg": 4.0, "steps": 50, "shape_acc": a}], "vae": {"psnr": p}}
            for a, p in [(0.9, 30.0), (0.5, 32.0), (0.7, 31.0)]]
    summary = ev.summarize(runs)
    assert summary["settings"][0]["shape_acc"] == {"median": 0.7, "min": 0.5, "max": 0.9}
    assert summary["vae"]["psnr"] == {"median": 31.0, "min": 30.0, "max": 32.0}
    assert summary["vae"]["rfid"] is None                             # no run measured it
    assert "0.7 (0.5-0.9)" in ev.summary_report(summary, 3)


def test_vae_only_cli_psnr_equals_independent_computation(runs, tmp_path):
    r = _evaluate(tmp_path, "--vae", runs["vae"], "--n", 12)
    assert r["settings"] == [] and r["vae"]["n"] == 12 and r["checkpoint"] is None
    refs = r["references"]                        # floor and ceiling without a flow model too
    assert r["n"] == 12 and refs["floor_fd"] > 0 and refs["ceiling_fd"] > 0
    vae, _ = checkpoint.load_vae(runs["vae"], "cpu")
    x = _heldout(12).images.double() / 255  # [0, 1]
    with torch.no_grad():
        mu, _ = vae.encode(x.float() * 2 - 1)
        x_hat = ((vae.decode(mu).clamp(-1, 1) + 1) / 2).double()
    mse = ((x - x_hat) ** 2).flatten(1).mean(1)
    expected = float((10 * torch.log10(1 / mse)).mean())
    assert abs(r["vae"]["psnr"] - expected) < 1e-3
    recons = data_lib.from_model_range(x_hat * 2 - 1)
    shape_hits = [shapes.score_attributes(shapes.read_attributes(img), a)["shape"]
                  for img, a in zip(recons, _heldout(12).attributes)]
    assert r["vae"]["recon_acc"]["shape_acc"] == pytest.approx(np.mean(shape_hits))


class _BlurVAE(torch.nn.Module):
    """A stand-in VAE: the latent is the image average-pooled k x k, decoded by nearest upsampling
    (k = 1: a perfect autoencoder)."""

    def __init__(self, k):
        super().__init__()
        self.k, self.where = k, torch.nn.Parameter(torch.zeros(()))  # the device it runs on

    def encode(self, x):
        mu = torch.nn.functional.avg_pool2d(x, self.k)
        return mu, torch.zeros_like(mu)

    def decode(self, z):
        return torch.nn.functional.interpolate(z, scale_factor=self.k, mode="nearest")


def test_recon_accuracy_is_the_checkers_on_a_perfect_vae_and_drops_when_detail_is_lost():
    held = _heldout(60)
    colour = lambda x: x.float().mean(dim=(2, 3))  # noqa: E731  (N, 3): features for rFID
    perfect = ev.evaluate_vae_section(_BlurVAE(1), held.images, colour, 25, held.attributes)
    assert perfect["recon_acc"]["shape_acc"] == 1.0 and perfect["recon_acc"]["color_acc"] == 1.0
    assert perfect["psnr"] == float("inf") and perfect["rfid"] == pytest.approx(0.0, abs=1e-6)
    blurred = ev.evaluate_vae_section(_BlurVAE(4), held.images, colour, 25, held.attributes)
    assert blurred["recon_acc"]["shape_acc"] < 0.8  # 4x4 blocks: outlines are gone
    assert "recon_acc" not in ev.evaluate_vae_section(_BlurVAE(1), held.images, None)


def test_the_ceiling_of_a_perfect_vae_is_the_floor_and_a_lossy_vae_lies_above_it():
    test = data_lib.load_dataset(None, 32, "test", n_builtin=64, seed=0)
    real_a, real_b = ev.real_sets(None, test, 48, 32, seed=0)
    torch.manual_seed(0)
    features = features_lib.TrainedFeatureNet(features_lib.FeatureNet(40).eval())  # untrained
    refs = {k: ev.references(_BlurVAE(k), features(real_a.images), real_b, features, 16)
            for k in (1, 8, 32)}
    perfect = refs[1]
    for key in ("fd", "kid", "precision", "recall"):                 # identity: B itself
        assert perfect[f"ceiling_{key}"] == pytest.approx(perfect[f"floor_{key}"], abs=1e-9)
    lossy, lossier = refs[8], refs[32]                                # 8x8 blocks; one colour
    assert lossy["floor_fd"] == lossier["floor_fd"] == perfect["floor_fd"]
    assert 1.3 * lossy["floor_fd"] < lossy["ceiling_fd"] < lossier["ceiling_fd"]
    assert lossier["ceiling_precision"] < lossy["ceiling_precision"] < lossy["floor_precision"]


@pytest.mark.parametrize("samples", ["copies", "fresh"])
def test_samples_that_copy_training_images_are_flagged_and_fresh_ones_are_not(
        runs, tmp_path, monkeypatch, capsys, samples):
    """The "samples" are the VAE's reconstructions of training images (what a flow that
    memorised its training latents draws) or of held-out images (one that generalises)."""
    split = "train" if samples == "copies" else "test"
    images = data_lib.load_dataset(None, 32, split, n_builtin=64, seed=0).images[-16:]
    monkeypatch.setattr(ev, "generate", lambda model, vae, *a: ev.reconstruct(vae, images))
    r = _evaluate(tmp_path, "--ckpt", runs["flow"], "--n", 16, "--cfg", 1, 4, "--sample-steps", 1)
    shares = [row["copy_share"] for row in r["settings"]]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "copy_share" in line]
    if samples == "copies":
        assert shares == [1.0, 1.0]
        (line,) = warnings                                            # one line for both
        assert "cfg 1 steps 1: 1.00; cfg 4 steps 1: 1.00" in line
        assert "near-copies of training images" in line and "not a measure of generalis" in line
    else:
        assert max(shares) < 0.5 and warnings == []


def test_copy_warning_names_each_setting_above_the_threshold_and_an_fd_below_the_floor():
    def row(cfg, share, fd):
        return {"cfg": cfg, "steps": 50, "copy_share": share, "fd": fd, "floor_fd": 1.0}

    assert ev.copy_warning([row(1, 0.5, 0.5), row(4, None, 2.0)]) is None  # at 0.5: not above
    line = ev.copy_warning([row(1, 0.05, 2.0), row(2, 0.7, 2.0), row(4, 0.96, 0.4)])
    assert "\n" not in line and "cfg 1 " not in line
    assert "(cfg 2 steps 50: 0.70; cfg 4 steps 50: 0.96, fd below the floor)" in line
    assert "near-copies of training images; the FD is not a measure of generalisation" in line


def _write_folder(root, classes, per_class):
    rng = np.random.default_rng(0)
    for c, rgb in classes.items():
        folder = root / c if c else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (32, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{c}{i}.png")


def test_class_folder_reports_class_accuracy_beside_its_classifier_accuracy(runs, tmp_path):
    _write_folder(tmp_path / "classes", {"red": (220, 30, 30), "blue": (30, 30, 220)}, 20)
    r = _evaluate(tmp_path, "--ckpt", runs["flow"], "--data", tmp_path / "classes", "--n", 8,
                  "--cfg", 1, "--sample-steps", 1, "--feature-steps", 10)
    assert r["prompt_accuracy"].startswith("a classifier of the 2 classes")
    assert 0.0 <= r["settings"][0]["class_acc"] <= 1.0
    assert r["classifier_test_acc"] == 1.0  # red vs blue noise is easy
    assert r["n"] == 8


def test_unlabelled_folder_skips_prompt_accuracy_and_says_so(runs, tmp_path, capsys):
    _write_folder(tmp_path / "plain", {"": (128, 128, 128)}, per_class=12)  # n capped to 6
    with pytest.raises(ev.UserError, match="--held-out-captions: .* holds no image out"):
        ev.main(["--ckpt", str(runs["flow"]), "--data", str(tmp_path / "plain"),
                 "--held-out-captions"])
    r = _evaluate(tmp_path, "--ckpt", runs["flow"], "--data", tmp_path / "plain", "--n", 8,
                  "--cfg", 1, "--sample-steps", 1)
    captured = capsys.readouterr()
    assert "prompt accuracy skipped" in captured.out
    assert "using n = 6" in captured.err and "holds no image out" in captured.err
    assert r["n"] == 6 and not any(k.endswith("_acc") for k in r["settings"][0])
    assert r["vae_held_out"] is False


def test_a_hold_out_pairs_run_is_evaluated_seen_against_held_out(runs, flow_args, cli, tmp_path,
                                                                   capsys):
    rc, _, err = cli(*flow_args(tmp_path / "pairs", "--hold-out-pairs"))
    assert rc == 0, err
    r = _evaluate(tmp_path, "--ckpt", tmp_path / "pairs/ckpt.pt", "--n", 24, "--cfg", 4,
                  "--sample-steps", 1)
    (row,) = r["settings"]
    held = [shapes.held_out_objects(a) for a in _heldout(24).attributes]
    assert row["seen_n"] == sum(not h for h in held) and row["held_out_n"] == sum(map(len, held))
    assert 0 <= row["held_out_pair_acc"] <= row["held_out_shape_acc"] <= 1
    assert "composition (a --hold-out-pairs run)" in capsys.readouterr().out
    plain = ev.parser().parse_args([])                                 # other runs: no split
    assert ev.load_models(plain, runs["flow"], torch.device("cpu"))[2].hold_out_pairs is False


# ---------------------------------------------------------------------------------------------
# prompt accuracy, real sets, features, tables


def test_prompt_accuracy_is_one_on_real_images_and_lower_on_shuffled_pairs():
    real = _heldout(32)
    acc = ev.prompt_accuracy(real.images, real.attributes)
    assert acc == {k: 1.0 for k in ACCURACIES}
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


def test_real_vs_real_floor_is_smaller_than_real_vs_noise():
    test = data_lib.load_dataset(None, 32, "test", n_builtin=64, seed=0)
    torch.manual_seed(0)
    features = features_lib.TrainedFeatureNet(features_lib.FeatureNet(40).eval())  # untrained
    real_a, real_b = ev.real_sets(None, test, 64, 32, seed=0)
    assert len(real_a) == len(real_b) == 64
    assert not any(torch.equal(a, b) for a in real_a.images for b in real_b.images)  # disjoint
    noise = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    m = metrics.distribution_metrics(features(real_a.images), features(noise),
                                     features(real_b.images), kid_subsets=10)
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


def test_with_inception_features_are_inceptions_and_class_folders_still_get_a_classifier():
    fake = features_lib.FeatureExtractor("inception-fake", lambda x: x.float().mean(dim=(2, 3)))
    colours = torch.tensor([[220, 30, 30], [30, 30, 220]], dtype=torch.uint8)
    pixels = colours[torch.arange(16) % 2][:, :, None, None].expand(-1, -1, 16, 16)
    images = data_lib.ImageSet(pixels.contiguous(), ["red", "blue"] * 8)
    args = ev.parser().parse_args(["--feature-steps", "1"])
    task = ev.prompt_task("folder", images)
    features, classifier = ev.pick_features(fake, images, images, task, args, "cpu")
    assert features is fake
    assert classifier is not None and classifier.test_accuracy is not None
    plain = data_lib.ImageSet(images.images, [""] * 16)
    assert ev.pick_features(fake, plain, plain, ev.prompt_task("folder", plain), args, "cpu") \
        == (fake, None)


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
    assert lines[2].startswith("dit-s  ")                           # text is left-aligned


# ---------------------------------------------------------------------------------------------
# refusals: one line, exit status 2, before the slow work


@pytest.mark.parametrize("flag,value,why", [
    ("--seed", "-1", "must be a finite number >= 0"), ("--seed", str(2 ** 64), "at most"),
    ("--n", "1.5", "expected an integer"), ("--n", str(10 ** 6 + 1), "at most 1,000,000"),
    ("--sample-steps", str(10 ** 7 + 1), "at most 10,000,000"),
    ("--batch-size", str(2 ** 16 + 1), "at most 65,536"), ("--feature-steps", "0", "> 0"),
    ("--n-builtin", str(10 ** 6 + 1), "at most"), ("--cfg", "nan", "finite"),
    ("--n", "4", "at least 5 images")])
def test_a_bad_flag_is_one_line_naming_it(cli, expect, flag, value, why):
    result = cli("evaluate.py", flag, value)
    expect.one_line_error(result, flag)
    assert why in result[2]


@pytest.mark.parametrize("case", ["missing", "vae_as_flow", "not inception"])
def test_a_bad_checkpoint_or_inception_is_one_line_naming_the_flag(runs, cli, expect, tmp_path,
                                                                   case):
    if case == "not inception":
        path = tmp_path / "other.pt"
        torch.jit.script(torch.nn.Flatten()).save(str(path))
        argv, why = ["--vae", runs["vae"], "--inception", path], "not the FID Inception-v3"
    else:
        path = tmp_path / "nope.pt" if case == "missing" else runs["vae"]
        argv, why = ["--ckpt", path], "file not found" if case == "missing" else "'vae'"
    result = cli("evaluate.py", *argv, *FAST)
    expect.one_line_error(result, why)
    assert f"{argv[-2]} {path}" in result[2]                      # the flag and the file


def test_json_is_checked_before_the_evaluation_and_never_replaces_what_it_did_not_write(
        runs, monkeypatch, tmp_path):
    monkeypatch.setattr(ev, "evaluate_checkpoint", lambda *a: {"settings": [], "evaluated": True})
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(runs["flow"].read_bytes())
    other = tmp_path / "other.json"
    other.write_bytes(b"a file")
    refusals = [(ckpt, [], "is the file this command reads as --ckpt"),
                (ckpt, ["--overwrite"], "is the file this command reads as --ckpt"),
                (other, [], "exists and this command did not write it"),
                (other / "r.json", [], "other.json is not a writable folder")]
    for path, extra, why in refusals:
        with pytest.raises(ev.UserError, match=why):
            ev.main(["--ckpt", str(ckpt), "--json", str(path), *extra, *FAST])
    assert ckpt.read_bytes() == runs["flow"].read_bytes() and other.read_bytes() == b"a file"
    assert ev.main(["--ckpt", str(ckpt), "--json", str(other), "--overwrite", *FAST]) == 0
    assert json.loads(other.read_text())["evaluated"]


def test_held_out_captions_compare_the_held_out_split_with_as_many_training_images(capsys):
    train = data_lib.load_dataset(None, 32, "train", n_builtin=40, seed=0)
    test = data_lib.load_dataset(None, 32, "test", n_builtin=40, seed=0)
    real_a, real_b = ev.real_sets(None, test, 10**6, 32, seed=0, train=train)
    assert len(real_a) == len(real_b) == len(train)       # capped by the smaller split, warned
    assert "using n = 40" in capsys.readouterr().err
    assert torch.equal(real_a.images, test.images[:40]) and real_a.captions == test.captions[:40]
    index = {bytes(x.numpy()): i for i, x in enumerate(train.images)}
    assert len({index[bytes(x.numpy())] for x in real_b.images}) == len(real_b)  # distinct draws
    again = ev.real_sets(None, test, 5, 32, seed=0, train=train)[1]
    assert torch.equal(again.images, real_b.images[:5])                   # a fixed-seed draw
